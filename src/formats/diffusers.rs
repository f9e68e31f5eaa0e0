//! (being written) diffusers folders.
use std::path::Path;
use crate::error::{Error, Result};
use super::Checkpoint;
pub fn open(path: &Path) -> Result<Checkpoint> {
    Err(Error::format(path, "diffusers folders: not yet implemented"))
}
pub fn read_config(path: &Path) -> Result<crate::config::ModelConfig> {
    Err(Error::format(path, "diffusers folders: not yet implemented"))
}
pub fn write_atomic(out: &Path, _c: &crate::config::ModelConfig, _d: super::DType, _f: bool, _r: &mut dyn FnMut(&str) -> Result<Vec<f32>>) -> Result<()> {
    Err(Error::format(out, "not yet"))
}
