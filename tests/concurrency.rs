//! The library from several threads at once: pipelines on one model file (one shared,
//! read-only mapping of its weights), and a run cancelled from another thread.
mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use sdrs::formats::DType;
use sdrs::ggml::Type;
use sdrs::pipeline::{Image, Pipeline, Request, Stage};
use sdrs::synth::Format;

fn assert_send<T: Send>() {}

/// A pipeline moves to another thread (the JNI library and servers hand them to
/// worker threads); it is not `Sync`, so two threads cannot run one pipeline at once:
/// each thread loads its own, and the weights' pages are shared by the mapping.
#[test]
fn pipelines_and_requests_can_move_between_threads() {
    assert_send::<Pipeline>();
    assert_send::<Request>();
    assert_send::<Image>();
}

fn tiny_model(dir: &Path) -> std::path::PathBuf {
    let src = common::synth_tiny("tiny-sd15", Format::Safetensors, DType::F32, dir);
    let out = dir.join("tiny.gguf");
    common::convert_to(&src, Type::Q8_0, &out).unwrap();
    out
}

fn request(seed: u64) -> Request {
    let mut r = Request::new("a red circle on a blue background");
    r.width = 64;
    r.height = 64;
    r.steps = 3;
    r.seed = seed;
    r
}

#[test]
fn two_threads_on_one_model_file_get_the_images_each_gets_alone() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let seeds = [11u64, 12, 13, 14];
    let alone: Vec<Vec<u8>> = {
        let p = Pipeline::load_with_threads(&model, 1).unwrap();
        seeds
            .iter()
            .map(|&s| p.generate(&request(s), &mut |_| {}).unwrap().rgb)
            .collect()
    };
    // Two threads, each with its own pipeline on the same file, each running two
    // seeds, interleaved with the other thread's runs.
    let together: Vec<(u64, Vec<u8>)> = std::thread::scope(|s| {
        let runs: Vec<_> = seeds
            .chunks(2)
            .map(|mine| {
                let model = &model;
                s.spawn(move || {
                    let p = Pipeline::load_with_threads(model, 1).unwrap();
                    mine.iter()
                        .map(|&seed| (seed, p.generate(&request(seed), &mut |_| {}).unwrap().rgb))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        runs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    for (seed, rgb) in together {
        let i = seeds.iter().position(|&s| s == seed).unwrap();
        assert!(rgb == alone[i], "seed {seed}: the image made beside another thread's run differs from the one made alone");
    }
}

#[test]
fn a_cancel_from_another_thread_stops_the_run_within_a_step() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let cancel = Arc::new(AtomicBool::new(false));
    let mut req = request(5);
    req.steps = 200;
    req.cancel = Some(Arc::clone(&cancel));
    let (tx, rx) = mpsc::channel();
    let run = std::thread::spawn(move || {
        let p = Pipeline::load_with_threads(&model, 1).unwrap();
        let mut last = 0;
        let r = p.generate(&req, &mut |s| {
            if let Stage::Step { done, .. } = s {
                last = done;
                let _ = tx.send(done);
            }
        });
        (r, last, Instant::now())
    });
    let first = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("a first step");
    cancel.store(true, Ordering::SeqCst);
    let asked = Instant::now();
    let steps_at_cancel = rx.try_iter().last().unwrap_or(first);
    let (r, last, ended) = run.join().unwrap();
    let e = r.expect_err("a cancelled run");
    assert!(matches!(e, sdrs::Error::Interrupted), "{e}");
    // The flag is read before each UNet evaluation: at most the step in flight finishes.
    assert!(
        last <= steps_at_cancel + 1,
        "{last} steps done, {steps_at_cancel} when cancelled"
    );
    assert!(last < 200);
    eprintln!(
        "cancelled after step {last}, {:?} after the flag was set",
        ended.saturating_duration_since(asked)
    );
}
