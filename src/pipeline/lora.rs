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
        return Err(Error::Invalid(format!(
            "prompt: LoRA name `{name}` is not a plain file name"
        )));
    }
    EXTENSIONS
        .iter()
        .map(|ext| dir.join(format!("{name}.{ext}")))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "prompt: no LoRA `{name}` in {} (looked for {name}.{{{}}})",
                dir.display(),
                EXTENSIONS.join(",")
            ))
        })
}

/// A LoRA of a request, with its multipliers on the text encoders and the UNet.
pub(super) struct RequestLora {
    pub lora: Lora,
    /// The name the infotext gives it: the prompt tag's, else the file's stem.
    pub name: String,
    pub path: PathBuf,
    pub te: f32,
    pub unet: f32,
}

/// Which part of the model a LoRA branch adapts (each has its own multiplier).
#[derive(Clone, Copy)]
pub(super) enum Part {
    Text,
    Unet,
}

impl Pipeline {
    /// The request's LoRAs with their multipliers: its files, then the prompt's tags.
    pub(super) fn request_loras(&self, req: &Request) -> Result<Vec<RequestLora>> {
        let mut out = Vec::new();
        for (path, multiplier) in &req.loras {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push(RequestLora {
                lora: Lora::open(path, &self.config)?,
                name,
                path: path.clone(),
                te: *multiplier,
                unet: *multiplier,
            });
        }
        let (_, tags) = take_loras(&req.prompt)?;
        for tag in tags {
            let Some(dir) = &req.prompting.lora_dir else {
                return Err(Error::Invalid(format!("the prompt names LoRA `{}` but the request has no LoRA folder (lora_dir; --lora-dir on the command line)", tag.name)));
            };
            let path = find(dir, &tag.name)?;
            out.push(RequestLora {
                lora: Lora::open(&path, &self.config)?,
                name: tag.name,
                path,
                te: tag.te,
                unet: tag.unet,
            });
        }
        Ok(out)
    }

    /// The branches of `loras` on the weights `keep` picks.
    pub(super) fn adapters(
        &self,
        loras: &[RequestLora],
        part: Part,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Option<Adapters>> {
        let refs: Vec<(&Lora, f32)> = loras
            .iter()
            .map(|l| {
                (
                    &l.lora,
                    match part {
                        Part::Text => l.te,
                        Part::Unet => l.unet,
                    },
                )
            })
            .collect();
        Adapters::new(&refs, keep, &self.backend)
    }
}
