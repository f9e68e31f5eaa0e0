//! A restricted unpickler for PyTorch checkpoints, and the matching pickle writer.
//!
//! The unpickler reads a pickle as a data description and never calls anything:
//! it builds a graph of plain values (ints, strings, tuples, lists, dicts) in an
//! arena, and understands exactly the handful of callables `torch.save` uses for a
//! state dict (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and
//! friends, the legacy storage classes as persistent-id tags and the dtype
//! objects). Any other global is refused at the opcode that names it, with
//! [`Error::UnsafePickle`], before anything else happens.
//!
//! One exception keeps real files loading: the original SD 1.x `.ckpt` releases
//! carry PyTorch Lightning training state beside the weights (a `ModelCheckpoint`
//! callback, numpy scalars for counters, `_codecs.encode` for bytes). Those few names
//! ([`INERT_GLOBALS`]) become opaque placeholders: never called, never looked up,
//! and no tensor can come out of them.
//!
//! Hostile input is bounded: every object is created by one opcode (so the arena
//! grows at most linearly with the pickle, and under [`MAX_OBJECTS`]), the value
//! stack, MARK nesting and memo are capped, lengths are checked against the bytes
//! that remain, and nothing recurses while parsing, so time is linear in the input.
use std::collections::HashMap;
use std::path::Path;

use super::source::DType;
use crate::error::{Error, Result};

/// The largest pickle (`data.pkl`) accepted. Real state dicts take well under 1 MiB.
pub const MAX_PICKLE_BYTES: usize = 64 << 20;
/// The most objects one pickle may create (each takes a few dozen bytes).
pub const MAX_OBJECTS: usize = 1 << 23;
/// The deepest value stack accepted (pickle batches container items by 1000).
const MAX_STACK: usize = 1 << 20;
/// The most MARKs open at once (tuples/lists/dicts under construction).
const MAX_MARKS: usize = 1024;
/// The longest text line (GLOBAL module and name, PUT/GET index).
const MAX_LINE: usize = 512;
/// The longest LONG4 integer accepted, in bytes.
const MAX_LONG_BYTES: usize = 1 << 16;

/// Index of an object in an [`Unpickled`] arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ObjId(u32);

impl ObjId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A callable or class the unpickler recognises. Nothing else can be named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Global {
    /// `collections.OrderedDict`: builds a dict.
    OrderedDict,
    /// `torch._utils._rebuild_tensor(storage, storage_offset, size, stride)`.
    RebuildTensor,
    /// `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`.
    RebuildTensorV2,
    /// `torch._utils._rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])`.
    RebuildTensorV3,
    /// `torch._utils._rebuild_parameter(tensor, requires_grad, backward_hooks)`.
    RebuildParameter,
    /// `torch._utils._rebuild_parameter_with_state(tensor, requires_grad, backward_hooks, state)`.
    RebuildParameterWithState,
    /// A storage class such as `torch.HalfStorage` (`torch.UntypedStorage` holds bytes).
    Storage(DType),
    /// A dtype object such as `torch.float16`.
    Dtype(DType),
    /// Training metadata that real checkpoints carry; see [`INERT_GLOBALS`].
    Inert(&'static str),
}

/// Globals found outside the weights of real SD checkpoints, read as opaque
/// placeholders (nothing is called; the values are ignored).
pub const INERT_GLOBALS: &[&str] = &[
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy.dtype",
    "_codecs.encode",
];

impl Global {
    /// Maps `module.name` to an allowed global, or `None` for anything else.
    pub fn resolve(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensorV3,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch", n) => {
                if let Some(d) = storage_class_dtype(n) {
                    Global::Storage(d)
                } else {
                    Global::Dtype(dtype_object(n)?)
                }
            }
            _ => {
                let dotted = format!("{module}.{name}");
                return INERT_GLOBALS
                    .iter()
                    .find(|g| **g == dotted)
                    .map(|g| Global::Inert(g));
            }
        })
    }

    /// The dotted Python name.
    pub fn python_name(self) -> String {
        match self {
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::RebuildTensor => "torch._utils._rebuild_tensor".into(),
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Global::RebuildTensorV3 => "torch._utils._rebuild_tensor_v3".into(),
            Global::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Global::RebuildParameterWithState => {
                "torch._utils._rebuild_parameter_with_state".into()
            }
            Global::Storage(d) => format!(
                "torch.{}",
                storage_class_name(d).unwrap_or("UntypedStorage")
            ),
            Global::Dtype(d) => format!("torch.{}", dtype_object_name(d).unwrap_or("?")),
            Global::Inert(n) => n.to_string(),
        }
    }
}

fn storage_class_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" | "UntypedStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

/// The legacy storage class torch names in a persistent id for `dtype`.
pub fn storage_class_name(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::F64 => "DoubleStorage",
        DType::I64 => "LongStorage",
        DType::I32 => "IntStorage",
        DType::I16 => "ShortStorage",
        DType::I8 => "CharStorage",
        DType::U8 => "ByteStorage",
        DType::Bool => "BoolStorage",
        DType::Ggml(_) => return None,
    })
}

fn dtype_object(name: &str) -> Option<DType> {
    Some(match name {
        "float32" => DType::F32,
        "float16" => DType::F16,
        "bfloat16" => DType::BF16,
        "float64" => DType::F64,
        "int64" => DType::I64,
        "int32" => DType::I32,
        "int16" => DType::I16,
        "int8" => DType::I8,
        "uint8" => DType::U8,
        "bool" => DType::Bool,
        _ => return None,
    })
}

fn dtype_object_name(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        DType::I64 => "int64",
        DType::I32 => "int32",
        DType::I16 => "int16",
        DType::I8 => "int8",
        DType::U8 => "uint8",
        DType::Bool => "bool",
        DType::Ggml(_) => return None,
    })
}

/// A storage named by a persistent id `('storage', StorageClass, key, location, numel)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRef {
    /// Element type of the storage class (`U8` for `UntypedStorage`).
    pub dtype: DType,
    /// The record name under `<archive>/data/`.
    pub key: String,
    /// Device the storage was saved from (`cpu`, `cuda:0`); informational.
    pub location: String,
    /// Number of elements the storage holds.
    pub numel: u64,
}

/// A tensor view of a storage, as a `_rebuild_tensor*` call describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRef {
    pub storage: StorageRef,
    /// The tensor's element type (the storage's, unless `_rebuild_tensor_v3` names one).
    pub dtype: DType,
    /// Offset of the first element, in elements of `dtype`.
    pub storage_offset: u64,
    /// PyTorch order, outermost first.
    pub shape: Vec<usize>,
    /// In elements, per dimension.
    pub stride: Vec<u64>,
}

