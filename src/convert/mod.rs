//! Checkpoint → GGUF conversion: plan every tensor's type, then stream them into a
//! temporary file that is renamed over the target only when complete.
use crate::formats::gguf::metadata;
pub mod policy;
mod quantize;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::config::{ControlConfig, Defaults, ModelConfig, NoiseSchedule, Prediction};
use crate::error::{Error, Result};
use crate::formats::gguf::{GgufFile, TensorEntry, Value, Writer};
use crate::formats::source::SourceFormat;
use crate::formats::{layout, Checkpoint, SourceTensor, TensorData};
use crate::staged::Staged;
use crate::vocab::ClipVocab;
pub use policy::{Decision, Policy, Rule};

const SOURCE_SHA256: &str = "sd.source.sha256";

/// One tensor of the output.
#[derive(Clone, Debug)]
pub struct PlanEntry {
    /// Index into the checkpoint's tensors.
    pub index: usize,
    pub name: String,
    /// Shape in PyTorch order, as the architecture defines it.
    pub shape: Vec<usize>,
    pub decision: Decision,
    pub nbytes: u64,
}

/// What a conversion will do, before it does it.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The model's config; for a ControlNet, its encoder's as a model without text
    /// encoder or VAE (see `control`).
    pub config: ModelConfig,
    /// The ControlNet this plan converts, where it converts one.
    pub control: Option<ControlConfig>,
    /// The upscaler this plan converts, where it converts one.
    pub upscaler: Option<crate::config::UpscalerArch>,
    pub entries: Vec<PlanEntry>,
    /// Tensors left out, with the reason.
    pub dropped: Vec<(String, String)>,
    /// Tensors kept although the architecture does not name them.
    pub unknown: Vec<String>,
    pub source_bytes: u64,
    /// Run defaults written to the output: the source's, overridable before `run`.
    pub defaults: Defaults,
    /// LoRAs merged into the weights they adapt, with their multipliers.
    pub merges: Vec<Merge>,
}

/// A LoRA merged at conversion: every adapted weight becomes `W + multiplier ·
/// alpha/rank · up · down` before it is stored in its type.
#[derive(Clone, Debug)]
pub struct Merge {
    pub lora: std::sync::Arc<crate::lora::Lora>,
    pub multiplier: f32,
}

impl Plan {
    /// Maps `path` onto this plan's architecture and merges it with `multiplier`.
    pub fn merge_lora(&mut self, path: &Path, multiplier: f32) -> Result<()> {
        if !multiplier.is_finite() {
            return Err(Error::Invalid(format!(
                "{}: LoRA multiplier {multiplier} is not a number",
                path.display()
            )));
        }
        let lora = crate::lora::Lora::open(path, &self.config)?;
        let names: HashSet<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
        if let Some(p) = lora
            .pairs
            .iter()
            .find(|p| !names.contains(p.target.weight.as_str()))
        {
            return Err(Error::arch(
                path,
                format!(
                    "`{}` adapts `{}`, which this checkpoint does not store",
                    p.key, p.target.weight
                ),
            ));
        }
        self.merges.push(Merge {
            lora: std::sync::Arc::new(lora),
            multiplier,
        });
        Ok(())
    }
}

impl Plan {
    pub fn output_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.nbytes).sum()
    }
    /// Count and bytes per stored type, largest first.
    pub fn by_type(&self) -> Vec<(crate::ggml::Type, usize, u64)> {
        let mut m: HashMap<crate::ggml::Type, (usize, u64)> = HashMap::new();
        for e in &self.entries {
            let x = m.entry(e.decision.ty).or_default();
            x.0 += 1;
            x.1 += e.nbytes;
        }
        let mut v: Vec<_> = m.into_iter().map(|(t, (n, b))| (t, n, b)).collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.2));
        v
    }
}

/// The run defaults a source carries: our GGUF's metadata, or what a diffusers
/// folder's configs imply; single files carry none.
fn source_defaults(ck: &Checkpoint) -> Result<Defaults> {
    Ok(match ck.format {
        SourceFormat::Gguf => metadata::read_defaults(&GgufFile::open(&ck.path)?),
        SourceFormat::Diffusers => crate::formats::diffusers::read_defaults(&ck.path),
        _ => Defaults::default(),
    })
}

