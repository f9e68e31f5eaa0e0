//! The fuzzing harness: one entry point per parser that reads what strangers send us.
//!
//! Each function takes arbitrary bytes, hands them to one parser the way a user's file
//! would reach it (as a file on disk, through the same `open` the CLI calls), and then
//! uses what came back as the rest of sdrs would. An error is the expected outcome for
//! almost every input; a panic, a hang or a runaway allocation is a finding.
//!
//! The fuzz targets in `fuzz/` call these under libFuzzer; `tests/fuzz_corpus.rs`
//! replays the committed seed corpora and every past finding through them in the
//! ordinary test suite, so a finding stays fixed without a fuzzing toolchain.
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::config::{ModelConfig, TextEncoderConfig};
use crate::formats::gguf::metadata;
use crate::formats::gguf::GgufFile;
use crate::formats::{ckpt, detect, diffusers, layout, pickle, safetensors, Checkpoint};
use crate::lora::Lora;
use crate::pipeline::canvas::{Canvas, CanvasOptions};
use crate::prompt::chunks::{Trigger, Windows};
use crate::prompt::embedding::Embedding;
use crate::prompt::{tags, Emphasis};
use crate::tokenizer::ClipTokenizer;
use crate::vocab::ClipVocab;

/// A fuzz target: its name (the `fuzz/fuzz_targets/<name>.rs` file and the corpus
/// folder) and its entry point, which returns whether the input was accepted.
pub type Target = (&'static str, fn(&[u8]) -> bool);

/// Every target, in the order the closing table of the hardening work lists them.
pub const TARGETS: &[Target] = &[
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("pickle", pickle),
    ("ckpt", ckpt),
    ("diffusers_config", diffusers_config),
    ("lora", lora),
    ("embedding", embedding),
    ("prompt", prompt),
    ("image", image),
    ("tokenizer", tokenizer),
];

/// Largest element count a harness turns into f32s or a LoRA update: enough for every
/// tensor a small input can describe honestly, and it keeps one run in milliseconds.
const MAX_EXPAND: u64 = 1 << 20;

thread_local! {
    /// A private scratch folder per thread (libFuzzer runs one input at a time per
    /// process; the test replays in parallel threads).
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

/// Runs `f` on a fresh, empty scratch folder of this thread.
fn in_scratch<R>(f: impl FnOnce(&Path) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.is_none() {
            *s = Some(
                tempfile::Builder::new()
                    .prefix("sdrs-fuzz")
                    .tempdir()
                    .expect("a scratch folder for fuzzing"),
            );
        }
        let dir = s
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default();
        clear(&dir);
        f(&dir)
    })
}

fn clear(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Writes `data` to `dir/name` (creating folders) and returns the path.
fn put(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("scratch folder");
    }
    std::fs::write(&p, data).expect("scratch file");
    p
}

fn sd1() -> &'static ModelConfig {
    static C: OnceLock<ModelConfig> = OnceLock::new();
    C.get_or_init(ModelConfig::sd1)
}

fn sdxl() -> &'static ModelConfig {
    static C: OnceLock<ModelConfig> = OnceLock::new();
    C.get_or_init(ModelConfig::sdxl)
}

/// The embedded CLIP tokenizer and its vocabulary size.
fn clip() -> &'static (ClipTokenizer, usize) {
    static T: OnceLock<(ClipTokenizer, usize)> = OnceLock::new();
    T.get_or_init(|| {
        let vocab = ClipVocab::embedded().expect("the embedded CLIP vocabulary");
        (
            ClipTokenizer::new(&vocab).expect("the embedded CLIP vocabulary builds"),
            vocab.tokens.len(),
        )
    })
}

/// Reads every tensor of a checkpoint the way the converter does, up to [`MAX_EXPAND`]
/// elements each, and checks the promise `Checkpoint::open` makes: every tensor it
/// returns can be read.
fn read_all(ck: &Checkpoint) {
    for t in &ck.tensors {
        if t.numel() <= MAX_EXPAND {
            if let Ok(v) = t.read_f32() {
                assert_eq!(v.len() as u64, t.numel(), "{}: read_f32 length", t.name);
            }
        }
    }
    let shapes: Vec<(&str, &[usize])> = ck
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    let _ = detect::detect(&shapes);
}

