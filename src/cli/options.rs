//! `generate`'s request flags, made from the library's table of request options
//! ([`sdrs::pipeline::options::OPTIONS`]), which the JNI library reads its Java fields
//! by too: a flag's name, help and parsing live there once.
use clap::{Arg, ArgAction, ArgMatches, Command};

use sdrs::pipeline::options::{self, Kind, RequestOption, Value, OPTIONS};

/// The request options given on the command line, in the table's order.
#[derive(Default)]
pub struct RequestFlags {
    pub given: Vec<(&'static RequestOption, Value)>,
}

impl RequestFlags {
    /// Whether `flag` was given.
    pub fn has(&self, flag: &str) -> bool {
        self.given.iter().any(|(o, _)| o.flag == flag)
    }
}

fn arg(o: &'static RequestOption) -> Arg {
    let help = match o.names {
        Some(names) => format!("{} [names: {}]", o.help, names().join(", ")),
        None => o.help.to_string(),
    };
    let mut a = Arg::new(o.flag)
        .long(o.flag)
        .help(help)
        .visible_aliases(o.aliases.iter().copied())
        .help_heading("Request");
    if let Some(c) = o.short {
        a = a.short(c);
    }
    if o.kind != Kind::Flag {
        a = a.value_name(o.value_name);
    }
    match o.kind {
        Kind::Text => a.action(ArgAction::Set),
        Kind::Number => a
            .action(ArgAction::Set)
            .allow_negative_numbers(true)
            .value_parser(clap::value_parser!(f64)),
        Kind::Count => a
            .action(ArgAction::Set)
            .value_parser(clap::value_parser!(usize)),
        Kind::Flag => a.action(ArgAction::SetTrue),
        Kind::List => a.action(ArgAction::Append),
        Kind::Bytes => a.action(ArgAction::Set).value_parser(options::parse_bytes),
    }
}

impl clap::Args for RequestFlags {
    fn augment_args(cmd: Command) -> Command {
        OPTIONS.iter().fold(cmd, |cmd, o| cmd.arg(arg(o)))
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for RequestFlags {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = RequestFlags::default();
        flags.update_from_arg_matches(m)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        for o in OPTIONS {
            let value = match o.kind {
                Kind::Text => m.get_one::<String>(o.flag).cloned().map(Value::Text),
                Kind::Number => m.get_one::<f64>(o.flag).copied().map(Value::Number),
                Kind::Count => m.get_one::<usize>(o.flag).copied().map(Value::Count),
                Kind::Flag => m.get_flag(o.flag).then_some(Value::Flag(true)),
                Kind::List => m
                    .get_many::<String>(o.flag)
                    .map(|v| Value::List(v.cloned().collect())),
                Kind::Bytes => m.get_one::<u64>(o.flag).copied().map(Value::Bytes),
            };
            if let Some(v) = value {
                self.given.retain(|(g, _)| g.flag != o.flag);
                self.given.push((o, v));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// `generate`'s flags that are not request options: inputs only the CLI takes as
    /// files or words (Java has its own fields or calls for them), and its outputs.
    const CLI_ONLY: &[&str] = &[
        "model",
        "vae",
        "prompt",
        "seed",
        "batch-count",
        // Unconditional models (the JNI library does not run them).
        "class",
        "grid",
        "width",
        "height",
        "init-img",
        "mask",
        "mask-blur",
        "pad",
        "embedding",
        "embedding-dir",
        "list-samplers",
        "plan",
        "output",
        "preview",
        "quality",
        // An ESRGAN pass after generation (the JNI library has no upscaler yet).
        "upscale-model",
        "upscale-repeats",
        "hires-scale",
        "hires-steps",
        "hires-denoise",
        "hires-upscaler",
        // ControlNets and their images are files; the JNI library takes them as its
        // own fields.
        "control-net",
        "control-image",
        "control-strength",
        "control-start",
        "control-end",
        "guess-mode",
        "canny",
        "canny-low",
        "canny-high",
        "help",
        // Global flags.
        "verbose",
        "threads",
        "backend",
        "device",
    ];

    #[test]
    fn generate_flags_are_the_shared_options_and_the_cli_own_inputs() {
        let cli = crate::cli::Cli::command();
        let generate = cli.find_subcommand("generate").unwrap();
        let longs: Vec<&str> = generate
            .get_arguments()
            .filter_map(|a| a.get_long())
            .collect();
        for long in &longs {
            assert!(
                options::find(long).is_some() || CLI_ONLY.contains(long),
                "--{long} is neither a request option (pipeline::options) nor listed as the CLI's own"
            );
        }
        for o in OPTIONS {
            assert!(
                longs.contains(&o.flag),
                "--{} missing from generate",
                o.flag
            );
        }
    }

    #[test]
    fn flags_arrive_as_typed_values_in_table_order() {
        let cli = crate::cli::Cli::try_parse_from([
            "sdrs",
            "generate",
            "-p",
            "x",
            "--max-memory",
            "1.5G",
            "--lora",
            "a:0.5",
            "--lora",
            "b",
            "--steps",
            "3",
            "--eta",
            "-0.5",
            "--vae-tiling",
            "--preset",
            "sd-turbo",
        ])
        .unwrap();
        let crate::cli::Command::Generate(args) = cli.command else {
            panic!("not generate")
        };
        let given: Vec<(&str, Value)> = args
            .request
            .given
            .iter()
            .map(|(o, v)| (o.flag, v.clone()))
            .collect();
        assert_eq!(
            given,
            vec![
                ("preset", Value::Text("sd-turbo".into())),
                ("steps", Value::Count(3)),
                ("eta", Value::Number(-0.5)),
                ("lora", Value::List(vec!["a:0.5".into(), "b".into()])),
                ("vae-tiling", Value::Flag(true)),
                ("max-memory", Value::Bytes(3 << 29)),
            ]
        );
    }
}
