//! (placeholder until the layout branch lands)
use crate::config::ModelConfig;
pub struct TensorSpec { pub name: String, pub shape: Vec<usize> }
pub fn layout(_cfg: &ModelConfig) -> Vec<TensorSpec> { Vec::new() }
pub fn extra_reason(_name: &str) -> Option<&'static str> { None }
pub fn unused_reason(_cfg: &ModelConfig, _name: &str) -> Option<String> { None }
