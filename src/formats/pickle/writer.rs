//! Pickles written the way `torch.save` writes a state dict (protocol 2), for the
//! converter's `.ckpt` output and for tests.
use std::collections::HashMap;

use super::globals::storage_class_name;
use super::machine::op;
use super::DType;
use crate::error::{Error, Result};

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
