//! Subcommands; each builds a request for the library and prints the result.

/// `writeln!` into a `String` report (which cannot fail).
macro_rules! out {
    ($o:expr, $($t:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($o, $($t)*);
    }};
}

mod bench;
mod convert;
mod devices;
mod generate;
mod info;
mod options;
mod sample;
mod synth;
mod upscale;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "sdrs",
    version,
    about = "Stable Diffusion at the edge: quantized, memory-mapped GGUF models on ggml"
)]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG also works.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long, global = true)]
    threads: Option<usize>,
    /// Where `generate` and `bench` compute: cpu, or vulkan (a build with the `vulkan`
    /// feature; ops the GPU lacks run on the CPU).
    #[arg(long, global = true, default_value = "cpu", value_parser = ["cpu", "vulkan"])]
    backend: String,
    /// Which device of the backend (`sdrs devices` lists them).
    #[arg(long, global = true, default_value_t = 0)]
    device: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start; its size costs nothing
enum Command {
    Bench(bench::Args),
    Convert(convert::Args),
    Devices(devices::Args),
    Generate(generate::Args),
    Info(info::Args),
    Synth(synth::Args),
    Upscale(upscale::Args),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    sdrs::ggml::return_freed_memory_promptly();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .init();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
        {
            log::warn!("cannot set thread count: {e}");
        }
    }
    let target = Target {
        backend: cli.backend,
        device: cli.device,
    };
    let result = match cli.command {
        Command::Bench(a) => bench::run(a, cli.threads, &target),
        Command::Convert(a) => convert::run(a),
        Command::Devices(a) => devices::run(a),
        Command::Generate(a) => generate::run(a, cli.threads, &target),
        Command::Info(a) => info::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Upscale(a) => upscale::run(a, cli.threads),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The `--backend` and `--device` a run asked for.
pub struct Target {
    pub backend: String,
    pub device: usize,
}

impl Target {
    /// Moves `pipe` onto the asked-for backend (it starts on the CPU).
    pub fn apply(&self, pipe: &mut sdrs::pipeline::Pipeline, threads: usize) -> anyhow::Result<()> {
        if self.backend != "cpu" {
            pipe.set_backend(sdrs::ggml::Backend::open(
                &self.backend,
                self.device,
                threads,
            )?)?;
            log::info!("computing on {}", pipe.gpu_name().unwrap_or("the CPU"));
        }
        Ok(())
    }
}

/// A flag set by the first Ctrl-C (work stops at the next chunk and temporary
/// files are removed); a second Ctrl-C exits at once.
pub fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&flag));
        let _ = signal_hook::flag::register(sig, Arc::clone(&flag));
    }
    flag
}

/// The worker threads a run uses: `--threads`, else every core.
pub fn thread_count(given: Option<usize>) -> usize {
    given.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A progress bar on a terminal; hidden when stderr is a pipe or a file.
pub fn progress_bar(len: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(len),
        if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Writes a report to stdout; a closed pipe (`sdrs info x | head`) is not an error.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

pub fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}
