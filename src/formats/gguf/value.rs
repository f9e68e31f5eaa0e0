//! GGUF metadata values.
use std::fmt;

/// GGUF value type ids (gguf.h `enum gguf_type`).
pub mod ty {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// One metadata value. Arrays are homogeneous; ggml's own reader refuses nested
/// arrays, so the writer never produces them (the reader accepts them).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(u32, Vec<Value>),
}

impl Value {
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => ty::U8,
            Value::I8(_) => ty::I8,
            Value::U16(_) => ty::U16,
            Value::I16(_) => ty::I16,
            Value::U32(_) => ty::U32,
            Value::I32(_) => ty::I32,
            Value::F32(_) => ty::F32,
            Value::Bool(_) => ty::BOOL,
            Value::String(_) => ty::STRING,
            Value::U64(_) => ty::U64,
            Value::I64(_) => ty::I64,
            Value::F64(_) => ty::F64,
            Value::Array(..) => ty::ARRAY,
        }
    }

    /// Integer value of any integer type (and bool), if it fits.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Bool(b) => Some(b as u64),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, v) => Some(v),
            _ => None,
        }
    }

    pub fn u32_array(v: impl IntoIterator<Item = usize>) -> Value {
        Value::Array(
            ty::U32,
            v.into_iter().map(|x| Value::U32(x as u32)).collect(),
        )
    }
    pub fn string_array<S: Into<String>>(v: impl IntoIterator<Item = S>) -> Value {
        Value::Array(
            ty::STRING,
            v.into_iter().map(|s| Value::String(s.into())).collect(),
        )
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::String(s) if s.len() > 80 => write!(
                f,
                "{:?}… ({} bytes)",
                &s[..s.floor_char_boundary(80)],
                s.len()
            ),
            Value::String(s) => write!(f, "{s:?}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Array(_, items) => {
                write!(f, "[")?;
                for (i, v) in items.iter().take(8).enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{v}")?;
                }
                if items.len() > 8 {
                    write!(f, ", … {} items", items.len())?;
                }
                write!(f, "]")
            }
        }
    }
}
