//! msgpack with numpy values, as openpi-client's `msgpack_numpy` writes them: an ndarray is
//! a map `{b"__ndarray__": True, b"data": <bin>, b"dtype": "<f4", b"shape": [..]}`, a numpy
//! scalar `{b"__npgeneric__": True, b"data": <value>, b"dtype": "<f8"}` (the marker keys
//! are *bin*, since Python packs `bytes` as bin; everything else has str keys).
//!
//! The reader is ours rather than a general msgpack value decoder: it borrows strings and
//! binaries from the message (a camera frame is not copied) and bounds what a hostile message
//! can make it allocate — nesting at [`MAX_DEPTH`], and at most [`MAX_ITEMS`] array elements
//! and map entries in all (a general decoder turns a megabyte of one-byte `nil`s into tens of
//! megabytes of values). The writer is the few calls an answer needs.

use rmp::Marker;

/// Nesting of arrays and maps (an ALOHA observation nests `images` in the top map: 2).
pub const MAX_DEPTH: usize = 8;
/// Array elements and map entries in one message, all levels together.
pub const MAX_ITEMS: usize = 4096;

/// One msgpack value, strings and binaries borrowed from the message.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Nil,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a str),
    Bin(&'a [u8]),
    Array(Vec<Value<'a>>),
    Map(Vec<(Value<'a>, Value<'a>)>),
    /// `msgpack_numpy`'s ndarray.
    NdArray(NdArray<'a>),
    /// `msgpack_numpy`'s numpy scalar (`np.float32(1.5)`, `np.str_("pick")`).
    Scalar {
        dtype: &'a str,
        value: Box<Value<'a>>,
    },
}

/// An ndarray as it travels: raw bytes in `dtype` order, C-contiguous in `shape`.
#[derive(Debug, Clone, PartialEq)]
pub struct NdArray<'a> {
    pub dtype: &'a str,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// Why a message is not msgpack as openpi-client writes it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("the message is not msgpack: {what} at byte {offset}")]
    Malformed { offset: usize, what: &'static str },
    #[error("the message nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("the message holds more than {MAX_ITEMS} array elements and map entries")]
    TooManyItems,
    #[error("the message has {0} bytes after its msgpack value")]
    Trailing(usize),
    #[error("a numpy array ({field}): {problem}")]
    BadNumpy {
        field: &'static str,
        problem: String,
    },
}

/// Reads one whole message: exactly one msgpack value.
pub fn read(message: &[u8]) -> Result<Value<'_>, WireError> {
    let mut r = Reader {
        buf: message,
        pos: 0,
        items: 0,
    };
    let v = r.value(0)?;
    match message.len() - r.pos {
        0 => Ok(v),
        n => Err(WireError::Trailing(n)),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    items: usize,
}

impl<'a> Reader<'a> {
    fn malformed(&self, what: &'static str) -> WireError {
        WireError::Malformed {
            offset: self.pos,
            what,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.malformed("the message ends inside a value"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn len8(&mut self) -> Result<usize, WireError> {
        Ok(self.be::<1>()?[0] as usize)
    }
    fn len16(&mut self) -> Result<usize, WireError> {
        Ok(u16::from_be_bytes(self.be()?) as usize)
    }
    fn len32(&mut self) -> Result<usize, WireError> {
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    fn count(&mut self, n: usize) -> Result<(), WireError> {
        self.items = self.items.saturating_add(n);
        if self.items > MAX_ITEMS {
            return Err(WireError::TooManyItems);
        }
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<Value<'a>, WireError> {
        let at = self.pos;
        let marker = Marker::from_u8(self.be::<1>()?[0]);
        Ok(match marker {
            Marker::Null => Value::Nil,
            Marker::True => Value::Bool(true),
            Marker::False => Value::Bool(false),
            Marker::FixPos(n) => Value::Int(n.into()),
            Marker::FixNeg(n) => Value::Int(n.into()),
            Marker::U8 => Value::Int(u8::from_be_bytes(self.be()?).into()),
            Marker::U16 => Value::Int(u16::from_be_bytes(self.be()?).into()),
            Marker::U32 => Value::Int(u32::from_be_bytes(self.be()?).into()),
            Marker::U64 => Value::Int(u64::from_be_bytes(self.be()?).into()),
            Marker::I8 => Value::Int(i8::from_be_bytes(self.be()?).into()),
            Marker::I16 => Value::Int(i16::from_be_bytes(self.be()?).into()),
            Marker::I32 => Value::Int(i32::from_be_bytes(self.be()?).into()),
            Marker::I64 => Value::Int(i64::from_be_bytes(self.be()?).into()),
            Marker::F32 => Value::Float(f32::from_be_bytes(self.be()?).into()),
            Marker::F64 => Value::Float(f64::from_be_bytes(self.be()?)),
            Marker::FixStr(n) => self.str(n as usize)?,
            Marker::Str8 => {
                let n = self.len8()?;
                self.str(n)?
            }
            Marker::Str16 => {
                let n = self.len16()?;
                self.str(n)?
            }
            Marker::Str32 => {
                let n = self.len32()?;
                self.str(n)?
            }
            Marker::Bin8 => {
                let n = self.len8()?;
                Value::Bin(self.take(n)?)
            }
            Marker::Bin16 => {
                let n = self.len16()?;
                Value::Bin(self.take(n)?)
            }
            Marker::Bin32 => {
                let n = self.len32()?;
                Value::Bin(self.take(n)?)
            }
            Marker::FixArray(n) => self.array(n as usize, depth)?,
            Marker::Array16 => {
                let n = self.len16()?;
                self.array(n, depth)?
            }
            Marker::Array32 => {
                let n = self.len32()?;
                self.array(n, depth)?
            }
            Marker::FixMap(n) => self.map(n as usize, depth)?,
            Marker::Map16 => {
                let n = self.len16()?;
                self.map(n, depth)?
            }
            Marker::Map32 => {
                let n = self.len32()?;
                self.map(n, depth)?
            }
            Marker::FixExt1
            | Marker::FixExt2
            | Marker::FixExt4
            | Marker::FixExt8
            | Marker::FixExt16
            | Marker::Ext8
            | Marker::Ext16
            | Marker::Ext32 => {
                self.pos = at;
                return Err(self.malformed("an extension type (openpi-client writes none)"));
            }
            Marker::Reserved => {
                self.pos = at;
                return Err(self.malformed("the reserved byte 0xc1"));
            }
        })
    }

    fn str(&mut self, n: usize) -> Result<Value<'a>, WireError> {
        let at = self.pos;
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes).map(Value::Str).map_err(|_| {
            self.pos = at;
            self.malformed("a string that is not UTF-8")
        })
    }

    fn array(&mut self, n: usize, depth: usize) -> Result<Value<'a>, WireError> {
        if depth >= MAX_DEPTH {
            return Err(WireError::TooDeep);
        }
        // Counted before anything is allocated: `n` comes from the wire.
        self.count(n)?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value<'a>, WireError> {
        if depth >= MAX_DEPTH {
            return Err(WireError::TooDeep);
        }
        self.count(n)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.value(depth + 1)?;
            let v = self.value(depth + 1)?;
            entries.push((k, v));
        }
        numpy(entries)
    }
}

/// A key as text: str, or bin that is UTF-8 (the marker keys of `msgpack_numpy`).
pub fn key_text<'a>(k: &Value<'a>) -> Option<&'a str> {
    match k {
        Value::Str(s) => Some(s),
        Value::Bin(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

/// A map, or the numpy value `msgpack_numpy` wrote as one.
fn numpy<'a>(entries: Vec<(Value<'a>, Value<'a>)>) -> Result<Value<'a>, WireError> {
    let get = |name: &str| {
        entries
            .iter()
            .find(|(k, _)| key_text(k) == Some(name))
            .map(|(_, v)| v)
    };
    let bad = |field: &'static str, problem: &str| WireError::BadNumpy {
        field,
        problem: problem.to_string(),
    };
    let dtype = || match get("dtype") {
        Some(Value::Str(s)) => Ok(*s),
        _ => Err(bad("dtype", "expected a string such as \"<f4\"")),
    };
    if matches!(get("__ndarray__"), Some(Value::Bool(true))) {
        let data = match get("data") {
            Some(Value::Bin(b)) => *b,
            _ => return Err(bad("data", "expected bytes")),
        };
        let shape = match get("shape") {
            Some(Value::Array(dims)) => dims
                .iter()
                .map(|d| match d {
                    Value::Int(n) => usize::try_from(*n).ok(),
                    _ => None,
                })
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| bad("shape", "expected a list of sizes"))?,
            _ => return Err(bad("shape", "expected a list of sizes")),
        };
        let dtype = dtype()?;
        // Checked for the number types (what reflex reads); a string array's element size
        // is not its dtype's number.
        let elem = Dtype::parse(dtype)
            .filter(|d| b"fiub".contains(&d.kind))
            .map(|d| d.size);
        let want = shape
            .iter()
            .try_fold(elem.unwrap_or(1), |n, &d| n.checked_mul(d));
        if elem.is_some() && want != Some(data.len()) {
            return Err(bad(
                "data",
                &format!(
                    "{} bytes, but shape {shape:?} of {dtype} needs {}",
                    data.len(),
                    want.map_or("more than fits in memory".into(), |n| n.to_string())
                ),
            ));
        }
        return Ok(Value::NdArray(NdArray { dtype, shape, data }));
    }
    if matches!(get("__npgeneric__"), Some(Value::Bool(true))) {
        let value = get("data").cloned().ok_or_else(|| bad("data", "missing"))?;
        return Ok(Value::Scalar {
            dtype: dtype()?,
            value: Box::new(value),
        });
    }
    Ok(Value::Map(entries))
}

/// A numpy dtype string (`"<f4"`, `"|u1"`): byte order, kind, size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dtype {
    pub big_endian: bool,
    /// `f` float, `i` signed, `u` unsigned, `b` bool; others are refused where numbers
    /// are needed.
    pub kind: u8,
    pub size: usize,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Dtype> {
        let b = s.as_bytes();
        let (order, kind, size) = match b {
            [o @ (b'<' | b'>' | b'|' | b'='), k, rest @ ..] => (*o, *k, rest),
            _ => return None,
        };
        let size: usize = std::str::from_utf8(size).ok()?.parse().ok()?;
        Some(Dtype {
            big_endian: order == b'>',
            kind,
            size,
        })
    }
}

