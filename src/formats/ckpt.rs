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
