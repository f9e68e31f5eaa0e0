use std::path::PathBuf;

use anyhow::{Context, Result};

/// The options that describe a model, refused for `what` (a file that is not one).
fn refuse_model_flags(a: &Args, what: &str) -> Result<()> {
    for (flag, given) in [
        ("--prediction", a.prediction.is_some()),
        ("--zero-terminal-snr", a.zero_terminal_snr),
        ("--defaults", a.defaults.is_some()),
        ("--lora", !a.lora.is_empty()),
    ] {
        anyhow::ensure!(
            !given,
            "{flag} describes a model; {} is {what}",
            a.input.display()
        );
    }
    Ok(())
}

use sdrs::convert::{self, policy, Policy};
use sdrs::formats::Checkpoint;

/// Convert a checkpoint (.safetensors, .ckpt, diffusers folder, GGUF) to a GGUF.
#[derive(clap::Args)]
pub struct Args {
    /// Input checkpoint: .safetensors, .ckpt/.pt, a diffusers folder, or a GGUF file.
    input: PathBuf,
    /// Output GGUF file.
    #[arg(short, long, required_unless_present = "dry_run")]
    output: Option<PathBuf>,
    /// Weight type: f32, f16, bf16, q8_0, q5_0, q5_1, q4_0, q4_1, q2_K, q3_K, q4_K, q5_K, q6_K.
    #[arg(long = "type", default_value = "f16")]
    wtype: String,
    /// Per-tensor override REGEX=TYPE (repeatable; the last matching rule wins).
    #[arg(long = "tensor-type", value_name = "REGEX=TYPE")]
    rules: Vec<String>,
    /// Print the plan (count and bytes per type) without writing anything.
    #[arg(long)]
    dry_run: bool,
    /// List every tensor's decision in the plan.
    #[arg(long)]
    list: bool,
    /// Overwrite an existing output.
    #[arg(long)]
    force: bool,
    /// Override the prediction type (epsilon, v_prediction, sample).
    #[arg(long)]
    prediction: Option<String>,
    /// Mark the model as trained on a zero-terminal-SNR schedule (for single files,
    /// which carry no scheduler config; diffusers folders say so themselves).
    #[arg(long = "zero-terminal-snr")]
    zero_terminal_snr: bool,
    /// Run defaults stored in the output, over those of the input (e.g.
    /// `size=64,sampler=lcm,steps=4,cfg=1.5`; keys: size, width, height, sampler,
    /// scheduler, steps, cfg_scale). `generate` uses them for options not given.
    #[arg(long, value_name = "KEY=VALUE,...")]
    defaults: Option<String>,
    /// How q4_0 UNet matrices are stored. `plain`: ggml's q4_0, read by every CPU and
    /// GPU. `x86`: interleaved by 8 rows, the layout of ggml's AVX2/AVX-512 integer
    /// GEMM, which then reads them straight from the file's mapping: the fast kernel
    /// without a copy in memory, and pages the system can drop and read again under
    /// a memory limit. CPUs whose ggml reads another layout un-interleave them at load.
    #[arg(long = "cpu-layout", value_enum, default_value = "plain")]
    cpu_layout: CpuLayout,
    /// Merge a LoRA into the weights (kohya/A1111, diffusers/PEFT or attention-processor
    /// naming; LoCon too): FILE or FILE:MULTIPLIER [default multiplier 1]; repeatable.
    #[arg(long, value_name = "FILE[:MULTIPLIER]")]
    lora: Vec<String>,
}

/// The stored layout of q4_0 UNet matrices (`--cpu-layout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuLayout {
    Plain,
    X86,
}

