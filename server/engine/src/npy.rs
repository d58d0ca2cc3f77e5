//! numpy's `.npy` format for the one kind of array exports carry beside their graphs: a
//! little-endian f32 array in C order (the seed tool's `state_proj_weight.npy` /
//! `state_proj_bias.npy`, written by `np.save`). Format versions 1.0, 2.0 and 3.0; anything
//! else (another dtype, Fortran order, a pickled object array) is refused with the reason —
//! never unpickled.

use std::path::Path;

const MAGIC: &[u8] = b"\x93NUMPY";

/// An f32 array read from a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Reads `path` as a little-endian f32 C-order array.
pub fn read_f32(path: &Path) -> Result<Array, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_f32(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_f32(bytes: &[u8]) -> Result<Array, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (no \\x93NUMPY magic)".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    let header = bytes
        .get(start..start + header_len)
        .ok_or("the header runs past the end of the file")?;
    let header = std::str::from_utf8(header).map_err(|_| "the header is not text")?;
    let field = |key: &str| -> Result<&str, String> {
        let at = header
            .find(&format!("'{key}'"))
            .ok_or_else(|| format!("the header has no {key:?}"))?;
        let rest = header[at + key.len() + 2..].trim_start();
        Ok(rest.strip_prefix(':').unwrap_or(rest).trim_start())
    };
    let descr = field("descr")?;
    if !(descr.starts_with("'<f4'") || descr.starts_with("'float32'")) {
        return Err(format!(
            "dtype {} is not little-endian float32 ('<f4')",
            descr.split(',').next().unwrap_or(descr)
        ));
    }
    if !field("fortran_order")?.starts_with("False") {
        return Err("the array is in Fortran order; save it C-ordered".into());
    }
    let shape_text = field("shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("the header's shape is not a tuple")?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad dimension {s:?}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let n: usize = shape.iter().product();
    let body = &bytes[start + header_len..];
    if body.len() != n * 4 {
        return Err(format!(
            "shape {shape:?} needs {} bytes of data, the file has {}",
            n * 4,
            body.len()
        ));
    }
    let data = body
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(Array { shape, data })
}

/// `np.save` of a little-endian f32 C-order array (format 1.0, the header padded to 64
/// bytes as numpy pads it).
pub fn encode_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    let dims = match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_it_cannot_read() {
        let a = encode_f32(&[3, 2], &[1.0, -2.0, 3.5, 0.0, 5.0, 6.25]);
        assert_eq!(a.len() % 64, 24, "header padded to 64 bytes, then 6 floats");
        let back = parse_f32(&a).unwrap();
        assert_eq!(back.shape, [3, 2]);
        assert_eq!(back.data, [1.0, -2.0, 3.5, 0.0, 5.0, 6.25]);
        let v = parse_f32(&encode_f32(&[2], &[7.0, 8.0])).unwrap();
        assert_eq!(v.shape, [2]);

        let mut wrong = a.clone();
        let at = wrong.windows(3).position(|w| w == b"<f4").unwrap();
        wrong[at + 2] = b'8';
        assert!(parse_f32(&wrong).unwrap_err().contains("float32"));
        let mut fortran = a.clone();
        let at = fortran.windows(5).position(|w| w == b"False").unwrap();
        fortran[at..at + 5].copy_from_slice(b"True ");
        assert!(parse_f32(&fortran).unwrap_err().contains("Fortran"));
        assert!(
            parse_f32(&a[..a.len() - 4])
                .unwrap_err()
                .contains("needs 24 bytes")
        );
        assert!(
            parse_f32(b"PK\x03\x04 not npy")
                .unwrap_err()
                .contains("magic")
        );
    }
}
