//! (being written by the pickle/ckpt work) PyTorch zip checkpoints through the restricted unpickler.
use std::collections::BTreeMap;
use std::path::Path;
use crate::error::{Error, Result};
use super::{Checkpoint, SourceTensor};
pub fn open(path: &Path) -> Result<Checkpoint> {
    Err(Error::format(path, "torch zip checkpoints: not yet implemented"))
}
/// Same contract as `safetensors::read_tensors`: the flattened tensor directory of a torch zip file.
pub fn read_tensors(path: &Path) -> Result<(Vec<SourceTensor>, BTreeMap<String, String>)> {
    Err(Error::format(path, "torch zip checkpoints: not yet implemented"))
}
pub fn synth_write(out: &Path, _l: &[(String, Vec<usize>, super::DType)], _s: u64, _f: bool, _fill: &mut dyn FnMut(usize, &mut Vec<u8>) -> Result<()>) -> Result<()> {
    Err(Error::format(out, "not yet"))
}