/// Decides what each tensor becomes. Fails if the checkpoint lacks tensors its
/// architecture needs or has a tensor of the wrong shape.
pub fn plan(ck: &Checkpoint, policy: &Policy, config: Option<ModelConfig>) -> Result<Plan> {
    let config = match config {
        Some(c) => c,
        None => ck.model_config()?,
    };
    let expected: HashMap<String, Vec<usize>> = layout::layout(&config)?
        .into_iter()
        .map(|s| (s.name, s.shape))
        .collect();
    let mut entries = Vec::new();
    let mut dropped = Vec::new();
    let mut unknown = Vec::new();
    let mut seen = HashSet::new();
    let mut source_bytes = 0;
    for (index, t) in ck.tensors.iter().enumerate() {
        if let Some(shape) = expected.get(&t.name) {
            let numel: usize = shape.iter().product();
            if *shape != t.shape && numel as u64 != t.numel() {
                return Err(Error::arch(
                    &ck.path,
                    format!(
                        "tensor `{}` has shape {:?}; the {} architecture needs {:?}",
                        t.name, t.shape, config.family, shape
                    ),
                ));
            }
            seen.insert(t.name.as_str());
        } else if let Some(why) = layout::extra_reason(&t.name)
            .map(str::to_string)
            .or_else(|| layout::unused_by(&config, &t.name).map(str::to_string))
        {
            dropped.push((t.name.clone(), why));
            continue;
        } else {
            unknown.push(t.name.clone());
        }
        if !t.dtype.is_float()
            && !matches!(
                t.dtype,
                crate::formats::DType::I64 | crate::formats::DType::I32
            )
        {
            return Err(Error::format(
                &ck.path,
                format!(
                    "tensor `{}` has type {} which cannot be converted",
                    t.name,
                    t.dtype.name()
                ),
            ));
        }
        // Our own GGUF stores kernels flattened; plan on the original shape.
        let shape = expected
            .get(&t.name)
            .cloned()
            .unwrap_or_else(|| t.shape.clone());
        source_bytes += t.nbytes();
        entries.push(entry(index, t, shape, policy)?);
    }
    let mut missing: Vec<&str> = expected
        .keys()
        .map(String::as_str)
        .filter(|n| !seen.contains(n))
        .collect();
    if !missing.is_empty() {
        missing.sort();
        let n = missing.len();
        missing.truncate(5);
        return Err(Error::arch(
            &ck.path,
            format!(
                "{n} tensors of the detected {} architecture are missing, e.g. {}",
                config.family,
                missing.join(", ")
            ),
        ));
    }
    Ok(Plan {
        config,
        control: None,
        upscaler: None,
        entries,
        dropped,
        unknown,
        source_bytes,
        defaults: source_defaults(ck)?,
        merges: Vec::new(),
    })
}

/// Decides what each tensor of a ControlNet ([`crate::formats::control::open`])
/// becomes; its base model's weights in a ControlNet 1.0 file are left out.
pub fn plan_control(src: &crate::formats::control::Source, policy: &Policy) -> Result<Plan> {
    let (entries, source_bytes) = plan_all(&src.checkpoint, policy)?;
    let c = &src.config;
    Ok(Plan {
        control: Some(c.clone()),
        dropped: src.dropped.clone(),
        entries,
        source_bytes,
        ..described(&c.family, c.unet.clone())
    })
}

/// Decides what each tensor of an ESRGAN-family upscaler (names as
/// [`crate::model::esrgan::read_checkpoint`] gives them) becomes.
pub fn plan_upscaler(
    ck: &Checkpoint,
    arch: &crate::config::UpscalerArch,
    policy: &Policy,
) -> Result<Plan> {
    let (entries, source_bytes) = plan_all(ck, policy)?;
    Ok(Plan {
        upscaler: Some(arch.clone()),
        entries,
        source_bytes,
        ..described("esrgan", ModelConfig::sd1().unet)
    })
}

