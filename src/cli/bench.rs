use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};

use sdrs::config::ModelConfig;
use sdrs::formats::DType;
use sdrs::memory;
use sdrs::pipeline::{Pipeline, Request, Sampling, Stage};
use sdrs::sample::Sampler;

/// Measure a model: load, text encoding, seconds per UNet step, decode, peak memory.
#[derive(clap::Args)]
pub struct Args {
    /// Model GGUF. Without it, `--synth` builds a random-weight model of a real architecture.
    #[arg(short, long, required_unless_present_any = ["synth", "compare", "upscale_model"])]
    model: Option<PathBuf>,
    /// Measure an ESRGAN-family upscaler (.pth or .safetensors) on --sizes square
    /// pictures instead: seconds, tile, compute buffer, peak memory.
    #[arg(long = "upscale-model", conflicts_with_all = ["model", "synth"])]
    upscale_model: Option<PathBuf>,
    /// Run every step with this ControlNet (any layout `--control-net` takes) on a
    /// square-outline conditioning image: its weights, compute buffer and FLOPs count
    /// in the figures.
    #[arg(long = "control-net")]
    control_net: Option<PathBuf>,
    /// Compare two earlier `--json` reports side by side (no measurement).
    #[arg(long, num_args = 2, value_names = ["A.json", "B.json"])]
    compare: Option<Vec<PathBuf>>,
    /// Architecture for a synthetic model (sd15, sd21, tiny-sd15, …).
    #[arg(long)]
    synth: Option<String>,
    /// Weight type of the synthetic model.
    #[arg(long = "type", default_value = "q4_0")]
    wtype: String,
    /// Stored layout of the synthetic model's q4_0 UNet matrices (as `convert
    /// --cpu-layout`).
    #[arg(long = "cpu-layout", value_enum, default_value = "plain")]
    cpu_layout: super::convert::CpuLayout,
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
    /// Attention kernel: auto (the fastest measured: sdrs' tiled kernel for every
    /// non-causal attention), tiled, flash (ggml's) or matmul (score matrix, head
    /// size padded to 16).
    #[arg(long, default_value = "auto")]
    attention: String,
    /// Write the memory timeline (anonymous and file-backed RSS, stages marked) as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Time every ggml op of the UNet and the VAE decode (nodes then run one at a
    /// time, so totals are a little above the plain run's) and print where time goes.
    #[arg(long)]
    profile: bool,
    /// Use q4_0/q4_K UNet weights as mapped, not copied into ggml's repack layout.
    #[arg(long)]
    no_repack: bool,
    /// Memory budget to plan each run for (as `generate --max-memory`).
    #[arg(long = "max-memory", value_parser = super::generate::parse_budget)]
    max_memory: Option<u64>,
}

