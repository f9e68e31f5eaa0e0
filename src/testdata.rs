//! Where the tests find their data (one helper for unit and integration tests).
//!
//! Small data lives in the repository under `tests/fixtures`. Larger or foreign files
//! (real pretrained weights, stable-diffusion.cpp's GGUFs) live outside it, in a
//! `shared` folder beside the clone (`$SDRS_SHARED` names another): a test that needs
//! one and finds it missing skips, printing `SKIP:` and the file straight to stderr,
//! so the line shows even when the test harness captures output and can be counted.
use std::io::Write;
use std::path::PathBuf;

/// `rel` under the repository's `tests/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The folder of external test data.
pub fn external_dir() -> PathBuf {
    std::env::var_os("SDRS_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

/// `rel` under the external test data, or `None` after printing why the caller skips.
pub fn external(rel: &str) -> Option<PathBuf> {
    let p = external_dir().join(rel);
    if p.exists() {
        return Some(p);
    }
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let _ = writeln!(
        std::io::stderr(),
        "SKIP: {test}: {} is not here (external test data; set SDRS_SHARED)",
        p.display()
    );
    None
}