impl TensorRef {
    /// Whether the strides describe the row-major contiguous layout of `shape`
    /// (dimensions of size 1 may carry any stride; empty tensors are contiguous).
    pub fn is_contiguous(&self) -> bool {
        if self.shape.len() != self.stride.len() {
            return false;
        }
        if self.shape.contains(&0) {
            return true;
        }
        let mut expected: u64 = 1;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected = match expected.checked_mul(d as u64) {
                Some(e) => e,
                None => return false,
            };
        }
        true
    }

    /// Number of elements, if it fits in 64 bits.
    pub fn numel(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
    }
}

/// One value of the pickled graph. Containers refer to other objects by id, so
/// shared and even cyclic references cost nothing to represent.
#[derive(Clone, Debug)]
pub enum Object {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit 64 bits (its value is not kept).
    BigInt,
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<ObjId>),
    List(Vec<ObjId>),
    /// Items in insertion order (a later duplicate key replaces the earlier value).
    Dict(Vec<(ObjId, ObjId)>),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// The result of "calling" an inert global: a placeholder with no content.
    Opaque(&'static str),
}

impl Object {
    /// A short type name for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::None => "None",
            Object::Bool(_) => "bool",
            Object::Int(_) | Object::BigInt => "int",
            Object::Float(_) => "float",
            Object::Str(_) => "str",
            Object::Bytes(_) => "bytes",
            Object::Tuple(_) => "tuple",
            Object::List(_) => "list",
            Object::Dict(_) => "dict",
            Object::Global(_) => "global",
            Object::Storage(_) => "storage",
            Object::Tensor(_) => "tensor",
            Object::Opaque(_) => "opaque object",
        }
    }
}

/// The result of unpickling: an arena of objects and the root object.
#[derive(Debug)]
pub struct Unpickled {
    objects: Vec<Object>,
    root: ObjId,
}

impl Unpickled {
    pub fn root(&self) -> ObjId {
        self.root
    }
    /// The object with id `id` (ids only come from this arena, so this never fails;
    /// a foreign id yields `None`).
    pub fn get(&self, id: ObjId) -> &Object {
        self.objects.get(id.index()).unwrap_or(&Object::None)
    }
    /// Every object, in the order they were built.
    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.iter()
    }
    /// Number of objects in the arena.
    pub fn len(&self) -> usize {
        self.objects.len()
    }
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

// Opcodes (see Python's `pickletools` for their documentation).
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const BINFLOAT: u8 = b'G';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const GET: u8 = b'g';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const PUT: u8 = b'p';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
}

/// Names of the opcodes this unpickler refuses, for error messages.
fn unsupported_opcode_name(code: u8) -> &'static str {
    match code {
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'P' => "PERSID",
        b'i' => "INST",
        b'o' => "OBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown opcode",
    }
}

/// Unpickles `data` (the content of `what`, e.g. `archive/data.pkl`, inside the
/// file `path`). Errors name `path`, `what` and the byte position.
pub fn unpickle(path: &Path, what: &str, data: &[u8]) -> Result<Unpickled> {
    if data.len() > MAX_PICKLE_BYTES {
        return Err(Error::format(
            path,
            format!(
                "{what}: pickle of {} bytes is larger than the {} bytes accepted",
                data.len(),
                MAX_PICKLE_BYTES
            ),
        ));
    }
    let mut m = Machine {
        path,
        what,
        data,
        pos: 0,
        op_pos: 0,
        objects: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    m.run()
}

struct Machine<'a> {
    path: &'a Path,
    what: &'a str,
    data: &'a [u8],
    pos: usize,
    /// Position of the opcode being executed (for messages).
    op_pos: usize,
    objects: Vec<Object>,
    stack: Vec<ObjId>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u64, ObjId>,
}