/// A plan of nothing yet for a file that is not a model: `config` holds only the
/// family (and `unet`, what the plan describes of a network, for printing).
fn described(family: &str, unet: crate::config::UnetConfig) -> Plan {
    Plan {
        config: ModelConfig {
            family: family.to_string(),
            prediction: Prediction::Epsilon,
            zero_terminal_snr: false,
            zeros_for_empty_negative: false,
            schedule: NoiseSchedule::default(),
            unet,
            vae: None,
            text_encoders: Vec::new(),
        },
        control: None,
        upscaler: None,
        entries: Vec::new(),
        dropped: Vec::new(),
        unknown: Vec::new(),
        source_bytes: 0,
        defaults: Defaults::default(),
        merges: Vec::new(),
    }
}

/// Every float tensor of `ck` planned by `policy`, and their bytes in the source.
fn plan_all(ck: &Checkpoint, policy: &Policy) -> Result<(Vec<PlanEntry>, u64)> {
    let mut entries = Vec::with_capacity(ck.tensors.len());
    let mut source_bytes = 0;
    for (index, t) in ck.tensors.iter().enumerate() {
        if !t.dtype.is_float() {
            return Err(Error::format(
                &ck.path,
                format!(
                    "tensor `{}` has type {} which cannot be converted",
                    t.name,
                    t.dtype.name()
                ),
            ));
        }
        source_bytes += t.nbytes();
        entries.push(entry(index, t, t.shape.clone(), policy)?);
    }
    Ok((entries, source_bytes))
}

/// What `policy` makes of tensor `index` of the source, `t`, of (PyTorch) `shape`.
fn entry(index: usize, t: &SourceTensor, shape: Vec<usize>, policy: &Policy) -> Result<PlanEntry> {
    let decision = policy.decide(&t.name, &shape);
    let nbytes = decision.ty.bytes_for(t.numel()).ok_or_else(|| {
        Error::Invalid(format!(
            "tensor `{}`: {} elements do not fit {}",
            t.name,
            t.numel(),
            decision.ty.name()
        ))
    })?;
    Ok(PlanEntry {
        index,
        name: t.name.clone(),
        shape,
        decision,
        nbytes,
    })
}

/// Conversion progress, reported after each chunk.
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    pub tensor: &'a str,
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub tensors: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub seconds: f64,
    pub sha256: String,
}