/// A GGUF file: header, metadata, tensor directory, offsets and alignment, then what
/// sdrs reads from the metadata (model config and the tensors it implies, defaults,
/// tokenizer, original shapes) and the file opened as a conversion input.
pub fn gguf(data: &[u8]) -> bool {
    in_scratch(|dir| {
        let path = put(dir, "model.gguf", data);
        let Ok(g) = GgufFile::open(&path) else {
            return false;
        };
        let len = g.file_len();
        for t in &g.tensors {
            let end = g.data_offset + t.offset + t.nbytes;
            assert!(
                end <= len,
                "{}: tensor ends at {end}, past the file's {len} bytes",
                t.name
            );
            assert_eq!(g.data(t).len() as u64, t.nbytes);
        }
        if let Ok(Some(cfg)) = metadata::read_config(&g) {
            let _ = cfg.pooled_dim();
            // The tensors the config implies, as converting the file plans them.
            let _ = layout::layout(&cfg);
        }
        let _ = metadata::read_defaults(&g);
        let _ = metadata::original_shapes(&g);
        // What a run does first: every tensor placed for the graphs, those stored in a
        // form they cannot take (another writer's vectors and blocks) converted.
        let _ = crate::model::Weights::load(&g, |_| true);
        if let Some(vocab) = metadata::read_tokenizer(&g) {
            if let Ok(tok) = ClipTokenizer::new(&vocab) {
                let _ = tok.encode("a photo of an astronaut, riding a horse");
            }
        }
        drop(g);
        if let Ok(ck) = Checkpoint::open(&path) {
            read_all(&ck);
        }
        true
    })
}

/// A `.safetensors` file: header length, header JSON, offsets and dtypes, then every
/// tensor read and the architecture detected from the names and shapes.
pub fn safetensors(data: &[u8]) -> bool {
    in_scratch(|dir| {
        let path = put(dir, "model.safetensors", data);
        let Ok(ck) = safetensors::open(&path) else {
            return false;
        };
        let ok = ck.tensors.iter().all(|t| t.validate().is_ok());
        if ok {
            read_all(&ck);
        }
        ok
    })
}

/// A pickle stream: straight into the restricted unpickler, then wrapped as the
/// `data.pkl` of a torch zip so the state-dict walk behind it sees what it built.
pub fn pickle(data: &[u8]) -> bool {
    let Ok(u) = pickle::unpickle(Path::new("fuzz.ckpt"), "archive/data.pkl", data) else {
        return false;
    };
    let _ = u.get(u.root()).kind();
    for o in u.objects() {
        let _ = o.kind();
    }
    in_scratch(|dir| {
        // Storages `0`..`3` exist, so tensors that point at them within 256 bytes are
        // well-formed and get read.
        let path = dir.join("model.ckpt");
        let Ok(()) = ckpt::write_archive(&path, data, &[&[0u8; 256][..]; 4]) else {
            return true;
        };
        if let Ok(ck) = ckpt::open(&path) {
            read_all(&ck);
        }
        true
    })
}

/// A torch zip checkpoint (`.ckpt`/`.pt`/`.bin`): the zip directory, record names,
/// the pickle inside and the storages it points at.
pub fn ckpt(data: &[u8]) -> bool {
    in_scratch(|dir| {
        let path = put(dir, "model.ckpt", data);
        let Ok(ck) = Checkpoint::open(&path) else {
            return false;
        };
        read_all(&ck);
        true
    })
}

/// The config files of a diffusers folder. The input is the folder's files joined by
/// 0xFF bytes (which valid JSON never holds), in the order of [`DIFFUSERS_FILES`];
/// missing ones are left out of the folder. Then the weight-name plans the configs imply.
pub fn diffusers_config(data: &[u8]) -> bool {
    in_scratch(|dir| {
        for (part, name) in data.split(|&b| b == 0xFF).zip(DIFFUSERS_FILES) {
            if !part.is_empty() {
                put(dir, name, part);
            }
        }
        let _ = diffusers::read_defaults(dir);
        let Ok(cfg) = diffusers::read_config(dir) else {
            return false;
        };
        let _ = diffusers::names::unet(&cfg.unet);
        if let Some(v) = &cfg.vae {
            let _ = diffusers::names::vae(v);
        }
        for t in &cfg.text_encoders {
            let _ = diffusers::names::text(t);
        }
        true
    })
}

/// The files [`diffusers_config`] splits its input into, in order.
pub const DIFFUSERS_FILES: &[&str] = &[
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/special_tokens_map.json",
];

