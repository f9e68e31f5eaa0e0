//! Hostile headers: small files whose counts and lengths claim far more than the file
//! holds. Each must be refused at once, naming the file, having allocated little:
//! allocation is bounded by what the file could hold, never by what it claims. Zip bombs
//! too: a compressed record is read no further than its declared, bounded size.
//!
//! The whole binary counts heap bytes (a counting global allocator), and its one test
//! runs the cases in turn, so the peak it sees is the parser's own.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Heap bytes allocated at the peak of `f`, above what was live when it started.
fn peak_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed) - base)
}

fn gguf_header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b
}

fn gguf_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn padded(mut b: Vec<u8>, len: usize) -> Vec<u8> {
    b.resize(len.max(b.len()), 0);
    b
}

/// A file of a case: its bytes and the words its refusal must contain.
struct Case {
    name: &'static str,
    file: &'static str,
    bytes: Vec<u8>,
    says: &'static str,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    // A 1 KB GGUF with one tensor of 2^40 f32 elements.
    let mut b = gguf_header(1, 0);
    gguf_str(&mut b, "model.diffusion_model.out.2.weight");
    b.extend(2u32.to_le_bytes());
    b.extend((1u64 << 20).to_le_bytes());
    b.extend((1u64 << 20).to_le_bytes());
    b.extend(0u32.to_le_bytes()); // f32
    b.extend(0u64.to_le_bytes());
    v.push(Case {
        name: "GGUF tensor of 2^40 elements",
        file: "huge-tensor.gguf",
        bytes: padded(b, 1024),
        says: "the data section has",
    });
    v.push(Case {
        name: "GGUF claiming 2^40 metadata entries",
        file: "kv.gguf",
        bytes: padded(gguf_header(0, 1 << 40), 1024),
        says: "metadata entries cannot fit",
    });
    v.push(Case {
        name: "GGUF claiming 2^40 tensors",
        file: "tensors.gguf",
        bytes: padded(gguf_header(1 << 40, 0), 1024),
        says: "tensors cannot fit",
    });
    let mut b = gguf_header(0, 1);
    gguf_str(&mut b, "general.name");
    b.extend(8u32.to_le_bytes()); // string
    b.extend((1u64 << 40).to_le_bytes());
    v.push(Case {
        name: "GGUF string of 2^40 bytes",
        file: "string.gguf",
        bytes: padded(b, 1024),
        says: "string of",
    });
    let mut b = gguf_header(0, 1);
    gguf_str(&mut b, "tokenizer.ggml.merges");
    b.extend(9u32.to_le_bytes()); // array
    b.extend(8u32.to_le_bytes()); // of strings
    b.extend((1u64 << 40).to_le_bytes());
    v.push(Case {
        name: "GGUF array of 2^40 strings",
        file: "array.gguf",
        bytes: padded(b, 1024),
        says: "array of",
    });
    // safetensors: a header length of 2^40, and a header whose tensor claims 2^40 elements.
    let mut b = (1u64 << 40).to_le_bytes().to_vec();
    b.extend(b"{}");
    v.push(Case {
        name: "safetensors header of 2^40 bytes",
        file: "header.safetensors",
        bytes: padded(b, 1024),
        says: "invalid safetensors header",
    });
    let json = format!(
        r#"{{"w":{{"dtype":"F32","shape":[1048576,1048576],"data_offsets":[0,{}]}}}}"#,
        4u64 << 40
    );
    let mut b = (json.len() as u64).to_le_bytes().to_vec();
    b.extend(json.as_bytes());
    v.push(Case {
        name: "safetensors tensor of 2^40 elements",
        file: "tensor.safetensors",
        bytes: padded(b, 1024),
        says: "invalid safetensors header",
    });
    v
}

