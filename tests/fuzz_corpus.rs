//! The fuzz targets' seed corpora and every input a fuzzer ever found a fault with,
//! replayed through the same harness (`sdrs::fuzz`) in the ordinary test suite: a
//! finding stays fixed without a fuzzing toolchain, and the seeds stay meaningful.
use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Every seed is an input its parser accepts: a seed that is refused would only test
/// the first check it fails, and the fuzzer would start from nothing deep.
#[test]
fn every_seed_is_accepted_by_its_parser() {
    let mut bad = Vec::new();
    for (name, run) in sdrs::fuzz::TARGETS {
        let seeds = files(&fuzz_dir().join("seeds").join(name));
        assert!(!seeds.is_empty(), "fuzz/seeds/{name} has no seeds");
        for p in seeds {
            let data = std::fs::read(&p).unwrap();
            if !run(&data) {
                bad.push(p.display().to_string());
            }
        }
    }
    // stable-diffusion.cpp's header-only seeds stop at the tensor data by design.
    bad.retain(|p| !p.ends_with("-header.gguf"));
    assert!(bad.is_empty(), "seeds refused by their parser: {bad:#?}");
}

/// Past findings: each input once crashed, hung or ran away with memory in its
/// parser. Now each must come back (accepted or refused), in the same process.
#[test]
fn every_past_finding_is_handled() {
    let mut n = 0;
    for (name, run) in sdrs::fuzz::TARGETS {
        for p in files(&fuzz_dir().join("regressions").join(name)) {
            let data = std::fs::read(&p).unwrap();
            let _ = run(&data);
            n += 1;
        }
    }
    eprintln!("{n} past findings replayed");
}

/// The fuzz crate builds one binary per harness entry point, under the same names.
#[test]
fn every_harness_entry_point_has_a_fuzz_target() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for (name, _) in sdrs::fuzz::TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml lacks the target {name}"
        );
        let src =
            std::fs::read_to_string(fuzz_dir().join("fuzz_targets").join(format!("{name}.rs")))
                .unwrap();
        assert!(
            src.contains(&format!("sdrs::fuzz::{name}(")),
            "fuzz_targets/{name}.rs does not call sdrs::fuzz::{name}"
        );
    }
}
