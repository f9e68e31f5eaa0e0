//! A request's LoRAs, applied at run time ([`Adapters`]): files given with the request,
//! and names from the prompt's `<lora:NAME:MULTIPLIER>` tags, found in the request's
//! LoRA folder.
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::lora::Lora;
use crate::model::Adapters;
use crate::prompt::take_loras;

use super::{Pipeline, Request};

/// File extensions a LoRA name is looked up with, in this order.
const EXTENSIONS: &[&str] = &["safetensors", "pt", "ckpt", "bin"];

/// `dir/NAME.ext` for the first extension that exists. Names are file stems: a name
/// with a path in it could reach outside the folder, and is refused.
fn find(dir: &Path, name: &str) -> Result<PathBuf> {
    if name.contains(['/', '\\']) || name == "." || name == ".." || name.contains('\0') {
        return Err(Error::Invalid(format!("prompt: LoRA name `{name}` is not a plain file name")));
    }
    EXTENSIONS
        .iter()
        .map(|ext| dir.join(format!("{name}.{ext}")))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Invalid(format!("prompt: no LoRA `{name}` in {} (looked for {name}.{{{}}})", dir.display(), EXTENSIONS.join(","))))
}

impl Pipeline {
    /// The request's LoRAs with their multipliers: its files, then the prompt's tags.
    pub(super) fn request_loras(&self, req: &Request) -> Result<Vec<(Lora, f32)>> {
        let mut out = Vec::new();
        for (path, multiplier) in &req.loras {
            out.push((Lora::open(path, &self.config)?, *multiplier));
        }
        let (_, tags) = take_loras(&req.prompt)?;
        for tag in tags {
            let Some(dir) = &req.lora_dir else {
                return Err(Error::Invalid(format!("the prompt names LoRA `{}` but the request has no LoRA folder (lora_dir; --lora-dir on the command line)", tag.name)));
            };
            out.push((Lora::open(&find(dir, &tag.name)?, &self.config)?, tag.multiplier));
        }
        Ok(out)
    }

    /// The branches of `loras` on the weights `keep` picks.
    pub(super) fn adapters(&self, loras: &[(Lora, f32)], keep: impl Fn(&str) -> bool) -> Result<Option<Adapters>> {
        let refs: Vec<(&Lora, f32)> = loras.iter().map(|(l, m)| (l, *m)).collect();
        Adapters::new(&refs, keep, &self.backend)
    }
}
