use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};

use sdrs::config::ModelConfig;
use sdrs::formats::DType;
use sdrs::pipeline::{Pipeline, Request, Stage};
use sdrs::sample::Sampler;

/// Measure a model: load, text encoding, seconds per UNet step, decode, peak memory.
#[derive(clap::Args)]
pub struct Args {
    /// Model GGUF. Without it, `--synth` builds a random-weight model of a real architecture.
    #[arg(short, long, required_unless_present = "synth")]
    model: Option<PathBuf>,
    /// Architecture for a synthetic model (sd15, sd21, tiny-sd15, …).
    #[arg(long)]
    synth: Option<String>,
    /// Weight type of the synthetic model.
    #[arg(long = "type", default_value = "q4_0")]
    wtype: String,
    /// Image sizes to measure (square).
    #[arg(long, value_delimiter = ',', default_value = "512")]
    sizes: Vec<usize>,
    #[arg(long, default_value_t = 2)]
    steps: usize,
    #[arg(long = "cfg-scale", default_value_t = 7.0)]
    cfg_scale: f32,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Peak and current resident memory of this process (bytes), from /proc.
fn rss() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| s.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
    (field("VmHWM:"), field("VmRSS:"))
}

pub fn run(a: Args, threads: Option<usize>) -> Result<()> {
    let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let tmp = tempfile::tempdir()?;
    let model = match (&a.model, &a.synth) {
        (Some(m), _) => m.clone(),
        (None, Some(arch)) => {
            let Some(cfg) = ModelConfig::preset(arch) else { bail!("unknown architecture `{arch}`; choose one of {}", ModelConfig::PRESETS.join(", ")) };
            let src = tmp.path().join("synth.safetensors");
            sdrs::synth::synth(&cfg, sdrs::synth::Format::Safetensors, &src, 0, DType::F16, false, &mut |_, _| {})?;
            let wtype = sdrs::convert::policy::parse_type(&a.wtype)?;
            let ck = sdrs::formats::Checkpoint::open(&src)?;
            let plan = sdrs::convert::plan(&ck, &sdrs::convert::Policy::new(wtype), None)?;
            let out = tmp.path().join("synth.gguf");
            sdrs::convert::run(&ck, &plan, wtype.name(), &out, false, &std::sync::atomic::AtomicBool::new(false), &mut |_| {})?;
            std::fs::remove_file(&src)?;
            out
        }
        (None, None) => bail!("give -m MODEL.gguf or --synth ARCH"),
    };
    let t = Instant::now();
    let pipe = Pipeline::load_with_threads(&model, threads)?;
    let load_s = t.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    for &size in &a.sizes {
        let req = Request { width: size, height: size, steps: a.steps, cfg_scale: a.cfg_scale, sampler: Sampler::Euler, ..Request::new("a photograph of an astronaut riding a horse") };
        let mut step_times = Vec::new();
        let mut last = Instant::now();
        let img = pipe.generate(&req, &mut |s| {
            if let Stage::Step { .. } = s {
                step_times.push(last.elapsed().as_secs_f64());
            }
            last = Instant::now();
        })?;
        let per_step = step_times.iter().skip(1).sum::<f64>() / (step_times.len().saturating_sub(1)).max(1) as f64;
        let per_step = if step_times.len() > 1 { per_step } else { step_times.first().copied().unwrap_or(0.0) };
        rows.push(serde_json::json!({
            "size": size, "steps": a.steps, "cfg_scale": a.cfg_scale,
            "text_s": img.timings[0], "first_step_s": step_times.first(), "step_s": per_step, "decode_s": img.timings[2],
        }));
    }
    let (peak, now) = rss();
    let report = serde_json::json!({
        "model": model.file_name().map(|n| n.to_string_lossy().into_owned()),
        "family": pipe.config.family, "threads": threads, "load_s": load_s,
        "peak_rss_bytes": peak, "rss_bytes": now, "runs": rows,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut o = String::new();
    out!(o, "model {} ({}), {} threads, load {:.2} s", report["model"].as_str().unwrap_or("?"), pipe.config.family, threads, load_s);
    out!(o, "{:>6} {:>8} {:>10} {:>10} {:>10}", "size", "text s", "s/step", "1st step", "decode s");
    for r in &rows {
        out!(o, "{:>6} {:>8.2} {:>10.2} {:>10.2} {:>10.2}", r["size"], r["text_s"].as_f64().unwrap_or(0.0), r["step_s"].as_f64().unwrap_or(0.0), r["first_step_s"].as_f64().unwrap_or(0.0), r["decode_s"].as_f64().unwrap_or(0.0));
    }
    out!(o, "peak RSS {:.0} MB (includes mapped weights that were touched)", peak as f64 / 1e6);
    super::print_stdout(&o)
}