pub fn run(a: Args, threads: Option<usize>, target: &super::Target) -> Result<()> {
    if let Some(files) = &a.compare {
        return compare(files);
    }
    let threads = super::thread_count(threads);
    if let Some(path) = &a.upscale_model {
        return upscaler(&a, path, threads);
    }
    let tmp = tempfile::tempdir()?;
    let model = match (&a.model, &a.synth) {
        (Some(m), _) => m.clone(),
        (None, Some(arch)) => {
            let Some(cfg) = ModelConfig::preset(arch) else {
                bail!(
                    "unknown architecture `{arch}`; choose one of {}, {}",
                    ModelConfig::PRESETS.join(", "),
                    ModelConfig::DDPM_PRESETS.join(", ")
                )
            };
            // DDPM's UNet2DModel has no single-file layout: its diffusers folder.
            let (src, format) = if cfg.vae.is_none() {
                (tmp.path().join("synth"), sdrs::synth::Format::Diffusers)
            } else {
                (
                    tmp.path().join("synth.safetensors"),
                    sdrs::synth::Format::Safetensors,
                )
            };
            sdrs::synth::synth(&cfg, format, &src, 0, DType::F16, false, &mut |_, _| {})?;
            let wtype = sdrs::convert::policy::parse_type(&a.wtype)?;
            let ck = sdrs::formats::Checkpoint::open(&src)?;
            let mut policy = sdrs::convert::Policy::new(wtype);
            policy.interleave = a.cpu_layout == super::convert::CpuLayout::X86;
            let plan = sdrs::convert::plan(&ck, &policy, None)?;
            let out = tmp.path().join("synth.gguf");
            sdrs::convert::run(
                &ck,
                &plan,
                wtype.name(),
                &out,
                false,
                &std::sync::atomic::AtomicBool::new(false),
                &mut |_| {},
            )?;
            drop(ck);
            if src.is_dir() {
                std::fs::remove_dir_all(&src)?;
            } else {
                std::fs::remove_file(&src)?;
            }
            out
        }
        (None, None) => bail!("give -m MODEL.gguf or --synth ARCH"),
    };
    if super::sample::is_unconditional(&model)? {
        return unconditional(&a, &model, threads);
    }
    let (peak_flops, fma_kind) = sdrs::ggml::fma_peak_flops(threads, 0.2);
    let recorder = memory::Recorder::start();
    recorder.mark("load");
    let t = Instant::now();
    let Some(attention) = sdrs::model::Attention::parse(&a.attention) else {
        bail!(
            "unknown attention `{}`; valid: {}",
            a.attention,
            sdrs::model::Attention::NAMES.join(", ")
        );
    };
    let mut pipe = Pipeline::load_with_threads(&model, threads)?;
    pipe.attention = attention;
    pipe.repack = !a.no_repack;
    pipe.max_memory = a.max_memory;
    target.apply(&mut pipe, threads)?;
    let control = match &a.control_net {
        Some(p) => Some(std::sync::Arc::new(sdrs::pipeline::ControlNet::open(p)?)),
        None => None,
    };
    let load_s = t.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    for &size in &a.sizes {
        recorder.mark(&format!("text {size}"));
        let controls = control
            .iter()
            .map(|net| {
                sdrs::pipeline::Control::new(net.clone(), std::sync::Arc::new(outline(size)))
            })
            .collect();
        let req = Request {
            controls,
            width: size,
            height: size,
            steps: a.steps,
            cfg_scale: a.cfg_scale,
            sampling: Sampling {
                sampler: Sampler::Euler,
                ..Default::default()
            },
            ..Request::new("a photograph of an astronaut riding a horse")
        };
        // What the run will need, said before it starts (and a refusal before any work).
        let plan = pipe.plan(&req)?;
        if !a.json {
            eprintln!("{size}x{size} memory plan:\n{}", plan.summary());
        }
        let mut step_times = Vec::new();
        let mut flops = 0.0;
        let mut compute_bytes = 0;
        let mut last = Instant::now();
        pipe.set_profiling(a.profile);
        let mut unet_nodes = Vec::new();
        let img = pipe.generate_planned(&req, &plan, &mut |s| {
            match s {
                Stage::TextEncoded => drop(pipe.take_profile()),
                Stage::Step { done, total } => {
                    unet_nodes.extend(pipe.take_profile());
                    step_times.push(last.elapsed().as_secs_f64());
                    recorder.mark(&if done == total {
                        format!("decode {size}")
                    } else {
                        format!("step {} {size}", done + 1)
                    });
                }
                Stage::Sampling {
                    unet_flops,
                    compute_bytes: b,
                } => {
                    flops = unet_flops;
                    compute_bytes = b;
                    recorder.mark(&format!("step 1 {size}"));
                }
                Stage::Sampled
                | Stage::Decoding { .. }
                | Stage::Decoded
                | Stage::Preview { .. } => {}
            }
            last = Instant::now();
        })?;
        let vae_nodes = pipe.take_profile();
        pipe.set_profiling(false);
        let per_step = step_times.iter().skip(1).sum::<f64>()
            / (step_times.len().saturating_sub(1)).max(1) as f64;
        let per_step = if step_times.len() > 1 {
            per_step
        } else {
            step_times.first().copied().unwrap_or(0.0)
        };
        rows.push(serde_json::json!({
            "size": size, "steps": a.steps, "cfg_scale": a.cfg_scale,
            "text_s": img.timings[0], "first_step_s": step_times.first(), "step_s": per_step, "decode_s": img.timings[2],
            "unet_gflop": flops / 1e9, "unet_gflops": flops / per_step / 1e9, "peak_fraction": flops / per_step / peak_flops,
            "compute_buffer_bytes": compute_bytes,
            "plan": {
                "peak_bytes": plan.peak(), "budget_bytes": plan.budget.map(|b| b.bytes),
                "split_guidance": plan.split_guidance, "stream_unet": plan.stream_unet, "vae_tile": plan.tiling.map(|t| [t.tile_w, t.tile_h]),
                "stages": plan.needs.iter().map(|n| serde_json::json!({"stage": n.stage, "weights": n.weights, "compute": n.compute, "other": n.other})).collect::<Vec<_>>(),
            },
            "profile": a.profile.then(|| serde_json::json!({
                "unet": profile_json(&unet_nodes, step_times.len().max(1)),
                "vae_decode": profile_json(&vae_nodes, 1),
            })),
        }));
    }
    recorder.mark("end");
    let timeline = recorder.stop();
    let (peak, now) = memory::peak_and_current();
    let system = sdrs::ggml::cpu_backend_info()?;
    let report = serde_json::json!({
        "model": model.file_name().map(|n| n.to_string_lossy().into_owned()),
        "family": pipe.config.family, "threads": threads, "backend": pipe.gpu_name().unwrap_or("cpu"), "load_s": load_s, "attention": a.attention, "repack": !a.no_repack,
        "peak_rss_bytes": peak, "rss_bytes": now, "runs": rows,
        "machine": {
            "cpu": system.description, "ggml_cpu_library": system.library.map(|p| p.display().to_string()),
            "ggml_features": system.features.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "cpu_features": sdrs::cpu::features(), "fma_peak_gflops": peak_flops / 1e9, "fma_kind": fma_kind, "sdrs_attention_kernel": sdrs::ggml::attention_kernel(),
        },
        "memory_timeline": timeline.to_json(),
    });
    if let Some(path) = &a.plot {
        std::fs::write(
            path,
            timeline.to_svg(&format!(
                "sdrs bench: {}",
                report["model"].as_str().unwrap_or("?")
            )),
        )
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut o = String::new();
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    out!(
        o,
        "model {} ({}), {} threads, on {}, load {:.2} s",
        report["model"].as_str().unwrap_or("?"),
        pipe.config.family,
        threads,
        pipe.gpu_name().unwrap_or("the CPU"),
        load_s
    );
    out!(
        o,
        "machine: {}, FMA peak {:.0} GFLOP/s ({fma_kind}, {threads} threads)",
        report["machine"]["cpu"].as_str().unwrap_or("?"),
        peak_flops / 1e9
    );
    out!(
        o,
        "cpu features: {}; ggml library {}; sdrs attention kernel {}",
        sdrs::cpu::features().join(" "),
        report["machine"]["ggml_cpu_library"]
            .as_str()
            .unwrap_or("built in"),
        sdrs::ggml::attention_kernel()
    );
    out!(
        o,
        "{:>6} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10}",
        "size",
        "text s",
        "s/step",
        "1st step",
        "decode s",
        "GFLOP/st",
        "GFLOP/s",
        "% of peak"
    );
    for r in &rows {
        out!(
            o,
            "{:>6} {:>8.2} {:>10.2} {:>10.2} {:>10.2} {:>10.0} {:>8.1} {:>9.1}%",
            r["size"],
            f(&r["text_s"]),
            f(&r["step_s"]),
            f(&r["first_step_s"]),
            f(&r["decode_s"]),
            f(&r["unet_gflop"]),
            f(&r["unet_gflops"]),
            100.0 * f(&r["peak_fraction"])
        );
    }
    for r in rows.iter().filter(|r| !r["profile"].is_null()) {
        for (stage, label) in [
            ("unet", "UNet, per evaluation"),
            ("vae_decode", "VAE decode"),
        ] {
            out!(
                o,
                "\nprofile {}², {label}: op (weight type)        s    share   GFLOP  GFLOP/s",
                r["size"]
            );
            for c in r["profile"][stage]["ops"]
                .as_array()
                .into_iter()
                .flatten()
                .take(12)
            {
                out!(
                    o,
                    "  {:<32} {:>7.3} {:>6.1}% {:>7.1} {:>8.1}",
                    c["op"].as_str().unwrap_or("?"),
                    f(&c["seconds"]),
                    100.0 * f(&c["share"]),
                    f(&c["gflop"]),
                    f(&c["gflops"])
                );
            }
        }
    }
    out!(o, "peak RSS {:.0} MB (anonymous {:.0} MB, file-backed {:.0} MB at their peaks; mapped weights count once touched)", peak as f64 / 1e6, timeline.peak_anon() as f64 / 1e6, timeline.peak_file() as f64 / 1e6);
    super::print_stdout(&o)
}

/// A model without text: seconds per UNet step (one image, DDIM, whose steps are one
/// evaluation each) and the VQ decode where the model has one.
/// A white square outline on black, `size` square: a conditioning image like an edge map.
fn outline(size: usize) -> sdrs::pipeline::Canvas {
    let (a, b) = (size / 4, 3 * size / 4);
    let mut rgb = vec![0u8; size * size * 3];
    for y in a..=b {
        for x in a..=b {
            if x == a || x == b || y == a || y == b {
                rgb[(y * size + x) * 3..][..3].fill(255);
            }
        }
    }
    sdrs::pipeline::Canvas {
        width: size,
        height: size,
        rgb,
        mask: None,
        mask_blur: 0.0,
    }
}

fn unconditional(a: &Args, model: &std::path::Path, threads: usize) -> Result<()> {
    use sdrs::pipeline::unconditional::{Batch, Unconditional};
    let t = Instant::now();
    let mut m = Unconditional::load(model, threads)?;
    m.max_memory = a.max_memory;
    let load_s = t.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    for &size in &a.sizes {
        let mut req = Request {
            width: size,
            height: size,
            steps: a.steps.max(2),
            ..m.request()
        };
        // A score model keeps its predictor-corrector sampler: each step evaluates
        // the UNet once per corrector move and once for the predictor.
        let evals = match m.config.schedule.ve {
            Some(v) => 1 + v.correct_steps,
            None => {
                req.sampling.sampler = Sampler::Ddim;
                1
            }
        };
        let batch = Batch::of(1);
        let plan = m.plan(&req, &batch)?;
        if !a.json {
            eprintln!("{size}x{size} memory plan:\n{}", plan.summary());
        }
        let mut times = Vec::new();
        let mut flops = 0.0;
        let mut last = Instant::now();
        let images = m.generate(&req, &batch, &mut |s| {
            match s {
                Stage::Step { .. } => times.push(last.elapsed().as_secs_f64()),
                Stage::Sampling { unet_flops, .. } => flops = unet_flops * evals as f64,
                _ => {}
            }
            last = Instant::now();
        })?;
        // The first step also pays for first touches of the weights.
        let step_s =
            times.iter().skip(1).sum::<f64>() / times.len().saturating_sub(1).max(1) as f64;
        rows.push(serde_json::json!({
            "size": size, "steps": req.steps, "step_s": step_s, "first_step_s": times.first(),
            "decode_s": images[0].timings[2], "unet_gflop": flops / 1e9, "unet_gflops": flops / step_s / 1e9,
            "plan": { "peak_bytes": plan.memory.peak(), "chunk": plan.chunk },
        }));
    }
    let (peak, _) = memory::peak_and_current();
    let report = serde_json::json!({
        "model": model.file_name().map(|n| n.to_string_lossy().into_owned()),
        "family": m.config.family, "threads": threads, "load_s": load_s, "peak_rss_bytes": peak, "runs": rows,
        "machine": { "cpu": sdrs::ggml::cpu_backend_info()?.description, "cpu_features": sdrs::cpu::features() },
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut o = String::new();
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    out!(
        o,
        "model {} ({}), {threads} threads, load {load_s:.2} s, on {}",
        report["model"].as_str().unwrap_or("?"),
        m.config.family,
        report["machine"]["cpu"].as_str().unwrap_or("?")
    );
    out!(
        o,
        "{:>6} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "size",
        "s/step",
        "1st step",
        "decode s",
        "GFLOP/st",
        "GFLOP/s"
    );
    for r in &rows {
        out!(
            o,
            "{:>6} {:>10.3} {:>10.3} {:>10.2} {:>10.1} {:>8.1}",
            r["size"],
            f(&r["step_s"]),
            f(&r["first_step_s"]),
            f(&r["decode_s"]),
            f(&r["unet_gflop"]),
            f(&r["unet_gflops"])
        );
    }
    out!(o, "peak RSS {:.0} MB", peak as f64 / 1e6);
    super::print_stdout(&o)
}

/// An upscaler on `--sizes` square pictures of smooth noise.
fn upscaler(a: &Args, path: &std::path::Path, threads: usize) -> Result<()> {
    use sdrs::pipeline::upscale::{Upscaler, TILE};
    let t = Instant::now();
    let mut up = Upscaler::load(path, threads)?;
    let load_s = t.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    for &size in &a.sizes {
        let rgb: Vec<u8> = (0..size * size * 3)
            .map(|i| (((i / 3 % size) * 255 / size.max(1)) ^ (i * 2654435761 % 64)) as u8)
            .collect();
        let image = sdrs::pipeline::Image {
            width: size,
            height: size,
            rgb,
            parameters: String::new(),
            timings: [0.0; 3],
        };
        up.tile = TILE;
        up.fit((size, size), a.max_memory)?;
        let need = up.need((size, size))?;
        let t = Instant::now();
        let mut tiles = 0;
        up.upscale(&image, 1, &mut |_, total| {
            tiles = total;
            Ok(())
        })?;
        rows.push(serde_json::json!({
            "size": size, "seconds": t.elapsed().as_secs_f64(), "tile": up.tile, "tiles": tiles,
            "compute_bytes": need.compute, "planned_bytes": need.total() + sdrs::budget::OVERHEAD,
        }));
    }
    let (peak, _) = memory::peak_and_current();
    let report = serde_json::json!({
        "upscaler": path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "architecture": up.arch.describe(), "threads": threads, "load_s": load_s,
        "peak_rss_bytes": peak, "runs": rows,
        "machine": { "cpu": sdrs::ggml::cpu_backend_info()?.description, "cpu_features": sdrs::cpu::features() },
    });
    if a.json {
        return super::print_stdout(&serde_json::to_string_pretty(&report)?);
    }
    let mut o = String::new();
    out!(
        o,
        "{} ({}), {threads} threads, load {load_s:.2} s, on {}",
        report["upscaler"].as_str().unwrap_or("?"),
        up.arch.describe(),
        report["machine"]["cpu"].as_str().unwrap_or("?")
    );
    out!(
        o,
        "{:>6} {:>10} {:>6} {:>6} {:>12} {:>12}",
        "size",
        "seconds",
        "tile",
        "tiles",
        "compute MiB",
        "planned MiB"
    );
    for r in &rows {
        let mib = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / (1 << 20) as f64;
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        out!(
            o,
            "{:>6} {:>10.2} {:>6} {:>6} {:>12.0} {:>12.0}",
            n(&r["size"]),
            r["seconds"].as_f64().unwrap_or(0.0),
            n(&r["tile"]),
            n(&r["tiles"]),
            mib(&r["compute_bytes"]),
            mib(&r["planned_bytes"])
        );
    }
    out!(o, "peak RSS {:.0} MB", peak as f64 / 1e6);
    super::print_stdout(&o)
}

/// Two reports side by side: per image size, each figure of A and B and the ratio B/A.
fn compare(files: &[PathBuf]) -> Result<()> {
    let read = |p: &PathBuf| -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
        serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{} is not a `sdrs bench --json` report: {e}", p.display())
        })
    };
    let (a, b) = (read(&files[0])?, read(&files[1])?);
    if !a["runs"].is_array() || !b["runs"].is_array() {
        bail!(
            "{} or {} has no `runs`: not a `sdrs bench --json` report",
            files[0].display(),
            files[1].display()
        );
    }
    let name = |v: &serde_json::Value| v["model"].as_str().unwrap_or("?").to_string();
    let f = |v: &serde_json::Value| v.as_f64();
    let mut o = String::new();
    out!(o, "A: {} ({})", files[0].display(), name(&a));
    out!(o, "B: {} ({})", files[1].display(), name(&b));
    out!(o, "{:<22} {:>12} {:>12} {:>8}", "", "A", "B", "B/A");
    let mut row = |label: &str, x: Option<f64>, y: Option<f64>, scale: f64| {
        let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}", v / scale));
        let ratio = match (x, y) {
            (Some(x), Some(y)) if x != 0.0 => format!("{:.2}", y / x),
            _ => "-".into(),
        };
        out!(
            o,
            "{label:<22} {:>12} {:>12} {:>8}",
            cell(x),
            cell(y),
            ratio
        );
    };
    row("load s", f(&a["load_s"]), f(&b["load_s"]), 1.0);
    row(
        "peak RSS MB",
        f(&a["peak_rss_bytes"]),
        f(&b["peak_rss_bytes"]),
        1e6,
    );
    let sizes: std::collections::BTreeSet<u64> = a["runs"]
        .as_array()
        .into_iter()
        .chain(b["runs"].as_array())
        .flatten()
        .filter_map(|r| r["size"].as_u64())
        .collect();
    for size in sizes {
        let pick = |v: &serde_json::Value| {
            v["runs"]
                .as_array()
                .and_then(|r| r.iter().find(|r| r["size"].as_u64() == Some(size)).cloned())
                .unwrap_or_default()
        };
        let (ra, rb) = (pick(&a), pick(&b));
        for (k, label) in [
            ("step_s", "s/step"),
            ("decode_s", "decode s"),
            ("text_s", "text s"),
            ("unet_gflops", "UNet GFLOP/s"),
        ] {
            row(&format!("{size}: {label}"), f(&ra[k]), f(&rb[k]), 1.0);
        }
    }
    super::print_stdout(&o)
}