pub fn run(a: Args) -> Result<()> {
    let wtype = policy::parse_type(&a.wtype)?;
    let mut pol = Policy::new(wtype);
    pol.interleave = a.cpu_layout == CpuLayout::X86;
    for r in &a.rules {
        pol.rules.push(r.parse()?);
    }
    if sdrs::formats::control::is_controlnet(&a.input)? {
        return convert_controlnet(&a, pol, wtype);
    }
    if is_upscaler(&a.input)? {
        return convert_upscaler(&a, pol, wtype);
    }
    let ck = Checkpoint::open(&a.input)?;
    let mut cfg = ck.model_config()?;
    if let Some(p) = &a.prediction {
        cfg.prediction = sdrs::config::Prediction::parse(p)
            .with_context(|| format!("unknown prediction type `{p}`"))?;
    }
    cfg.zero_terminal_snr |= a.zero_terminal_snr;
    let mut plan = convert::plan(&ck, &pol, Some(cfg))?;
    if let Some(spec) = &a.defaults {
        let mut d = plan.defaults.clone();
        d.apply(spec)
            .map_err(|e| anyhow::anyhow!("--defaults: {e}"))?;
        if let Some(s) = &d.sampler {
            anyhow::ensure!(
                sdrs::sample::Sampler::parse(s).is_some(),
                "--defaults: unknown sampler `{s}`"
            );
        }
        if let Some(s) = &d.scheduler {
            anyhow::ensure!(
                sdrs::sample::Schedule::parse(s).is_some(),
                "--defaults: unknown scheduler `{s}`"
            );
        }
        plan.defaults = d;
    }
    for spec in &a.lora {
        let (file, multiplier) = sdrs::pipeline::options::parse_lora(spec);
        plan.merge_lora(&file, multiplier)?;
        let m = plan.merges.last().map_or(0, |m| m.lora.pairs.len());
        eprintln!(
            "merging {} ({m} weights, multiplier {multiplier})",
            file.display()
        );
    }
    for (n, why) in &plan.dropped {
        log::info!("dropping {n}: {why}");
    }
    if !plan.unknown.is_empty() {
        log::warn!(
            "{} tensors are not part of the {} architecture and are kept as they are: {}",
            plan.unknown.len(),
            plan.config.family,
            plan.unknown
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if a.dry_run || a.list {
        let mut o = String::new();
        print_plan(&plan, a.list, &mut o);
        super::print_stdout(&o)?;
        if a.dry_run {
            return Ok(());
        }
    }
    let Some(out) = a.output else { return Ok(()) };
    write(&ck, &plan, wtype, &out, a.force)
}

fn convert_controlnet(a: &Args, pol: Policy, wtype: sdrs::ggml::Type) -> Result<()> {
    refuse_model_flags(a, "a ControlNet")?;
    let src = sdrs::formats::control::open(&a.input)?;
    let plan = convert::plan_control(&src, &pol)?;
    for (n, why) in &plan.dropped {
        log::info!("dropping {n}: {why}");
    }
    if !plan.dropped.is_empty() {
        eprintln!(
            "leaving out {} tensors that are not the ControlNet's (the base model stored beside it)",
            plan.dropped.len()
        );
    }
    if a.dry_run || a.list {
        let mut o = String::new();
        print_plan(&plan, a.list, &mut o);
        super::print_stdout(&o)?;
        if a.dry_run {
            return Ok(());
        }
    }
    let Some(out) = &a.output else { return Ok(()) };
    write(&src.checkpoint, &plan, wtype, out, a.force)
}

/// Whether `path` is an ESRGAN-family upscaler (its tensor names say so).
fn is_upscaler(path: &std::path::Path) -> Result<bool> {
    if path.is_dir() {
        return Ok(false);
    }
    if sdrs::formats::gguf::is_gguf(path)? {
        let g = sdrs::formats::gguf::GgufFile::open(path)?;
        return Ok(sdrs::formats::gguf::metadata::read_upscaler(&g)?.is_some());
    }
    let ck = Checkpoint::open(path)?;
    let names: Vec<&str> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
    Ok(sdrs::model::esrgan::looks_like(&names))
}

/// An upscaler converts as a model does, under the names and with the network
/// `sdrs upscale` reads.
fn convert_upscaler(a: &Args, pol: Policy, wtype: sdrs::ggml::Type) -> Result<()> {
    refuse_model_flags(a, "an upscaler")?;
    let (ck, arch) = if sdrs::formats::gguf::is_gguf(&a.input)? {
        let g = sdrs::formats::gguf::GgufFile::open(&a.input)?;
        let arch = sdrs::formats::gguf::metadata::read_upscaler(&g)?
            .context("an upscaler GGUF without its network")?;
        (Checkpoint::open(&a.input)?, arch)
    } else {
        sdrs::model::esrgan::read_checkpoint(&a.input)?
    };
    let plan = convert::plan_upscaler(&ck, &arch, &pol)?;
    if a.dry_run || a.list {
        let mut o = String::new();
        out!(o, "architecture: {}", arch.describe());
        print_plan(&plan, a.list, &mut o);
        super::print_stdout(&o)?;
        if a.dry_run {
            return Ok(());
        }
    }
    let Some(out) = &a.output else { return Ok(()) };
    write(&ck, &plan, wtype, out, a.force)
}

/// Runs `plan` with a progress bar.
fn write(
    ck: &Checkpoint,
    plan: &convert::Plan,
    wtype: sdrs::ggml::Type,
    out: &std::path::Path,
    force: bool,
) -> Result<()> {
    let cancel = super::interrupt_flag();
    let bar = super::progress_bar(
        plan.source_bytes,
        "{spinner} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    );
    let s = convert::run(ck, plan, wtype.name(), out, force, &cancel, &mut |p| {
        bar.set_position(p.bytes_done);
        bar.set_message(format!("{}/{} tensors", p.tensors_done, p.tensors_total));
    })?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} ({} tensors, {} from {} in {:.1} s, {:.0} MB/s of input)",
        out.display(),
        s.tensors,
        super::mb(s.bytes_out),
        super::mb(s.bytes_in),
        s.seconds,
        s.bytes_in as f64 / 1e6 / s.seconds.max(1e-9)
    );
    Ok(())
}

fn print_plan(plan: &convert::Plan, list: bool, o: &mut String) {
    let zsnr = if plan.config.zero_terminal_snr {
        "  (zero terminal SNR)"
    } else {
        ""
    };
    match &plan.control {
        None if plan.upscaler.is_some() => {}
        Some(c) => out!(
            o,
            "architecture: ControlNet for {}  conditioning: {} channels at {}x the latent size",
            c.family,
            c.hint_channels,
            c.downscale()
        ),
        None => out!(
            o,
            "architecture: {}  prediction: {}{zsnr}",
            plan.config.family,
            plan.config.prediction.as_str()
        ),
    }
    if plan.defaults != Default::default() {
        out!(o, "run defaults: {:?}", plan.defaults);
    }
    if list {
        for e in &plan.entries {
            out!(
                o,
                "{:<6} {:>12} {:<90} {}",
                e.decision.ty.name(),
                e.nbytes,
                e.name,
                e.decision.why
            );
        }
    }
    out!(o, "{:<8} {:>8} {:>14}", "type", "tensors", "bytes");
    for (t, n, b) in plan.by_type() {
        out!(o, "{:<8} {:>8} {:>14}  ({})", t.name(), n, b, super::mb(b));
    }
    out!(
        o,
        "{:<8} {:>8} {:>14}  ({}; input {})",
        "total",
        plan.entries.len(),
        plan.output_bytes(),
        super::mb(plan.output_bytes()),
        super::mb(plan.source_bytes)
    );
    if !plan.dropped.is_empty() {
        out!(
            o,
            "dropped {} tensors not used at inference",
            plan.dropped.len()
        );
    }
}