impl NdArray<'_> {
    /// The elements as f32, from any float, integer or bool dtype (float64 state is what
    /// numpy makes by default).
    pub fn to_f32(&self) -> Result<Vec<f32>, String> {
        let d = Dtype::parse(self.dtype)
            .ok_or_else(|| format!("dtype {:?} is not a numpy dtype", self.dtype))?;
        macro_rules! each {
            ($t:ty) => {
                self.data
                    .chunks_exact(std::mem::size_of::<$t>())
                    .map(|c| {
                        let a = c.try_into().unwrap_or_default();
                        (if d.big_endian {
                            <$t>::from_be_bytes(a)
                        } else {
                            <$t>::from_le_bytes(a)
                        }) as f32
                    })
                    .collect()
            };
        }
        Ok(match (d.kind, d.size) {
            (b'f', 4) => each!(f32),
            (b'f', 8) => each!(f64),
            (b'i', 1) => each!(i8),
            (b'i', 2) => each!(i16),
            (b'i', 4) => each!(i32),
            (b'i', 8) => each!(i64),
            (b'u' | b'b', 1) => self.data.iter().map(|&x| x as f32).collect(),
            (b'u', 2) => each!(u16),
            (b'u', 4) => each!(u32),
            (b'u', 8) => each!(u64),
            _ => {
                return Err(format!(
                    "dtype {} is not a number type reflex reads (float32/64, int, uint, bool)",
                    self.dtype
                ));
            }
        })
    }
}