/// Where a stage's time goes: per op class (matrix products split by weight type),
/// divided by `runs` (UNet evaluations), largest first.
fn profile_json(nodes: &[sdrs::ggml::NodeTiming], runs: usize) -> serde_json::Value {
    let mut classes: std::collections::BTreeMap<String, (f64, f64, usize)> = Default::default();
    for n in nodes {
        let key = match n.op.as_str() {
            "MUL_MAT" | "FLASH_ATTN_EXT" => format!("{} ({})", n.op, n.src_type.name()),
            _ => n.op.clone(),
        };
        let e = classes.entry(key).or_default();
        e.0 += n.seconds;
        e.1 += n.flops;
        e.2 += 1;
    }
    let total: f64 = nodes.iter().map(|n| n.seconds).sum();
    let mut ops: Vec<_> = classes.into_iter().collect();
    ops.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    let runs = runs as f64;
    let ops: Vec<_> = ops
        .into_iter()
        .map(|(op, (s, fl, count))| {
            serde_json::json!({
                "op": op, "seconds": s / runs, "share": if total > 0.0 { s / total } else { 0.0 },
                "gflop": fl / runs / 1e9, "gflops": if s > 0.0 { fl / s / 1e9 } else { 0.0 }, "nodes": count as f64 / runs,
            })
        })
        .collect();
    serde_json::json!({ "seconds": total / runs, "ops": ops })
}
