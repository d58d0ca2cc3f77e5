//! Instruction tokens for the reference model ("word-hash-v1").
//!
//! The reference export has no learned vocabulary, so text is mapped to ids
//! deterministically: lowercase, split on anything that is not a letter or a
//! digit, each word → FNV-1a 32-bit hash of its UTF-8 bytes → `2 + h % (vocab - 2)`.
//! Id 1 is a begin token placed first, id 0 pads to `max_tokens`; words past
//! `max_tokens - 1` are dropped. Same text, same ids, on every machine.

pub const WORD_HASH_V1: &str = "word-hash-v1";

const PAD: i64 = 0;
const BOS: i64 = 1;

/// Token ids of `text`, exactly `max_tokens` long.
pub fn tokenize(text: &str, vocab_size: u32, max_tokens: usize) -> Vec<i64> {
    let mut ids = Vec::with_capacity(max_tokens);
    ids.push(BOS);
    let lower = text.to_lowercase();
    for word in lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        if ids.len() == max_tokens {
            break;
        }
        let h = fnv1a(word.as_bytes());
        ids.push(2 + (h % (vocab_size - 2)) as i64);
    }
    ids.truncate(max_tokens);
    ids.resize(max_tokens, PAD);
    ids
}

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= *b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_words_same_ids_regardless_of_case_and_punctuation() {
        let a = tokenize("Pick up the red cup!", 1024, 16);
        let b = tokenize("pick  up, the RED cup", 1024, 16);
        assert_eq!(a, b);
        assert_eq!(a.len(), 16);
        assert_eq!(a[0], BOS);
        assert!(a[1..6].iter().all(|&t| (2..1024).contains(&t)));
        assert!(a[6..].iter().all(|&t| t == PAD));
        assert_ne!(a, tokenize("pick up the blue cup", 1024, 16));
    }

    #[test]
    fn long_text_is_cut_and_empty_text_is_just_the_begin_token() {
        let long = "a b c d e f g h i j k l m n o p q r s t";
        let t = tokenize(long, 1024, 8);
        assert_eq!(t.len(), 8);
        assert!(t[1..].iter().all(|&x| x >= 2));
        assert_eq!(tokenize("", 1024, 4), vec![BOS, PAD, PAD, PAD]);
    }

    #[test]
    fn fnv1a_matches_reference_vector() {
        // Published FNV-1a 32 test vector.
        assert_eq!(fnv1a(b"a"), 0xe40c292c);
    }
}
