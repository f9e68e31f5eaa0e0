//! (placeholder until the layout branch lands)
use crate::config::ModelConfig;
pub fn detect(_t: &[(&str, &[usize])]) -> Result<ModelConfig, String> { Err("detection not yet available".into()) }