impl<'a> Machine<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(
            self.path,
            format!(
                "{}: invalid pickle at byte {}: {msg}",
                self.what, self.op_pos
            ),
        )
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let data = self.data;
        let end = self.pos.checked_add(n).filter(|&e| e <= data.len());
        match end.and_then(|e| data.get(self.pos..e)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(self.err(format_args!(
                "truncated: {what} needs {n} bytes but only {} remain",
                data.len().saturating_sub(self.pos)
            ))),
        }
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.arr::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.arr(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn i32(&mut self, what: &str) -> Result<i32> {
        Ok(i32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    /// A length read from the pickle, checked against the bytes that remain.
    fn len_in_input(&self, n: u64, what: &str) -> Result<usize> {
        let remain = self.data.len().saturating_sub(self.pos);
        match usize::try_from(n) {
            Ok(n) if n <= remain => Ok(n),
            _ => Err(self.err(format_args!(
                "truncated: {what} of {n} bytes but only {remain} remain"
            ))),
        }
    }
    /// A text line up to `\n` (not included).
    fn line(&mut self, what: &str) -> Result<&'a [u8]> {
        let data = self.data;
        let rest = data.get(self.pos..).unwrap_or(&[]);
        let window = rest.get(..MAX_LINE.min(rest.len())).unwrap_or(&[]);
        match window.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let line = window.get(..i).unwrap_or(&[]);
                self.pos += i + 1;
                Ok(line)
            }
            None if rest.len() > MAX_LINE => {
                Err(self.err(format_args!("{what} line longer than {MAX_LINE} bytes")))
            }
            None => Err(self.err(format_args!("truncated: {what} line has no end"))),
        }
    }

    fn new_obj(&mut self, o: Object) -> Result<ObjId> {
        if self.objects.len() >= MAX_OBJECTS {
            return Err(self.err(format_args!("more than {MAX_OBJECTS} objects")));
        }
        let id = ObjId(self.objects.len() as u32);
        self.objects.push(o);
        Ok(id)
    }
    fn push(&mut self, id: ObjId) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err(format_args!("value stack deeper than {MAX_STACK}")));
        }
        self.stack.push(id);
        Ok(())
    }
    fn push_new(&mut self, o: Object) -> Result<()> {
        let id = self.new_obj(o)?;
        self.push(id)
    }
    fn base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }
    fn pop(&mut self) -> Result<ObjId> {
        if self.stack.len() <= self.base() {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }
    fn top(&self) -> Result<ObjId> {
        if self.stack.len() <= self.base() {
            return Err(self.err("stack underflow"));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.err("stack underflow"))
    }
    fn pop_mark(&mut self) -> Result<Vec<ObjId>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK to close"))?;
        if m > self.stack.len() {
            return Err(self.err("stack underflow"));
        }
        Ok(self.stack.split_off(m))
    }
    fn obj(&self, id: ObjId) -> &Object {
        self.objects.get(id.index()).unwrap_or(&Object::None)
    }
    fn obj_mut(&mut self, id: ObjId) -> Result<&mut Object> {
        let e = self.err("dangling object id");
        self.objects.get_mut(id.index()).ok_or(e)
    }
    fn memo_get(&mut self, key: u64) -> Result<()> {
        match self.memo.get(&key) {
            Some(&id) => self.push(id),
            None => Err(self.err(format_args!("memo key {key} was never stored"))),
        }
    }
    fn memo_put(&mut self, key: u64) -> Result<()> {
        let id = self.top()?;
        if self.memo.len() >= MAX_OBJECTS && !self.memo.contains_key(&key) {
            return Err(self.err(format_args!("memo larger than {MAX_OBJECTS} entries")));
        }
        self.memo.insert(key, id);
        Ok(())
    }
    fn decimal(&mut self, what: &str) -> Result<u64> {
        let line = self.line(what)?;
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| self.err(format_args!("{what} index is not a decimal number")))
    }

    fn global(&mut self, module: &[u8], name: &[u8]) -> Result<()> {
        let module = String::from_utf8_lossy(module);
        let name = String::from_utf8_lossy(name);
        match Global::resolve(&module, &name) {
            Some(g) => self.push_new(Object::Global(g)),
            None => {
                let mut global: String = format!("{module}.{name}")
                    .chars()
                    .flat_map(char::escape_default)
                    .collect();
                if global.len() > 200 {
                    let cut = (0..=200)
                        .rev()
                        .find(|&i| global.is_char_boundary(i))
                        .unwrap_or(0);
                    global.truncate(cut);
                    global.push_str("...");
                }
                Err(Error::UnsafePickle {
                    path: self.path.to_path_buf(),
                    global,
                })
            }
        }
    }

    fn run(&mut self) -> Result<Unpickled> {
        loop {
            self.op_pos = self.pos;
            let code = match self.data.get(self.pos) {
                Some(&c) => c,
                None => return Err(self.err("truncated: pickle ends without STOP")),
            };
            self.pos += 1;
            match code {
                op::PROTO => {
                    let v = self.u8("PROTO")?;
                    if v > 5 {
                        return Err(self.err(format_args!("pickle protocol {v} is newer than 5")));
                    }
                }
                op::FRAME => {
                    let n = self.u64("FRAME")?;
                    self.len_in_input(n, "FRAME")?;
                }
                op::STOP => {
                    let root = self.pop()?;
                    let objects = std::mem::take(&mut self.objects);
                    return Ok(Unpickled { objects, root });
                }
                op::MARK => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(self.err(format_args!("MARKs nested deeper than {MAX_MARKS}")));
                    }
                    self.marks.push(self.stack.len());
                }
                op::POP => {
                    if self.stack.len() > self.base() {
                        self.pop()?;
                    } else {
                        self.pop_mark()?;
                    }
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let id = self.top()?;
                    self.push(id)?;
                }
                op::NONE => self.push_new(Object::None)?,
                op::NEWTRUE => self.push_new(Object::Bool(true))?,
                op::NEWFALSE => self.push_new(Object::Bool(false))?,
                op::BININT => {
                    let v = self.i32("BININT")?;
                    self.push_new(Object::Int(v as i64))?;
                }
                op::BININT1 => {
                    let v = self.u8("BININT1")?;
                    self.push_new(Object::Int(v as i64))?;
                }
                op::BININT2 => {
                    let v = self.u16("BININT2")?;
                    self.push_new(Object::Int(v as i64))?;
                }
                op::LONG1 => {
                    let n = self.u8("LONG1")? as usize;
                    let bytes = self.take(n, "LONG1")?;
                    self.push_new(long_value(bytes))?;
                }
                op::LONG4 => {
                    let n = self.i32("LONG4")?;
                    let n =
                        usize::try_from(n).map_err(|_| self.err("LONG4 with a negative length"))?;
                    if n > MAX_LONG_BYTES {
                        return Err(self.err(format_args!(
                            "LONG4 integer of {n} bytes (at most {MAX_LONG_BYTES} accepted)"
                        )));
                    }
                    let bytes = self.take(n, "LONG4")?;
                    self.push_new(long_value(bytes))?;
                }
                op::BINFLOAT => {
                    let v = f64::from_be_bytes(self.arr("BINFLOAT")?);
                    self.push_new(Object::Float(v))?;
                }
                op::SHORT_BINUNICODE | op::BINUNICODE | op::BINUNICODE8 => {
                    let n = match code {
                        op::SHORT_BINUNICODE => self.u8("SHORT_BINUNICODE")? as u64,
                        op::BINUNICODE => self.u32("BINUNICODE")? as u64,
                        _ => self.u64("BINUNICODE8")?,
                    };
                    let n = self.len_in_input(n, "string")?;
                    let bytes = self.take(n, "string")?;
                    let s = std::str::from_utf8(bytes)
                        .map_err(|_| self.err("string is not valid UTF-8"))?;
                    self.push_new(Object::Str(s.to_string()))?;
                }
                op::SHORT_BINBYTES | op::BINBYTES | op::BINBYTES8 => {
                    let n = match code {
                        op::SHORT_BINBYTES => self.u8("SHORT_BINBYTES")? as u64,
                        op::BINBYTES => self.u32("BINBYTES")? as u64,
                        _ => self.u64("BINBYTES8")?,
                    };
                    let n = self.len_in_input(n, "bytes")?;
                    let bytes = self.take(n, "bytes")?;
                    self.push_new(Object::Bytes(bytes.to_vec()))?;
                }
                op::SHORT_BINSTRING | op::BINSTRING => {
                    let n = if code == op::SHORT_BINSTRING {
                        self.u8("SHORT_BINSTRING")? as u64
                    } else {
                        let n = self.i32("BINSTRING")?;
                        u64::try_from(n)
                            .map_err(|_| self.err("BINSTRING with a negative length"))?
                    };
                    let n = self.len_in_input(n, "string")?;
                    let bytes = self.take(n, "string")?;
                    // A Python 2 `str`: text when it is UTF-8, bytes otherwise.
                    let o = match std::str::from_utf8(bytes) {
                        Ok(s) => Object::Str(s.to_string()),
                        Err(_) => Object::Bytes(bytes.to_vec()),
                    };
                    self.push_new(o)?;
                }
                op::EMPTY_DICT => self.push_new(Object::Dict(Vec::new()))?,
                op::EMPTY_LIST => self.push_new(Object::List(Vec::new()))?,
                op::EMPTY_TUPLE => self.push_new(Object::Tuple(Vec::new()))?,
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push_new(Object::Tuple(items))?;
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = (code - op::TUPLE1 + 1) as usize;
                    if self.stack.len() < self.base() + n {
                        return Err(self.err("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push_new(Object::Tuple(items))?;
                }
                op::LIST => {
                    let items = self.pop_mark()?;
                    self.push_new(Object::List(items))?;
                }
                op::DICT => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push_new(Object::Dict(pairs))?;
                }
                op::APPEND => {
                    let v = self.pop()?;
                    let l = self.top()?;
                    self.extend_list(l, vec![v])?;
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    let l = self.top()?;
                    self.extend_list(l, items)?;
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.extend_dict(d, vec![(k, v)])?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    let d = self.top()?;
                    self.extend_dict(d, pairs)?;
                }
                op::BINPUT => {
                    let k = self.u8("BINPUT")? as u64;
                    self.memo_put(k)?;
                }
                op::LONG_BINPUT => {
                    let k = self.u32("LONG_BINPUT")? as u64;
                    self.memo_put(k)?;
                }
                op::PUT => {
                    let k = self.decimal("PUT")?;
                    self.memo_put(k)?;
                }
                op::MEMOIZE => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                op::BINGET => {
                    let k = self.u8("BINGET")? as u64;
                    self.memo_get(k)?;
                }
                op::LONG_BINGET => {
                    let k = self.u32("LONG_BINGET")? as u64;
                    self.memo_get(k)?;
                }
                op::GET => {
                    let k = self.decimal("GET")?;
                    self.memo_get(k)?;
                }
                op::GLOBAL => {
                    let module = self.line("GLOBAL module")?;
                    let name = self.line("GLOBAL name")?;
                    self.global(module, name)?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (module, name) = match (self.obj(module), self.obj(name)) {
                        (Object::Str(m), Object::Str(n)) => (m.clone(), n.clone()),
                        (m, n) => {
                            return Err(self.err(format_args!(
                                "STACK_GLOBAL needs two strings, got {} and {}",
                                m.kind(),
                                n.kind()
                            )))
                        }
                    };
                    self.global(module.as_bytes(), name.as_bytes())?;
                }
                op::REDUCE => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let id = self.apply(func, args, "REDUCE")?;
                    self.push(id)?;
                }
                op::NEWOBJ => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    if !matches!(
                        self.obj(cls),
                        Object::Global(Global::OrderedDict | Global::Inert(_))
                    ) {
                        return Err(self.err(format_args!(
                            "NEWOBJ on a {}; only OrderedDict can be instantiated",
                            self.describe(cls)
                        )));
                    }
                    let id = self.apply(cls, args, "NEWOBJ")?;
                    self.push(id)?;
                }
                op::BUILD => {
                    // Sets state on the object below; nothing here has state we use
                    // (an OrderedDict's `_metadata`, a parameter's attributes).
                    self.pop()?;
                    self.top()?;
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let storage = self.persistent_storage(pid)?;
                    self.push_new(Object::Storage(storage))?;
                }
                other => {
                    return Err(self.err(format_args!(
                        "unsupported pickle opcode 0x{other:02x} ({})",
                        unsupported_opcode_name(other)
                    )));
                }
            }
        }
    }

    fn describe(&self, id: ObjId) -> String {
        match self.obj(id) {
            Object::Global(g) => format!("`{}`", g.python_name()),
            o => o.kind().to_string(),
        }
    }

    fn pairs(&self, items: Vec<ObjId>) -> Result<Vec<(ObjId, ObjId)>> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("odd number of items for a dict"));
        }
        Ok(items.chunks_exact(2).map(|c| (c[0], c[1])).collect())
    }

    fn extend_list(&mut self, l: ObjId, items: Vec<ObjId>) -> Result<()> {
        let kind = self.describe(l);
        match self.obj_mut(l)? {
            Object::List(v) => {
                v.extend(items);
                Ok(())
            }
            _ => Err(self.err(format_args!("APPEND to a {kind}, not a list"))),
        }
    }

    fn extend_dict(&mut self, d: ObjId, pairs: Vec<(ObjId, ObjId)>) -> Result<()> {
        let kind = self.describe(d);
        match self.obj_mut(d)? {
            Object::Dict(v) => {
                v.extend(pairs);
                Ok(())
            }
            _ => Err(self.err(format_args!("SETITEM on a {kind}, not a dict"))),
        }
    }

    fn int_arg(&self, id: ObjId, what: &str) -> Result<u64> {
        match self.obj(id) {
            Object::Int(v) => {
                u64::try_from(*v).map_err(|_| self.err(format_args!("{what} is negative ({v})")))
            }
            Object::Bool(b) => Ok(*b as u64),
            o => Err(self.err(format_args!("{what} is a {}, expected an int", o.kind()))),
        }
    }

    fn int_tuple(&self, id: ObjId, what: &str) -> Result<Vec<u64>> {
        match self.obj(id) {
            Object::Tuple(v) | Object::List(v) => {
                v.iter().map(|&i| self.int_arg(i, what)).collect()
            }
            o => Err(self.err(format_args!(
                "{what} is a {}, expected a tuple of ints",
                o.kind()
            ))),
        }
    }

    /// "Calls" an allowed global by building the value it would return.
    fn apply(&mut self, func: ObjId, args: ObjId, opname: &str) -> Result<ObjId> {
        let g = match self.obj(func) {
            Object::Global(g) => *g,
            _ => {
                return Err(self.err(format_args!(
                    "{opname} on a {}, which is not callable",
                    self.describe(func)
                )))
            }
        };
        let args: Vec<ObjId> = match self.obj(args) {
            Object::Tuple(v) => v.clone(),
            o => {
                return Err(self.err(format_args!(
                    "{opname} arguments are a {}, not a tuple",
                    o.kind()
                )))
            }
        };
        let name = g.python_name();
        match g {
            Global::Inert(n) => self.new_obj(Object::Opaque(n)),
            Global::OrderedDict => {
                if !args.is_empty() {
                    return Err(self.err(format_args!(
                        "`{name}` called with {} arguments (only an empty one is built)",
                        args.len()
                    )));
                }
                self.new_obj(Object::Dict(Vec::new()))
            }
            Global::RebuildTensor | Global::RebuildTensorV2 | Global::RebuildTensorV3 => {
                let min = if g == Global::RebuildTensorV3 { 7 } else { 4 };
                if args.len() < min || args.len() > 8 {
                    return Err(self.err(format_args!(
                        "`{name}` called with {} arguments",
                        args.len()
                    )));
                }
                let storage = match self.obj(args[0]) {
                    Object::Storage(s) => s.clone(),
                    o => {
                        return Err(self.err(format_args!(
                            "`{name}`: first argument is a {}, not a storage",
                            o.kind()
                        )))
                    }
                };
                let storage_offset = self.int_arg(args[1], "tensor storage offset")?;
                let size = self.int_tuple(args[2], "tensor size")?;
                let stride = self.int_tuple(args[3], "tensor stride")?;
                if size.len() != stride.len() {
                    return Err(self.err(format_args!(
                        "tensor size has {} dimensions but stride has {}",
                        size.len(),
                        stride.len()
                    )));
                }
                let shape = size
                    .iter()
                    .map(|&d| {
                        usize::try_from(d)
                            .map_err(|_| self.err(format_args!("tensor dimension {d} too large")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let dtype = if g == Global::RebuildTensorV3 {
                    match self.obj(args[6]) {
                        Object::Global(Global::Dtype(d)) => *d,
                        o => {
                            return Err(self.err(format_args!(
                                "`{name}`: dtype argument is a {}, not a torch dtype",
                                o.kind()
                            )))
                        }
                    }
                } else {
                    storage.dtype
                };
                let t = TensorRef {
                    storage,
                    dtype,
                    storage_offset,
                    shape,
                    stride,
                };
                if t.numel().is_none() {
                    return Err(self.err(format_args!(
                        "tensor shape {:?} has too many elements",
                        t.shape
                    )));
                }
                self.new_obj(Object::Tensor(t))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                let n = if g == Global::RebuildParameter { 3 } else { 4 };
                if args.len() != n {
                    return Err(self.err(format_args!(
                        "`{name}` called with {} arguments, expected {n}",
                        args.len()
                    )));
                }
                match self.obj(args[0]) {
                    Object::Tensor(_) => Ok(args[0]),
                    o => Err(self.err(format_args!(
                        "`{name}`: first argument is a {}, not a tensor",
                        o.kind()
                    ))),
                }
            }
            Global::Storage(_) | Global::Dtype(_) => Err(self.err(format_args!(
                "{opname} on `{name}`, which is not called by torch checkpoints"
            ))),
        }
    }

    /// Resolves a persistent id `('storage', StorageClass, key, location, numel)`.
    fn persistent_storage(&self, pid: ObjId) -> Result<StorageRef> {
        let items = match self.obj(pid) {
            Object::Tuple(v) => v,
            o => {
                return Err(self.err(format_args!(
                    "persistent id is a {}, expected a ('storage', ...) tuple",
                    o.kind()
                )))
            }
        };
        let bad = |m: &str| self.err(format_args!("persistent id {m}"));
        if items.len() != 5 {
            return Err(bad(&format!(
                "has {} items, expected 5 ('storage', type, key, location, numel)",
                items.len()
            )));
        }
        match self.obj(items[0]) {
            Object::Str(s) if s == "storage" => {}
            _ => return Err(bad("does not start with 'storage'")),
        }
        let dtype = match self.obj(items[1]) {
            Object::Global(Global::Storage(d)) => *d,
            _ => {
                return Err(bad(&format!(
                    "names a {} where a torch storage class belongs",
                    self.describe(items[1])
                )))
            }
        };
        let key = match self.obj(items[2]) {
            Object::Str(s) => s.clone(),
            Object::Int(i) => i.to_string(),
            o => return Err(bad(&format!("has a {} storage key", o.kind()))),
        };
        if key.is_empty()
            || key.len() > 64
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(bad(&format!(
                "has an invalid storage key {:?}",
                key.chars().take(80).collect::<String>()
            )));
        }
        let location = match self.obj(items[3]) {
            Object::Str(s) => s.clone(),
            o => return Err(bad(&format!("has a {} location", o.kind()))),
        };
        let numel = self.int_arg(items[4], "storage size")?;
        Ok(StorageRef {
            dtype,
            key,
            location,
            numel,
        })
    }
}

/// A little-endian two's-complement integer from LONG1/LONG4.
fn long_value(bytes: &[u8]) -> Object {
    let Some(&last) = bytes.last() else {
        return Object::Int(0);
    };
    let fill = if last & 0x80 != 0 { 0xff } else { 0 };
    if bytes.len() > 8 {
        // Wider encodings fit 64 bits only when the extra bytes are sign extension
        // matching bit 63.
        let (low, high) = bytes.split_at(8);
        let sign_ok = low
            .get(7)
            .is_some_and(|b| (b & 0x80 != 0) == (fill == 0xff));
        if !sign_ok || high.iter().any(|&b| b != fill) {
            return Object::BigInt;
        }
    }
    let mut a = [fill; 8];
    for (d, s) in a.iter_mut().zip(bytes) {
        *d = *s;
    }
    Object::Int(i64::from_le_bytes(a))
}

/// Builds pickles the way `torch.save` writes a state dict (protocol 2).
pub struct PickleWriter {
    out: Vec<u8>,
    next_memo: u32,
    globals: HashMap<&'static str, u32>,
}

impl Default for PickleWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl PickleWriter {
    /// Starts a protocol-2 pickle.
    pub fn new() -> Self {
        PickleWriter {
            out: vec![op::PROTO, 2],
            next_memo: 0,
            globals: HashMap::new(),
        }
    }

    /// Memoizes the top of the stack (BINPUT/LONG_BINPUT with the next index).
    pub fn put(&mut self) {
        let i = self.next_memo;
        self.next_memo += 1;
        if i < 256 {
            self.out.extend([op::BINPUT, i as u8]);
        } else {
            self.out.push(op::LONG_BINPUT);
            self.out.extend(i.to_le_bytes());
        }
    }
    fn get(&mut self, i: u32) {
        if i < 256 {
            self.out.extend([op::BINGET, i as u8]);
        } else {
            self.out.push(op::LONG_BINGET);
            self.out.extend(i.to_le_bytes());
        }
    }

    /// Pushes `module.name` (memoized, so repeats cost a BINGET).
    pub fn global(&mut self, module: &'static str, name: &'static str, key: &'static str) {
        if let Some(&i) = self.globals.get(key) {
            self.get(i);
            return;
        }
        self.out.push(op::GLOBAL);
        self.out.extend(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend(name.as_bytes());
        self.out.push(b'\n');
        self.globals.insert(key, self.next_memo);
        self.put();
    }

    pub fn mark(&mut self) {
        self.out.push(op::MARK);
    }
    pub fn raw(&mut self, opcode: u8) {
        self.out.push(opcode);
    }
    pub fn empty_dict(&mut self) {
        self.out.push(op::EMPTY_DICT);
    }
    pub fn empty_tuple(&mut self) {
        self.out.push(op::EMPTY_TUPLE);
    }
    pub fn tuple(&mut self) {
        self.out.push(op::TUPLE);
    }
    pub fn reduce(&mut self) {
        self.out.push(op::REDUCE);
    }
    pub fn setitem(&mut self) {
        self.out.push(op::SETITEM);
    }
    pub fn setitems(&mut self) {
        self.out.push(op::SETITEMS);
    }
    pub fn binpersid(&mut self) {
        self.out.push(op::BINPERSID);
    }
    pub fn bool(&mut self, v: bool) {
        self.out.push(if v { op::NEWTRUE } else { op::NEWFALSE });
    }

    pub fn str(&mut self, s: &str) {
        self.out.push(op::BINUNICODE);
        // Strings over 4 GiB do not occur here (names, keys).
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.as_bytes());
    }

    pub fn int(&mut self, v: i128) {
        if (0..=0xff).contains(&v) {
            self.out.extend([op::BININT1, v as u8]);
        } else if (0..=0xffff).contains(&v) {
            self.out.push(op::BININT2);
            self.out.extend((v as u16).to_le_bytes());
        } else if (i32::MIN as i128..=i32::MAX as i128).contains(&v) {
            self.out.push(op::BININT);
            self.out.extend((v as i32).to_le_bytes());
        } else {
            // Shortest two's-complement little-endian encoding.
            let bytes = v.to_le_bytes();
            let mut n = bytes.len();
            while n > 1 {
                let top = bytes[n - 1];
                let below_sign = bytes[n - 2] & 0x80;
                if (top == 0 && below_sign == 0) || (top == 0xff && below_sign != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.out.extend([op::LONG1, n as u8]);
            self.out.extend(&bytes[..n]);
        }
    }

    /// A tuple of ints (`torch.Size`, strides).
    pub fn int_tuple(&mut self, v: &[u64]) {
        match v.len() {
            0 => self.out.push(op::EMPTY_TUPLE),
            1..=3 => {
                for &x in v {
                    self.int(x as i128);
                }
                self.out.push(op::TUPLE1 + (v.len() as u8 - 1));
            }
            _ => {
                self.out.push(op::MARK);
                for &x in v {
                    self.int(x as i128);
                }
                self.out.push(op::TUPLE);
            }
        }
    }

    /// Pushes an empty `OrderedDict()`.
    pub fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict", "OrderedDict");
        self.empty_tuple();
        self.reduce();
    }

    /// Pushes `_rebuild_tensor_v2(<storage key>, 0, shape, contiguous strides, False, OrderedDict())`
    /// for a tensor that fills its own storage `key`.
    pub fn tensor(&mut self, key: &str, dtype: DType, shape: &[usize]) -> Result<()> {
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .ok_or_else(|| Error::Invalid(format!("tensor shape {shape:?} too large")))?;
        // torch's contiguous strides: stride[i] = stride[i+1] * max(size[i+1], 1).
        let mut stride = vec![0u64; shape.len()];
        let mut acc = 1u64;
        for i in (0..shape.len()).rev() {
            stride[i] = acc;
            acc = acc.saturating_mul((shape[i] as u64).max(1));
        }
        let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        self.tensor_view(key, dtype, numel, 0, &shape, &stride)
    }

    /// Pushes `_rebuild_tensor_v2(storage, storage_offset, shape, stride, False, OrderedDict())`
    /// where the storage is `('storage', <dtype>Storage, key, 'cpu', storage_numel)`.
    pub fn tensor_view(
        &mut self,
        key: &str,
        dtype: DType,
        storage_numel: u64,
        storage_offset: u64,
        shape: &[u64],
        stride: &[u64],
    ) -> Result<()> {
        let class = storage_class_name(dtype).ok_or_else(|| {
            Error::Invalid(format!(
                "torch checkpoints cannot store type {}",
                dtype.name()
            ))
        })?;
        self.global("torch._utils", "_rebuild_tensor_v2", "_rebuild_tensor_v2");
        self.mark();
        {
            self.mark();
            self.str("storage");
            self.global("torch", class, class);
            self.str(key);
            self.str("cpu");
            self.int(storage_numel as i128);
            self.tuple();
            self.binpersid();
            self.int(storage_offset as i128);
            self.int_tuple(shape);
            self.int_tuple(stride);
            self.bool(false);
            self.ordered_dict();
        }
        self.tuple();
        self.reduce();
        Ok(())
    }

    /// Ends the pickle.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(op::STOP);
        self.out
    }
}

/// The `data.pkl` of a torch state dict: an `OrderedDict` of name → tensor, where
/// tensor `i` fills storage `i`; wrapped as `{"state_dict": ...}` when asked.
pub fn state_dict_pickle(
    tensors: &[(&str, DType, &[usize])],
    wrap_state_dict: bool,
) -> Result<Vec<u8>> {
    let mut w = PickleWriter::new();
    if wrap_state_dict {
        w.empty_dict();
        w.put();
        w.str("state_dict");
        w.put();
    }
    w.ordered_dict();
    w.put();
    for (batch_start, batch) in tensors.chunks(1000).enumerate().map(|(b, c)| (b * 1000, c)) {
        w.mark();
        for (j, (name, dtype, shape)) in batch.iter().enumerate() {
            w.str(name);
            w.tensor(&(batch_start + j).to_string(), *dtype, shape)?;
        }
        w.setitems();
    }
    if wrap_state_dict {
        w.setitem();
    }
    Ok(w.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("test.pkl")
    }

    fn run(data: &[u8]) -> Result<Unpickled> {
        unpickle(p(), "data.pkl", data)
    }

    fn refused_global(data: &[u8]) -> String {
        match run(data) {
            Err(Error::UnsafePickle { global, .. }) => global,
            other => panic!("expected UnsafePickle, got {other:?}"),
        }
    }

    fn unicode(s: &str) -> Vec<u8> {
        let mut v = vec![op::BINUNICODE];
        v.extend((s.len() as u32).to_le_bytes());
        v.extend(s.as_bytes());
        v
    }

    #[test]
    fn global_os_system_with_reduce_is_refused_at_the_global() {
        // cos\nsystem\n(S'echo pwned'\ntR.
        let mut d = vec![0x80, 2];
        d.extend(b"cos\nsystem\n(");
        d.extend(unicode("echo pwned"));
        d.extend(b"tR.");
        assert_eq!(refused_global(&d), "os.system");
    }

    #[test]
    fn stack_global_builtins_eval_is_refused() {
        let mut d = vec![0x80, 4, op::SHORT_BINUNICODE, 8];
        d.extend(b"builtins");
        d.extend([op::MEMOIZE, op::SHORT_BINUNICODE, 4]);
        d.extend(b"eval");
        d.extend([op::MEMOIZE, op::STACK_GLOBAL]);
        d.extend([op::SHORT_BINUNICODE, 1, b'1', 0x85, b'R', b'.']);
        assert_eq!(refused_global(&d), "builtins.eval");
    }

    #[test]
    fn dotted_names_reaching_through_allowed_globals_are_refused() {
        // Python's unpickler resolves a dotted name attribute by attribute (protocol 4),
        // so `OrderedDict.__init__.__globals__` would reach a module's globals: only
        // whole (module, name) pairs on the list are allowed.
        for (module, name) in [
            ("collections", "OrderedDict.__init__.__globals__"),
            ("torch._utils", "_rebuild_tensor_v2.__globals__"),
            ("torch", "FloatStorage.__new__"),
            ("torch", "_utils.os.system"),
        ] {
            let mut d = vec![0x80, 4, op::SHORT_BINUNICODE, module.len() as u8];
            d.extend(module.as_bytes());
            d.extend([op::SHORT_BINUNICODE, name.len() as u8]);
            d.extend(name.as_bytes());
            d.extend([op::STACK_GLOBAL, b'.']);
            assert_eq!(refused_global(&d), format!("{module}.{name}"));
        }
        assert_eq!(
            refused_global(b"\x80\x02ccollections\nOrderedDict.__init__.__globals__\n."),
            "collections.OrderedDict.__init__.__globals__"
        );
    }

    #[test]
    fn posix_system_is_refused() {
        let d = b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00ls\x85R.";
        assert_eq!(refused_global(d), "posix.system");
    }

    #[test]
    fn reduce_chain_hidden_inside_a_state_dict_is_refused() {
        // A state dict whose value is `__reduce__`d to
        // builtins.getattr(builtins.__import__('os'), 'system')('id'): the first
        // global met is refused before any value is built from it.
        let mut d = vec![0x80, 2, op::EMPTY_DICT];
        d.extend(unicode("model.weight"));
        d.extend(b"cbuiltins\ngetattr\n");
        d.extend(b"cbuiltins\n__import__\n");
        d.extend(unicode("os"));
        d.extend(b"\x85R");
        d.extend(unicode("system"));
        d.extend(b"\x86R");
        d.extend(unicode("id"));
        d.extend(b"\x85Rs.");
        assert_eq!(refused_global(&d), "builtins.getattr");
    }

    #[test]
    fn lightning_training_state_is_read_as_opaque_placeholders() {
        // {"global_step": numpy.core.multiarray.scalar(numpy.dtype("i8", False, True), b"..."),
        //  "callbacks": ModelCheckpoint.__new__() with BUILD state}
        let mut d = b"\x80\x02}(".to_vec();
        d.extend(unicode("global_step"));
        d.extend(b"cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\n");
        d.extend(unicode("i8"));
        d.extend(b"\x89\x88\x87RC\x08\x01\x00\x00\x00\x00\x00\x00\x00\x86R");
        d.extend(unicode("callbacks"));
        d.extend(b"cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n)\x81}bu.");
        let u = run(&d).unwrap();
        let Object::Dict(items) = u.get(u.root()) else {
            panic!("root is not a dict")
        };
        assert_eq!(items.len(), 2);
        assert!(items
            .iter()
            .all(|(_, v)| matches!(u.get(*v), Object::Opaque(_))));
    }

    #[test]
    fn other_lightning_numpy_and_torch_globals_are_refused() {
        assert_eq!(
            refused_global(b"\x80\x02cpytorch_lightning.trainer\nTrainer\n."),
            "pytorch_lightning.trainer.Trainer"
        );
        assert_eq!(
            refused_global(b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n."),
            "numpy.core.multiarray._reconstruct"
        );
        assert_eq!(refused_global(b"\x80\x02ctorch\nload\n."), "torch.load");
        assert_eq!(
            refused_global(b"\x80\x02ctorch._utils\n_rebuild_device_tensor_from_numpy\n."),
            "torch._utils._rebuild_device_tensor_from_numpy"
        );
    }

    #[test]
    fn calling_a_storage_class_or_reducing_a_non_global_is_an_error() {
        let e = run(b"\x80\x02ctorch\nFloatStorage\n)R.")
            .unwrap_err()
            .to_string();
        assert!(e.contains("torch.FloatStorage"), "{e}");
        let e = run(b"\x80\x02K\x01)R.").unwrap_err().to_string();
        assert!(e.contains("not callable"), "{e}");
    }

    #[test]
    fn huge_long_binput_index_uses_no_memory_and_unknown_get_is_an_error() {
        let ok = run(b"\x80\x02K\x07r\xff\xff\xff\xff0j\xff\xff\xff\xff.").unwrap();
        assert!(matches!(ok.get(ok.root()), Object::Int(7)));
        let e = run(b"\x80\x02K\x07r\xff\xff\xff\xffj\xfe\xff\xff\xff.")
            .unwrap_err()
            .to_string();
        assert!(e.contains("memo key 4294967294"), "{e}");
    }

    #[test]
    fn mark_nesting_bomb_is_refused() {
        let mut d = vec![0x80, 2];
        d.extend(std::iter::repeat_n(op::MARK, 1_000_000));
        let e = run(&d).unwrap_err().to_string();
        assert!(e.contains("nested deeper"), "{e}");
    }

    #[test]
    fn deeply_nested_lists_parse_without_recursion() {
        let n = 200_000;
        let mut d = vec![0x80, 2];
        d.extend(std::iter::repeat_n(op::EMPTY_LIST, n));
        d.extend(std::iter::repeat_n(op::APPEND, n - 1));
        d.push(op::STOP);
        let u = run(&d).unwrap();
        assert_eq!(u.len(), n);
        drop(u);
    }

    #[test]
    fn dup_bomb_stays_linear() {
        // Each DUP pushes a reference, never a copy; a list may even hold itself.
        let mut d = vec![0x80, 2, op::EMPTY_LIST, op::BINPUT, 0];
        for _ in 0..20 {
            d.extend([
                op::MARK,
                op::BINGET,
                0,
                op::BINGET,
                0,
                op::BINGET,
                0,
                op::BINGET,
                0,
                op::APPENDS,
                op::DUP,
                op::POP,
            ]);
        }
        d.push(op::STOP);
        let u = run(&d).unwrap();
        assert_eq!(u.len(), 1);
        assert!(matches!(u.get(u.root()), Object::List(v) if v.len() == 80));
    }

    #[test]
    fn stack_cap_is_enforced() {
        let mut d = vec![0x80, 2, op::EMPTY_LIST];
        d.extend(std::iter::repeat_n(op::DUP, MAX_STACK + 1));
        let e = run(&d).unwrap_err().to_string();
        assert!(e.contains("value stack deeper"), "{e}");
    }

    #[test]
    fn truncated_pickles_are_errors() {
        let full = state_dict_pickle(
            &[
                ("a.weight", DType::F16, &[3, 4][..]),
                ("b", DType::F32, &[][..]),
            ],
            true,
        )
        .unwrap();
        assert!(run(&full).is_ok());
        for n in 0..full.len() {
            let r = run(&full[..n]);
            assert!(r.is_err(), "prefix of {n} bytes parsed");
        }
    }

    #[test]
    fn huge_declared_lengths_are_errors() {
        for d in [
            &b"\x80\x02X\xff\xff\xff\xffab."[..],
            b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xffab.",
            b"\x80\x04\x8e\x00\x00\x00\x00\x00\x00\x00\x80ab.",
            b"\x80\x02T\xff\xff\xff\xffab.",
            b"\x80\x02\x8b\xff\xff\xff\x7f.",
            b"\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\xff.",
        ] {
            assert!(run(d).is_err());
        }
    }

    #[test]
    fn unsupported_opcodes_are_named() {
        let e = run(b"\x80\x02ccollections\nOrderedDict\n)}\x92.")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("0x92") && e.contains("NEWOBJ_EX") && e.contains("byte 29"),
            "{e}"
        );
        let e = run(b"\x80\x02I1\n.").unwrap_err().to_string();
        assert!(e.contains("INT"), "{e}");
        let e = run(b"\x80\x06N.").unwrap_err().to_string();
        assert!(e.contains("protocol 6"), "{e}");
    }

    #[test]
    fn integers_decode_like_python() {
        let cases: &[(&[u8], i64)] = &[
            (b"\x8a\x00", 0),
            (b"\x8a\x01\xff", -1),
            (b"\x8a\x02\xff\x00", 255),
            (b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80", i64::MIN),
            (b"\x8a\x09\xff\xff\xff\xff\xff\xff\xff\x7f\x00", i64::MAX),
            (b"J\xfe\xff\xff\xff", -2),
            (b"M\x34\x12", 0x1234),
        ];
        for (enc, want) in cases {
            let mut d = vec![0x80, 2];
            d.extend(*enc);
            d.push(b'.');
            let u = run(&d).unwrap();
            match u.get(u.root()) {
                Object::Int(v) => assert_eq!(v, want),
                o => panic!("{o:?}"),
            }
        }
        let u = run(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00.").unwrap();
        assert!(matches!(u.get(u.root()), Object::BigInt));
        for v in [
            0i128,
            1,
            255,
            256,
            65535,
            65536,
            -1,
            i32::MIN as i128,
            i32::MAX as i128 + 1,
            i64::MAX as i128,
            i64::MIN as i128,
            -129,
            128,
        ] {
            let mut w = PickleWriter::new();
            w.int(v);
            let u = run(&w.finish()).unwrap();
            match u.get(u.root()) {
                Object::Int(x) => assert_eq!(*x as i128, v),
                o => panic!("{o:?}"),
            }
        }
    }

    #[test]
    fn written_state_dict_reads_back_as_tensors() {
        let shapes: Vec<Vec<usize>> = vec![vec![2, 3], vec![], vec![5], vec![1, 2, 3, 4, 5]];
        let items: Vec<(String, DType, &[usize])> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("t{i}"), DType::BF16, &s[..]))
            .collect();
        let refs: Vec<(&str, DType, &[usize])> =
            items.iter().map(|(n, d, s)| (n.as_str(), *d, *s)).collect();
        let u = run(&state_dict_pickle(&refs, false).unwrap()).unwrap();
        let Object::Dict(items) = u.get(u.root()) else {
            panic!()
        };
        assert_eq!(items.len(), 4);
        for (i, (k, v)) in items.iter().enumerate() {
            assert!(matches!(u.get(*k), Object::Str(s) if *s == format!("t{i}")));
            let Object::Tensor(t) = u.get(*v) else {
                panic!()
            };
            assert_eq!(t.shape, shapes[i]);
            assert_eq!(t.storage.key, i.to_string());
            assert_eq!(t.dtype, DType::BF16);
            assert!(t.is_contiguous());
        }
    }

    #[test]
    fn mutated_pickles_never_panic() {
        let base = state_dict_pickle(
            &[("x", DType::F32, &[2, 2][..]), ("y", DType::I64, &[3][..])],
            true,
        )
        .unwrap();
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut d = base.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % d.len();
                d[i] = next() as u8;
            }
            if next() % 3 == 0 {
                d.truncate((next() as usize) % d.len());
            }
            let _ = run(&d);
        }
    }

    #[test]
    fn rebuild_tensor_v3_takes_its_dtype_from_the_dtype_object() {
        let mut w = PickleWriter::new();
        w.global("torch._utils", "_rebuild_parameter_with_state", "p");
        w.mark();
        w.global("torch._utils", "_rebuild_tensor_v3", "v3");
        w.mark();
        w.mark();
        w.str("storage");
        w.global("torch", "UntypedStorage", "u");
        w.str("0");
        w.str("cpu");
        w.int(8);
        w.tuple();
        w.binpersid();
        w.int(1);
        w.int_tuple(&[3]);
        w.int_tuple(&[1]);
        w.bool(false);
        w.ordered_dict();
        w.global("torch", "bfloat16", "bf16");
        w.tuple();
        w.reduce();
        w.bool(true);
        w.ordered_dict();
        w.empty_dict();
        w.tuple();
        w.reduce();
        let u = run(&w.finish()).unwrap();
        let Object::Tensor(t) = u.get(u.root()) else {
            panic!("{:?}", u.get(u.root()))
        };
        assert_eq!(t.dtype, DType::BF16);
        assert_eq!(t.storage.dtype, DType::U8);
        assert_eq!((t.storage_offset, t.shape.as_slice()), (1, &[3usize][..]));
    }
}