#[test]
fn headers_claiming_more_than_the_file_holds_are_refused_with_little_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for c in cases() {
        let path = dir.path().join(c.file);
        std::fs::write(&path, &c.bytes).unwrap();
        let (r, peak) = peak_of(|| sdrs::formats::Checkpoint::open(&path).map(|_| ()));
        let msg = match r {
            Ok(()) => panic!("{}: accepted", c.name),
            Err(e) => e.to_string(),
        };
        assert!(
            msg.contains(c.file),
            "{}: the error does not name the file: {msg}",
            c.name
        );
        assert!(
            msg.contains(c.says),
            "{}: expected `{}` in: {msg}",
            c.name,
            c.says
        );
        // 64 KiB: the file is 1 KiB; a parser that sized anything by the claim would
        // have asked for terabytes (and failed, or been killed).
        assert!(
            peak < 64 << 10,
            "{}: allocated {peak} bytes for a {}-byte file",
            c.name,
            c.bytes.len()
        );
        report.push(format!("{}: {peak} bytes", c.name));
    }
    // A pickle inside a torch zip claiming a 2^40-byte string and a 2^32-entry memo.
    for (name, pkl) in [
        (
            "pickle BINUNICODE8 of 2^40 bytes",
            [&[0x80, 2, 0x8d][..], &(1u64 << 40).to_le_bytes()].concat(),
        ),
        (
            "pickle memo index 2^32-1",
            vec![0x80, 2, b'N', b'r', 0xff, 0xff, 0xff, 0xff, b'.'],
        ),
        (
            "pickle LONG_BINGET of an absent memo entry",
            vec![0x80, 2, b'j', 0xff, 0xff, 0xff, 0x7f, b'.'],
        ),
    ] {
        let path = dir.path().join("hostile.ckpt");
        sdrs::formats::ckpt::write_archive(&path, &pkl, &[]).unwrap();
        let (r, peak) = peak_of(|| sdrs::formats::Checkpoint::open(&path).map(|_| ()));
        let msg = r.expect_err(name).to_string();
        assert!(
            msg.contains("hostile.ckpt") && msg.contains("data.pkl"),
            "{name}: {msg}"
        );
        assert!(peak < 256 << 10, "{name}: allocated {peak} bytes");
        report.push(format!("{name}: {peak} bytes"));
    }
    // Zip bombs: a deflated `data.pkl` of 80 MiB of zeros (80 KiB on disk), with its real
    // size in the headers and with the headers lying that it is 1000 bytes.
    for (name, declared, says) in [
        ("zip bomb, size declared", None, "more than the"),
        (
            "zip bomb, size declared as 1000 bytes",
            Some(1000),
            "more than the 1000 bytes its header declares",
        ),
    ] {
        let path = dir.path().join("bomb.ckpt");
        std::fs::write(&path, zip_bomb(80 << 20, declared)).unwrap();
        let (r, peak) = peak_of(|| sdrs::formats::Checkpoint::open(&path).map(|_| ()));
        let msg = r.expect_err(name).to_string();
        assert!(
            msg.contains("bomb.ckpt") && msg.contains("data.pkl") && msg.contains(says),
            "{name}: {msg}"
        );
        assert!(peak < 256 << 10, "{name}: allocated {peak} bytes");
        report.push(format!("{name}: {peak} bytes"));
    }
    eprintln!("{}", report.join("\n"));
}

/// A torch zip whose `data.pkl` is `inflated` zero bytes, deflated; with `declared`, both of
/// its headers (local and central) claim that size instead.
fn zip_bomb(inflated: usize, declared: Option<u32>) -> Vec<u8> {
    use std::io::Write;
    use zip::write::SimpleFileOptions;
    let mut zw = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    zw.start_file(
        "archive/data.pkl",
        SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated),
    )
    .unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..inflated >> 20 {
        zw.write_all(&zeros).unwrap();
    }
    zw.start_file("archive/version", SimpleFileOptions::default())
        .unwrap();
    zw.write_all(b"3\n").unwrap();
    let mut b = zw.finish().unwrap().into_inner();
    if let Some(size) = declared {
        // The uncompressed size sits 22 bytes into the local header (the first record)
        // and 24 into its central directory entry, the first, whose offset the end
        // record holds 16 bytes in (APPNOTE 4.3.7, 4.3.12, 4.3.16).
        let end = b.windows(4).rposition(|w| w == b"PK\x05\x06").unwrap();
        let central = u32::from_le_bytes(b[end + 16..end + 20].try_into().unwrap()) as usize;
        for at in [22, central + 24] {
            assert_eq!(
                b[at..at + 4],
                (inflated as u32).to_le_bytes(),
                "not a plain zip header at {at}"
            );
            b[at..at + 4].copy_from_slice(&size.to_le_bytes());
        }
    }
    b
}
