//! A1111's "infotext": the parameters of an image as one text, in the form A1111's
//! "PNG Info" tab, civitai and other tools read back (prompt, `Negative prompt:`, then
//! `Key: value` pairs). Hashes follow A1111: the model's and embeddings' are the
//! SHA-256 of the file, a safetensors LoRA's the SHA-256 of its data after the header
//! (the "addnet" hash, so editing its metadata keeps it), cut to 10 or 12 digits.
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::lora::RequestLora;
use super::{Request, RngKind};
use crate::prompt::Emphasis;
use crate::sample::{Schedule, Spacing};

/// What an image's infotext records beyond its request.
pub(super) struct Record<'a> {
    pub req: &'a Request,
    pub width: usize,
    pub height: usize,
    pub strength: f64,
    pub model_hash: &'a str,
    pub model_name: &'a str,
    pub loras: &'a [RequestLora],
    /// The textual-inversion embeddings the prompts used: (trigger name, file).
    pub embeddings: Vec<(&'a str, &'a Path)>,
}

impl RngKind {
    /// A1111's name for the generator ("Random number generator source": `CPU` is
    /// torch's CPU generator, `NV` its CPU copy of the CUDA generator).
    pub fn infotext_name(self) -> &'static str {
        match self {
            RngKind::Torch => "CPU",
            RngKind::Cuda => "NV",
            RngKind::Native => "sdrs",
        }
    }
}

impl Record<'_> {
    pub fn render(&self) -> String {
        let req = self.req;
        let sampler = req.sampling.sampler.info().display;
        let mut pairs: Vec<(&str, String)> = vec![("Steps", req.steps.to_string())];
        pairs.push(("Sampler", sampler.into()));
        if !(req.sampling.sampler.has_own_timesteps()
            || req.sampling.schedule == Schedule::Discrete(Spacing::Linspace))
        {
            pairs.push((
                "Schedule type",
                schedule_label(req.sampling.schedule).into(),
            ));
        }
        pairs.push(("CFG scale", req.cfg_scale.to_string()));
        pairs.push(("Seed", req.seed.to_string()));
        pairs.push(("Size", format!("{}x{}", self.width, self.height)));
        pairs.push(("Model hash", self.model_hash.into()));
        pairs.push(("Model", self.model_name.into()));
        if let Some(init) = req.canvas() {
            pairs.push(("Denoising strength", self.strength.to_string()));
            if init.mask.is_some() {
                pairs.push(("Mask blur", init.mask_blur.to_string()));
            }
        }
        if req.prompting.clip_skip > 1 {
            pairs.push(("Clip skip", req.prompting.clip_skip.to_string()));
        }
        if req.prompting.emphasis != Emphasis::Original {
            pairs.push(("Emphasis", req.prompting.emphasis.name().into()));
        }
        pairs.push(("RNG", req.sampling.rng.infotext_name().into()));
        // As A1111's ControlNet extension writes its units.
        let units: Vec<(String, String)> = req
            .controls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let hash = c.net.source_hash();
                let model = match hash.is_empty() {
                    true => c.net.name(),
                    false => format!("{} [{hash}]", c.net.name()),
                };
                let mode = if c.guess {
                    "ControlNet is more important"
                } else {
                    "Balanced"
                };
                (
                    format!("ControlNet {i}"),
                    quoted(&format!(
                        "Module: {}, Model: {model}, Weight: {}, Resize Mode: Crop and Resize, Guidance Start: {}, Guidance End: {}, Control Mode: {mode}",
                        c.module, c.strength, c.start, c.end
                    )),
                )
            })
            .collect();
        let loras: Vec<String> = self
            .loras
            .iter()
            .map(|l| format!("{}: {}", l.name, lora_hash(&l.path)))
            .collect();
        if !loras.is_empty() {
            pairs.push(("Lora hashes", quoted(&loras.join(", "))));
        }
        let tis: Vec<String> = self
            .embeddings
            .iter()
            .map(|(name, path)| format!("{name}: {}", file_hash(path, 0).unwrap_or_default()))
            .collect();
        if !tis.is_empty() {
            pairs.push(("TI hashes", quoted(&tis.join(", "))));
        }
        pairs.push(("Version", format!("sdrs {}", env!("CARGO_PKG_VERSION"))));
        let mut line: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let at = line.len() - 1;
        line.splice(at..at, units.iter().map(|(k, v)| format!("{k}: {v}")));
        format!(
            "{}\nNegative prompt: {}\n{}",
            req.prompt,
            req.negative,
            line.join(", ")
        )
    }
}

/// A1111's label for a schedule where it has one (its "Schedule type" names).
fn schedule_label(s: Schedule) -> &'static str {
    match s {
        Schedule::Karras => "Karras",
        Schedule::Exponential => "Exponential",
        Schedule::SgmUniform => "SGM Uniform",
        Schedule::Simple => "Simple",
        Schedule::Ays => "Align Your Steps",
        other => other.name(),
    }
}

/// A value with commas or colons in double quotes, as A1111 writes them.
fn quoted(v: &str) -> String {
    format!("\"{}\"", v.replace('"', "'"))
}

/// The first 12 hex digits of the SHA-256 of `path` from byte `skip` on.
fn file_hash(path: &Path, skip: u64) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    std::io::copy(&mut (&mut f).take(skip), &mut std::io::sink()).ok()?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).ok()?;
    Some(
        h.finalize()
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// A LoRA's hash as A1111 shows it: a safetensors file's data after its header
/// (8-byte length, then that many bytes of JSON); any other file whole.
fn lora_hash(path: &Path) -> String {
    let header = || -> Option<u64> {
        if path.extension()?.to_str()? != "safetensors" {
            return None;
        }
        let mut n = [0u8; 8];
        std::fs::File::open(path).ok()?.read_exact(&mut n).ok()?;
        Some(8 + u64::from_le_bytes(n))
    };
    file_hash(path, header().unwrap_or(0)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_safetensors_lora_is_hashed_without_its_header_and_other_files_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            dir.path().join("a.safetensors"),
            dir.path().join("b.safetensors"),
        );
        let file = |header: &str| {
            [
                (header.len() as u64).to_le_bytes().to_vec(),
                header.as_bytes().to_vec(),
                vec![1, 2, 3],
            ]
            .concat()
        };
        std::fs::write(&a, file("{\"x\":1}")).unwrap();
        std::fs::write(&b, file("{\"__metadata__\":{\"n\":\"y\"}}")).unwrap();
        assert_eq!(lora_hash(&a), lora_hash(&b));
        assert_eq!(lora_hash(&a).len(), 12);
        let pt = dir.path().join("c.pt");
        std::fs::write(&pt, file("{\"x\":1}")).unwrap();
        assert_ne!(lora_hash(&pt), lora_hash(&a));
        assert_eq!(quoted("n: abc, m: def"), "\"n: abc, m: def\"");
    }
}