/// An answer being written; msgpack into a `Vec`, which cannot fail, so the writer's
/// `Result`s are dropped in one place each.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn map(&mut self, entries: u32) -> &mut Self {
        let _ = rmp::encode::write_map_len(&mut self.0, entries);
        self
    }
    pub fn array(&mut self, items: u32) -> &mut Self {
        let _ = rmp::encode::write_array_len(&mut self.0, items);
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        let _ = rmp::encode::write_str(&mut self.0, s);
        self
    }
    pub fn bin(&mut self, b: &[u8]) -> &mut Self {
        let _ = rmp::encode::write_bin(&mut self.0, b);
        self
    }
    pub fn uint(&mut self, n: u64) -> &mut Self {
        let _ = rmp::encode::write_uint(&mut self.0, n);
        self
    }
    pub fn float(&mut self, x: f64) -> &mut Self {
        let _ = rmp::encode::write_f64(&mut self.0, x);
        self
    }
    pub fn bool(&mut self, b: bool) -> &mut Self {
        let _ = rmp::encode::write_bool(&mut self.0, b);
        self
    }
    /// `values` as a float32 ndarray of `shape` that `msgpack_numpy.unpackb` turns into
    /// `np.ndarray` (its marker keys bin, as it looks them up).
    pub fn ndarray_f32(&mut self, shape: &[usize], values: &[f32]) -> &mut Self {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.map(4)
            .bin(b"__ndarray__")
            .bool(true)
            .bin(b"data")
            .bin(&data)
            .bin(b"dtype")
            .str("<f4")
            .bin(b"shape")
            .array(shape.len() as u32);
        for &d in shape {
            self.uint(d as u64);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `msgpack_numpy.packb({"img": np.zeros((2, 1, 3), np.uint8), "s": np.float64(0.5),
    /// "p": "hi"})` writes (msgpack 1.x: `bytes` keys as bin, the tuple shape as an array).
    fn openpi_message() -> Vec<u8> {
        let mut w = Writer::default();
        w.map(3).str("img").map(4);
        w.bin(b"__ndarray__").bool(true);
        w.bin(b"data").bin(&[0; 6]);
        w.bin(b"dtype").str("|u1");
        w.bin(b"shape").array(3).uint(2).uint(1).uint(3);
        w.str("s")
            .map(3)
            .bin(b"__npgeneric__")
            .bool(true)
            .bin(b"data")
            .float(0.5)
            .bin(b"dtype")
            .str("<f8");
        w.str("p").str("hi");
        w.0
    }

    #[test]
    fn numpy_values_are_read_as_openpi_client_writes_them() {
        let msg = openpi_message();
        let Value::Map(entries) = read(&msg).unwrap() else {
            panic!("not a map")
        };
        assert_eq!(key_text(&entries[0].0), Some("img"));
        assert_eq!(
            entries[0].1,
            Value::NdArray(NdArray {
                dtype: "|u1",
                shape: vec![2, 1, 3],
                data: &[0; 6]
            })
        );
        assert_eq!(
            entries[1].1,
            Value::Scalar {
                dtype: "<f8",
                value: Box::new(Value::Float(0.5))
            }
        );
        assert_eq!(entries[2].1, Value::Str("hi"));
    }

    #[test]
    fn answers_read_back() {
        let mut w = Writer::default();
        w.map(1).str("actions").ndarray_f32(&[2, 1], &[1.5, -2.0]);
        let Value::Map(e) = read(&w.0).unwrap() else {
            panic!()
        };
        let Value::NdArray(a) = &e[0].1 else { panic!() };
        assert_eq!((a.dtype, a.shape.as_slice()), ("<f4", &[2, 1][..]));
        assert_eq!(a.to_f32().unwrap(), [1.5, -2.0]);
    }

    #[test]
    fn numbers_convert_from_every_numeric_dtype() {
        fn arr<'a>(dtype: &'a str, data: &'a [u8]) -> NdArray<'a> {
            NdArray {
                dtype,
                shape: vec![data.len()],
                data,
            }
        }
        let quarter = 0.25f64.to_le_bytes();
        assert_eq!(arr("<f8", &quarter).to_f32().unwrap(), [0.25]);
        assert_eq!(arr(">i2", &[0xff, 0xfe]).to_f32().unwrap(), [-2.0]);
        assert_eq!(arr("|u1", &[7, 9]).to_f32().unwrap(), [7.0, 9.0]);
        assert!(arr("<U1", &[0; 4]).to_f32().unwrap_err().contains("<U1"));
        assert!(
            arr("c", &[])
                .to_f32()
                .unwrap_err()
                .contains("not a numpy dtype")
        );
    }

    #[test]
    fn malformed_messages_are_named_not_panicked_on() {
        assert!(matches!(
            read(b""),
            Err(WireError::Malformed { offset: 0, .. })
        ));
        assert!(matches!(read(b"\xc1"), Err(WireError::Malformed { .. })));
        assert!(matches!(read(b"\xa5ab"), Err(WireError::Malformed { .. })));
        assert_eq!(read(b"\xc0\xc0"), Err(WireError::Trailing(1)));
        assert!(matches!(
            read(b"\xa2\xff\xfe"),
            Err(WireError::Malformed { what, .. }) if what.contains("UTF-8")
        ));
        // Plain text, as a confused client might send: 'h' is a fixint, then trailing.
        assert!(read(b"hello").is_err());
        // A length from the wire is never allocated before it is counted.
        assert_eq!(read(b"\xdd\xff\xff\xff\xff"), Err(WireError::TooManyItems));
        let deep = [0x91u8; 64];
        assert_eq!(read(&deep), Err(WireError::TooDeep));
        // Many small items: the budget holds across levels.
        let mut w = Writer::default();
        w.array(3);
        for _ in 0..3 {
            w.array(2000);
            for _ in 0..2000 {
                w.bool(true);
            }
        }
        assert_eq!(read(&w.0), Err(WireError::TooManyItems));
    }

    #[test]
    fn an_ndarray_whose_bytes_do_not_fit_its_shape_is_refused() {
        let mut w = Writer::default();
        w.map(4);
        w.bin(b"__ndarray__").bool(true);
        w.bin(b"data").bin(&[0; 5]);
        w.bin(b"dtype").str("|u1");
        w.bin(b"shape").array(2).uint(2).uint(3);
        let e = read(&w.0).unwrap_err().to_string();
        assert!(e.contains("5 bytes") && e.contains("needs 6"), "{e}");
        // A shape whose product overflows.
        let mut w = Writer::default();
        w.map(4);
        w.bin(b"__ndarray__").bool(true);
        w.bin(b"data").bin(&[]);
        w.bin(b"dtype").str("<f8");
        w.bin(b"shape").array(2).uint(u64::MAX).uint(3);
        assert!(
            read(&w.0)
                .unwrap_err()
                .to_string()
                .contains("more than fits")
        );
    }
}
