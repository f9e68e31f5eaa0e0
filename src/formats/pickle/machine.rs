//! The pickle machine: opcodes read one at a time into the arena of plain values,
//! with every bound of the module's docs checked as it goes.
use std::collections::HashMap;
use std::path::Path;

use super::globals::Global;
use super::{
    ObjId, Object, StorageRef, TensorRef, Unpickled, MAX_LINE, MAX_LONG_BYTES, MAX_MARKS,
    MAX_OBJECTS, MAX_STACK,
};
use crate::error::{Error, Result};

// Opcodes (see Python's `pickletools` for their documentation).
pub(super) mod op {
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

pub(super) struct Machine<'a> {
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
    pub(super) fn new(path: &'a Path, what: &'a str, data: &'a [u8]) -> Self {
        Machine {
            path,
            what,
            data,
            pos: 0,
            op_pos: 0,
            objects: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

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

    pub(super) fn run(&mut self) -> Result<Unpickled> {
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