/// `ck` converted to a GGUF of float weights (f16, norms in f32) in a temporary file
/// that is unlinked as soon as it is mapped: what `generate -m model.safetensors`
/// runs without a `convert` step. The weights' pages are the page cache's, so the
/// kernel can evict them under pressure as it does a converted file's; the disk space
/// is returned when the mapping goes. `$TMPDIR` (else `/tmp`) holds the file.
pub fn to_temporary(
    ck: &Checkpoint,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<GgufFile> {
    let plan = plan(ck, &Policy::new(crate::ggml::Type::F16), None)?;
    let dir = tempfile::Builder::new()
        .prefix("sdrs-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let out = dir.path().join("model.gguf");
    run(ck, &plan, "f16", &out, false, cancel, progress)?;
    let mut gguf = GgufFile::open(&out)?;
    // Messages and the infotext name the file the user gave.
    gguf.path = ck.path.clone();
    Ok(gguf)
}

/// A ControlNet converted as [`to_temporary`] converts a model.
pub fn control_to_temporary(
    src: &crate::formats::control::Source,
    cancel: &AtomicBool,
) -> Result<GgufFile> {
    let plan = plan_control(src, &Policy::new(crate::ggml::Type::F16))?;
    let dir = tempfile::Builder::new()
        .prefix("sdrs-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let out = dir.path().join("controlnet.gguf");
    run(
        &src.checkpoint,
        &plan,
        "f16",
        &out,
        false,
        cancel,
        &mut |_| {},
    )?;
    let mut gguf = GgufFile::open(&out)?;
    gguf.path = src.checkpoint.path.clone();
    Ok(gguf)
}

/// sha256 of the files a checkpoint reads from, in order.
fn source_digest(ck: &Checkpoint) -> Result<String> {
    let mut files: Vec<&Path> = Vec::new();
    fn collect<'a>(t: &'a SourceTensor, out: &mut Vec<&'a Path>) {
        match &t.data {
            TensorData::Raw { file, .. } => {
                if !out.contains(&file.path.as_path()) {
                    out.push(&file.path);
                }
            }
            TensorData::Concat(p) => p.iter().for_each(|t| collect(t, out)),
            TensorData::Transpose(t) | TensorData::Interleaved(t) => collect(t, out),
        }
    }
    for t in &ck.tensors {
        collect(t, &mut files);
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for p in files {
        let mut f = File::open(p).map_err(|e| Error::io(p, e))?;
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(p, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The metadata a converted file carries.
fn output_metadata(
    ck: &Checkpoint,
    plan: &Plan,
    wtype: &str,
    sha256: &str,
) -> Result<Vec<(String, Value)>> {
    let mut kv = match (&plan.control, &plan.upscaler) {
        (Some(c), _) => metadata::control_kv(c),
        (None, Some(u)) => metadata::upscaler_kv(u),
        (None, None) => metadata::config_kv(&plan.config),
    };
    let source_name = ck
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    kv.push((
        "general.name".into(),
        Value::String(
            ck.path
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
    ));
    kv.push(("general.quantization_version".into(), Value::U32(2)));
    kv.push(("sd.weight_type".into(), Value::String(wtype.into())));
    kv.push(("sd.source.file".into(), Value::String(source_name)));
    kv.push((SOURCE_SHA256.into(), Value::String(sha256.into())));
    kv.push((
        "sd.converter".into(),
        Value::String(format!("sdrs {}", env!("CARGO_PKG_VERSION"))),
    ));
    // A ControlNet reads the model's text conditioning: it has no tokenizer or
    // run defaults of its own.
    if plan.control.is_none() && plan.upscaler.is_none() {
        let vocab = match ck.tokenizer.as_ref().and_then(|t| t.merges_txt.as_deref()) {
            Some(m) => ClipVocab::from_merges_txt(m)?,
            None => match ck.format {
                SourceFormat::Gguf => metadata::read_tokenizer(&GgufFile::open(&ck.path)?)
                    .map_or_else(ClipVocab::embedded, Ok)?,
                _ => ClipVocab::embedded()?,
            },
        };
        kv.extend(metadata::tokenizer_kv(&vocab));
        kv.extend(metadata::defaults_kv(&plan.defaults));
    }
    let reshaped: Vec<(String, Vec<usize>)> = plan
        .entries
        .iter()
        .filter(|e| e.decision.reshaped)
        .map(|e| (e.name.clone(), e.shape.clone()))
        .collect();
    kv.extend(metadata::reshaped_kv(&reshaped));
    let interleaved: Vec<String> = plan
        .entries
        .iter()
        .filter(|e| e.decision.interleaved)
        .map(|e| e.name.clone())
        .collect();
    if !interleaved.is_empty() {
        kv.push((
            crate::formats::gguf::INTERLEAVED_Q4_0.into(),
            Value::string_array(interleaved),
        ));
    }
    if !plan.merges.is_empty() {
        let merged: Vec<String> = plan
            .merges
            .iter()
            .map(|m| {
                format!(
                    "{}:{}",
                    m.lora
                        .path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    m.multiplier
                )
            })
            .collect();
        kv.push(("sd.lora.merged".into(), Value::String(merged.join(", "))));
    }
    Ok(kv)
}

/// Runs a plan, writing `out` atomically.
pub fn run(
    ck: &Checkpoint,
    plan: &Plan,
    wtype: &str,
    out: &Path,
    force: bool,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary> {
    let start = Instant::now();
    let staged = Staged::new(out, force)?;
    // The input's digest goes into the header, but hashing 2 GB takes seconds: it
    // runs on another thread while the tensors stream, and its placeholder in the
    // header is overwritten at the end.
    std::thread::scope(|scope| {
        let hasher = scope.spawn(|| source_digest(ck));
        let written = write_tensors(ck, plan, wtype, &staged, out, cancel, progress);
        let sha256 = hasher
            .join()
            .map_err(|_| Error::Invalid("hashing thread panicked".into()))??;
        let (offset, bytes_out) = written?;
        use std::os::unix::fs::FileExt;
        staged
            .file()
            .write_all_at(sha256.as_bytes(), offset)
            .map_err(|e| Error::io(out, e))?;
        staged.commit()?;
        Ok(Summary {
            tensors: plan.entries.len(),
            bytes_in: plan.source_bytes,
            bytes_out,
            seconds: start.elapsed().as_secs_f64(),
            sha256,
        })
    })
}

/// Streams header and tensors into the staged file; returns the offset of the
/// digest placeholder and the file size.
fn write_tensors(
    ck: &Checkpoint,
    plan: &Plan,
    wtype: &str,
    staged: &Staged,
    out: &Path,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(u64, u64)> {
    let kv = output_metadata(ck, plan, wtype, &"0".repeat(64))?;
    let entries: Vec<TensorEntry> = plan
        .entries
        .iter()
        .map(|e| TensorEntry {
            name: e.name.clone(),
            ne: e.decision.ne.clone(),
            ty: e.decision.ty,
        })
        .collect();
    for t in plan.by_type() {
        crate::ggml::quantize_init(t.0);
    }
    let out_err = |e: Error| match e {
        Error::Io { err: source, .. } => Error::io(out, source),
        other => other,
    };
    let mut w = Writer::new(
        BufWriter::with_capacity(8 << 20, staged.file()),
        &kv,
        &entries,
        None,
    )
    .map_err(out_err)?;
    let digest_at = w
        .string_value_offset(SOURCE_SHA256)
        .ok_or_else(|| Error::Invalid("digest key missing from header".into()))?;
    let mut bytes_done = 0u64;
    let mut scratch = quantize::Scratch::default();
    let mut merges: HashMap<&str, Vec<(&crate::lora::Pair, f32)>> = HashMap::new();
    for m in &plan.merges {
        for p in &m.lora.pairs {
            merges
                .entry(p.target.weight.as_str())
                .or_default()
                .push((p, m.multiplier));
        }
    }
    let mut groups = Vec::new();
    for (i, e) in plan.entries.iter().enumerate() {
        let t = &ck.tensors[e.index];
        // Plain rows in, whole 8-row groups out where the decision interleaves.
        let mut pending = Vec::new();
        let group_bytes = e.decision.ty.bytes_for(e.decision.ne[0]).unwrap_or(0) as usize
            * crate::ggml::repack::ROWS;
        let mut sink = |chunk: &[u8]| -> Result<()> {
            if !e.decision.interleaved {
                return w.write_chunk(chunk).map_err(out_err);
            }
            pending.extend_from_slice(chunk);
            let whole = pending.len() / group_bytes * group_bytes;
            groups.clear();
            crate::ggml::repack::interleave_q4_0(
                &pending[..whole],
                e.decision.ne[0] as usize,
                &mut groups,
            )?;
            pending.drain(..whole);
            w.write_chunk(&groups).map_err(out_err)
        };
        match merges.get(e.name.as_str()) {
            // An adapted weight is read whole: the update spans every row.
            Some(pairs) => {
                let mut w32 = t.read_f32()?;
                for (p, multiplier) in pairs {
                    let delta = p.delta(*multiplier)?;
                    let cols = w32.len() / p.target.shape[0].max(1);
                    let start = p.target.rows.map_or(0, |r| r.0) * cols;
                    let rows = w32.get_mut(start..start + delta.len()).ok_or_else(|| {
                        Error::Invalid(format!(
                            "`{}`: the LoRA update does not fit `{}`",
                            p.key, e.name
                        ))
                    })?;
                    rows.iter_mut().zip(&delta).for_each(|(x, d)| *x += d);
                }
                quantize::convert_values(&w32, &e.decision, &mut scratch, &mut sink)?;
            }
            None => quantize::convert_tensor(t, &e.decision, &mut scratch, cancel, &mut sink)?,
        }
        if !pending.is_empty() {
            return Err(Error::Invalid(format!(
                "`{}`: {} bytes left over an interleaved tensor's 8-row groups",
                e.name,
                pending.len()
            )));
        }
        bytes_done += t.nbytes();
        progress(&Progress {
            tensor: &e.name,
            tensors_done: i + 1,
            tensors_total: plan.entries.len(),
            bytes_done,
            bytes_total: plan.source_bytes,
        });
    }
    let mut buf = w.finish().map_err(out_err)?;
    buf.flush().map_err(|e| Error::io(out, e))?;
    drop(buf);
    let bytes_out = staged
        .file()
        .metadata()
        .map_err(|e| Error::io(out, e))?
        .len();
    Ok((digest_at, bytes_out))
}
