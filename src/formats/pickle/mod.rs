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
mod globals;
mod machine;
mod writer;

use std::path::Path;

use super::source::DType;
use crate::error::{Error, Result};

pub use globals::{storage_class_name, Global, INERT_GLOBALS};
pub use writer::{state_dict_pickle, PickleWriter};

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
    machine::Machine::new(path, what, data).run()
}

#[cfg(test)]
mod tests {
    use super::machine::op;
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