/// A LoRA file (any checkpoint format) mapped onto SD 1.5 and onto SDXL, and the
/// updates of its pairs computed where they are small.
pub fn lora(data: &[u8]) -> bool {
    in_scratch(|dir| {
        let path = put(dir, "style.safetensors", data);
        let mut any = false;
        for cfg in [sd1(), sdxl()] {
            let Ok(l) = Lora::open(&path, cfg) else {
                continue;
            };
            any = true;
            for p in &l.pairs {
                let n: u64 = p.target.shape.iter().map(|&d| d as u64).product();
                if n <= MAX_EXPAND {
                    if let Ok(d) = p.delta(0.8) {
                        assert_eq!(d.len() as u64, n, "{}: update length", p.key);
                    }
                }
            }
        }
        any
    })
}

/// A textual-inversion embedding (A1111 `.pt`/`.safetensors`, diffusers `learned_embeds`,
/// SDXL `clip_l`/`clip_g`) for SD 1.5's and SDXL's encoders.
pub fn embedding(data: &[u8]) -> bool {
    in_scratch(|dir| {
        let path = put(dir, "birb-style.safetensors", data);
        let mut any = false;
        for cfg in [sd1(), sdxl()] {
            let encoders: &[TextEncoderConfig] = &cfg.text_encoders;
            any |= Embedding::open(&path, encoders).is_ok();
        }
        any
    })
}

/// A prompt: LoRA tags taken out, weights and `BREAK` parsed, then cut into 77-token
/// windows with a textual-inversion trigger in play.
pub fn prompt(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let Ok((text, _tags)) = tags::take_loras(&text) else {
        return false;
    };
    let (tok, _) = clip();
    let Ok(ids) = tok.encode("<birb-style>") else {
        return false;
    };
    let triggers = [Trigger {
        ids,
        vectors: 3,
        embedding: 0,
    }];
    let Ok(windows) = Windows::new(tok, 77, tok.eos_id(), &triggers) else {
        return false;
    };
    let mut ok = true;
    for e in [Emphasis::Original, Emphasis::None] {
        match e.pieces(&text).and_then(|p| windows.chunks(&p)) {
            Ok(chunks) => {
                for c in &chunks {
                    assert_eq!(c.ids.len(), 77);
                    assert_eq!(c.weights.len(), 77);
                }
            }
            Err(_) => ok = false,
        }
    }
    ok
}

/// An init image and a mask (PNG, JPEG or anything else the decoder guesses). The first
/// byte picks the options (mask or not, output size, outpainting pads, blur); the rest
/// is split at its middle into the image file and the mask file.
pub fn image(data: &[u8]) -> bool {
    let Some((&sel, rest)) = data.split_first() else {
        return false;
    };
    let (img, mask) = if sel & 1 == 1 {
        rest.split_at(rest.len() / 2)
    } else {
        (rest, &[][..])
    };
    let opts = CanvasOptions {
        size: match (sel >> 1) & 3 {
            1 => Some((64, 64)),
            2 => Some((48, 80)),
            _ => None,
        },
        multiple: 8,
        pad: if sel & 8 != 0 { [8, 0, 16, 8] } else { [0; 4] },
        mask_blur: if sel & 16 != 0 { 3.0 } else { 0.0 },
    };
    in_scratch(|dir| {
        let image = put(dir, "init.png", img);
        let mask = (sel & 1 == 1).then(|| put(dir, "mask.png", mask));
        match Canvas::open(&image, mask.as_deref(), &opts) {
            Ok(c) => {
                assert_eq!(c.rgb.len(), c.width * c.height * 3);
                if let Some(m) = &c.mask {
                    assert_eq!(m.len(), c.width * c.height);
                }
                true
            }
            Err(_) => false,
        }
    })
}

/// The CLIP tokenizer on arbitrary text (invalid UTF-8 replaced, as a prompt from a
/// file would be): every id it gives is in the vocabulary, and the padded form has
/// exactly the length asked for.
pub fn tokenizer(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let (tok, n) = clip();
    let Ok(ids) = tok.encode(&text) else {
        return false;
    };
    assert!(
        ids.iter().all(|&i| (i as usize) < *n),
        "an id outside the vocabulary"
    );
    let padded = tok
        .encode_padded(&text, 77, tok.eos_id())
        .expect("padding what encoded");
    assert_eq!(padded.len(), 77);
    true
}
