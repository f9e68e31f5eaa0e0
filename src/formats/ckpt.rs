//! PyTorch zip checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin` written by `torch.save`),
//! read through the restricted unpickler of [`super::pickle`] and written in the
//! same layout.
//!
//! A torch zip holds `<prefix>/data.pkl` (the pickled object, whose tensors point at
//! storages through persistent ids) and one uncompressed record per storage at
//! `<prefix>/data/<key>`. Tensors are served straight from those records: a tensor
//! becomes [`TensorData::Raw`] at the record's data offset plus its storage offset,
//! so nothing is copied or decompressed.
//!
//! Naming: nested dicts are flattened into dot-joined names in file order. When the
//! top level holds a `state_dict` dict (Lightning / original SD `.ckpt` files), the
//! tensors are that dict's; otherwise every tensor reachable through dicts is
//! listed (`{"string_to_param": {"*": t}}` gives `string_to_param.*`). Scalar
//! leaves (ints, floats, strings, bools) outside the state dict become metadata
//! (`global_step`, an embedding's `name`); other values (lists, None) are ignored.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::Path;
use std::sync::Arc;

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

use super::pickle::{self, ObjId, Object, TensorRef, Unpickled};
use super::source::{DType, SourceFile, SourceFormat};
use super::{Checkpoint, SourceTensor, TensorData};
use crate::error::{Error, Result};

/// The tensor description [`write`] takes (shared with the safetensors writer).
pub use super::safetensors::WriteSpec;

/// Deepest dict nesting followed when flattening names.
const MAX_DICT_DEPTH: usize = 64;
/// Longest flattened tensor name.
const MAX_NAME_BYTES: usize = 4096;
/// Metadata values longer than this are cut; at most this many metadata entries.
const MAX_META_VALUE_CHARS: usize = 4096;
const MAX_META_ENTRIES: usize = 4096;
/// Alignment of record data in written archives (what torch uses).
const RECORD_ALIGNMENT: u16 = 64;

/// Opens a torch zip checkpoint.
pub fn open(path: &Path) -> Result<Checkpoint> {
    let (tensors, metadata) = read_tensors(path)?;
    Ok(Checkpoint {
        path: path.to_path_buf(),
        format: SourceFormat::Ckpt,
        tensors,
        metadata,
        tokenizer: None,
    })
}

/// Same contract as `safetensors::read_tensors`: the flattened tensor directory of a torch zip file.
pub fn read_tensors(path: &Path) -> Result<(Vec<SourceTensor>, BTreeMap<String, String>)> {
    let file = SourceFile::open(path)?;
    let mut head = [0u8; 4];
    let n = (file.len as usize).min(4);
    file.read_at(0, &mut head[..n])?;
    if n == 4 && head[0] == 0x80 && head[2] == 0x8a {
        return Err(Error::format(
            path,
            "this is a legacy (pre-1.6) torch pickle file, not a torch zip; it is not supported: re-save it with a current torch.save or convert it to safetensors",
        ));
    }
    let mut zip = ZipArchive::new(BufReader::new(&file.file)).map_err(|e| {
        Error::format(
            path,
            format!("not a readable torch zip checkpoint (truncated or corrupt?): {e}"),
        )
    })?;

    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    if let Some(bad) = names.iter().find(|n| escapes_archive(n)) {
        return Err(Error::format(path, format!("zip entry name {:?} is an absolute path or climbs out with `..`; refusing the archive", shorten(bad))));
    }
    let pkls: Vec<&String> = names
        .iter()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .collect();
    let pkl_name = match pkls.as_slice() {
        [one] => (*one).clone(),
        [] => {
            return Err(Error::format(
                path,
                "zip archive has no `<archive>/data.pkl`: not a torch checkpoint",
            ))
        }
        many => {
            return Err(Error::format(
                path,
                format!(
                    "zip archive has {} `data.pkl` records ({}); expected one",
                    many.len(),
                    many.iter()
                        .take(4)
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))
        }
    };
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];

    let byteorder_name = format!("{prefix}byteorder");
    if zip.index_for_name(&byteorder_name).is_some() {
        let order = read_small_record(&mut zip, path, &byteorder_name, 64)?;
        let order = String::from_utf8_lossy(&order);
        if order.trim() != "little" {
            return Err(Error::format(
                path,
                format!(
                    "`{byteorder_name}` says {:?}: only little-endian checkpoints are supported",
                    shorten(order.trim())
                ),
            ));
        }
    }

    let pkl = read_small_record(&mut zip, path, &pkl_name, pickle::MAX_PICKLE_BYTES)?;
    let graph = pickle::unpickle(path, &pkl_name, &pkl)?;
    drop(pkl);
    let (found, metadata) = flatten(path, &graph)?;

    let mut entries: HashMap<String, StorageEntry> = HashMap::new();
    let mut tensors = Vec::with_capacity(found.len());
    for (name, t) in found {
        let record = format!("{prefix}data/{}", t.storage.key);
        let entry = match entries.get(&record) {
            Some(e) => *e,
            None => {
                let e = storage_entry(&mut zip, &file, &record, &name)?;
                entries.insert(record.clone(), e);
                e
            }
        };
        let tensor = place_tensor(&file, name, t, &record, entry)?;
        tensor.validate()?;
        tensors.push(tensor);
    }
    Ok((tensors, metadata))
}

/// Whether a zip entry name could escape an extraction folder.
fn escapes_archive(name: &str) -> bool {
    name.starts_with('/')
        || name.contains('\\')
        || name.contains('\0')
        || name.as_bytes().get(1) == Some(&b':')
        || name.split('/').any(|c| c == "..")
}

fn shorten(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Reads a whole record, decompressing if needed, refusing more than `max` bytes.
fn read_small_record<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    path: &Path,
    name: &str,
    max: usize,
) -> Result<Vec<u8>> {
    let idx = zip
        .index_for_name(name)
        .ok_or_else(|| Error::format(path, format!("zip record `{name}` is missing")))?;
    let mut f = zip
        .by_index(idx)
        .map_err(|e| Error::format(path, format!("cannot read zip record `{name}`: {e}")))?;
    let declared = f.size();
    if declared > max as u64 {
        return Err(Error::format(
            path,
            format!("zip record `{name}` is {declared} bytes, more than the {max} accepted"),
        ));
    }
    // The zip crate inflates until the deflate stream ends, whatever size the archive
    // declared, so a bomb (a small record that inflates to gigabytes) is stopped here:
    // one byte past the declared size is proof enough. The declared size itself may be
    // a lie in a tiny file, so only a little is reserved on its word.
    let mut buf = Vec::with_capacity(declared.min(1 << 20) as usize);
    (&mut f)
        .take(declared + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            Error::format(
                path,
                format!("cannot read zip record `{name}` (truncated or corrupt?): {e}"),
            )
        })?;
    if buf.len() as u64 > declared {
        return Err(Error::format(path, format!("zip record `{name}` inflates to more than the {declared} bytes its header declares (a zip bomb, or a corrupt archive)")));
    }
    Ok(buf)
}

/// Where a storage record's bytes lie in the file.
#[derive(Clone, Copy, Debug)]
struct StorageEntry {
    data_start: u64,
    size: u64,
}

fn storage_entry<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    file: &SourceFile,
    record: &str,
    tensor: &str,
) -> Result<StorageEntry> {
    let path = &file.path;
    let idx = zip
        .index_for_name(record)
        .ok_or_else(|| Error::format(path, format!("tensor `{tensor}` refers to storage record `{record}`, which is not in the archive")))?;
    let f = zip.by_index_raw(idx).map_err(|e| {
        Error::format(
            path,
            format!("cannot locate storage record `{record}` (truncated or corrupt?): {e}"),
        )
    })?;
    if f.encrypted() {
        return Err(Error::format(
            path,
            format!("storage record `{record}` is encrypted"),
        ));
    }
    if f.compression() != CompressionMethod::Stored {
        return Err(Error::format(
            path,
            format!("storage record `{record}` is compressed ({}); torch stores storages uncompressed and they are read in place, so re-save the checkpoint without compression", f.compression()),
        ));
    }
    if f.compressed_size() != f.size() {
        return Err(Error::format(
            path,
            format!(
                "storage record `{record}` is stored but its sizes disagree ({} vs {} bytes)",
                f.compressed_size(),
                f.size()
            ),
        ));
    }
    let e = StorageEntry {
        data_start: f.data_start(),
        size: f.size(),
    };
    match e.data_start.checked_add(e.size) {
        Some(end) if end <= file.len => Ok(e),
        _ => Err(Error::format(
            path,
            format!(
                "storage record `{record}` ends at byte {} but the file has {} (truncated?)",
                e.data_start.saturating_add(e.size),
                file.len
            ),
        )),
    }
}

fn place_tensor(
    file: &Arc<SourceFile>,
    name: String,
    t: &TensorRef,
    record: &str,
    entry: StorageEntry,
) -> Result<SourceTensor> {
    let path = &file.path;
    if !t.is_contiguous() {
        return Err(Error::format(path, format!("tensor `{name}` is not contiguous (shape {:?}, stride {:?}); only contiguous tensors can be read in place", t.shape, t.stride)));
    }
    let elem = t.dtype.bytes_for(1).unwrap_or(1);
    let range = t
        .numel()
        .and_then(|n| t.dtype.bytes_for(n))
        .and_then(|nbytes| {
            let start = t.storage_offset.checked_mul(elem)?;
            Some((start, start.checked_add(nbytes)?))
        });
    match range {
        Some((start, end)) if end <= entry.size => Ok(SourceTensor {
            name,
            shape: t.shape.clone(),
            dtype: t.dtype,
            data: TensorData::Raw { file: file.clone(), offset: entry.data_start + start },
        }),
        Some((start, end)) => Err(Error::format(
            path,
            format!("tensor `{name}` ({} {:?}) needs bytes {start}..{end} of storage record `{record}`, which has only {} (storage too small)", t.dtype.name(), t.shape, entry.size),
        )),
        None => Err(Error::format(path, format!("tensor `{name}`: shape {:?} at storage offset {} overflows", t.shape, t.storage_offset))),
    }
}

/// A checkpoint's (name, tensor) pairs and its scalar metadata.
type Flat<'a> = (Vec<(String, &'a TensorRef)>, BTreeMap<String, String>);

/// Walks the unpickled object into (name, tensor) pairs and scalar metadata.
fn flatten<'a>(path: &Path, g: &'a Unpickled) -> Result<Flat<'a>> {
    let root = g.root();
    let Object::Dict(top) = g.get(root) else {
        return Err(Error::format(
            path,
            format!(
                "data.pkl holds a {}, not a dict of tensors",
                g.get(root).kind()
            ),
        ));
    };
    let mut f = Flattener {
        path,
        g,
        visits: 0,
        max_visits: g.len().saturating_mul(2).saturating_add(1024),
        on_path: Vec::new(),
        tensors: Vec::new(),
        index: HashMap::new(),
        meta: BTreeMap::new(),
    };
    // The last `state_dict` key wins, as in a Python dict.
    let state_dict = top
        .iter()
        .rev()
        .find(|(k, _)| matches!(g.get(*k), Object::Str(s) if s == "state_dict"))
        .map(|&(_, v)| v)
        .filter(|&v| matches!(g.get(v), Object::Dict(_)));
    match state_dict {
        Some(sd) => {
            f.walk(sd, "", 0, false)?;
            for &(k, v) in top {
                if let Some(key) = key_string(g.get(k)) {
                    f.scalar(key, g.get(v));
                }
            }
        }
        None => f.walk(root, "", 0, true)?,
    }
    Ok((f.tensors, f.meta))
}

fn key_string(o: &Object) -> Option<String> {
    match o {
        Object::Str(s) => Some(s.clone()),
        Object::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

struct Flattener<'a, 'p> {
    path: &'p Path,
    g: &'a Unpickled,
    visits: usize,
    max_visits: usize,
    on_path: Vec<ObjId>,
    tensors: Vec<(String, &'a TensorRef)>,
    index: HashMap<String, usize>,
    meta: BTreeMap<String, String>,
}

impl<'a> Flattener<'a, '_> {
    fn walk(&mut self, dict: ObjId, prefix: &str, depth: usize, with_meta: bool) -> Result<()> {
        let g = self.g;
        let Object::Dict(items) = g.get(dict) else {
            return Ok(());
        };
        if depth >= MAX_DICT_DEPTH {
            return Err(Error::format(
                self.path,
                format!(
                    "data.pkl: dicts nested deeper than {MAX_DICT_DEPTH} levels (at `{}`)",
                    shorten(prefix)
                ),
            ));
        }
        if self.on_path.contains(&dict) {
            return Err(Error::format(
                self.path,
                format!("data.pkl: dict `{}` contains itself", shorten(prefix)),
            ));
        }
        self.on_path.push(dict);
        for &(k, v) in items {
            self.visits += 1;
            if self.visits > self.max_visits {
                return Err(Error::format(self.path, "data.pkl: the same dicts are referenced from too many places (more names than the pickle could hold)"));
            }
            let Some(key) = key_string(g.get(k)) else {
                continue;
            };
            let name = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}.{key}")
            };
            if name.len() > MAX_NAME_BYTES {
                return Err(Error::format(
                    self.path,
                    format!(
                        "data.pkl: tensor name longer than {MAX_NAME_BYTES} bytes (`{}...`)",
                        shorten(&name)
                    ),
                ));
            }
            match g.get(v) {
                Object::Tensor(t) => match self.index.get(&name) {
                    Some(&i) => {
                        if let Some(slot) = self.tensors.get_mut(i) {
                            slot.1 = t;
                        }
                    }
                    None => {
                        self.index.insert(name.clone(), self.tensors.len());
                        self.tensors.push((name, t));
                    }
                },
                Object::Dict(_) => self.walk(v, &name, depth + 1, with_meta)?,
                o if with_meta => self.scalar(name, o),
                _ => {}
            }
        }
        self.on_path.pop();
        Ok(())
    }

    fn scalar(&mut self, name: String, o: &Object) {
        let value = match o {
            Object::Int(i) => i.to_string(),
            Object::Float(f) => f.to_string(),
            Object::Bool(b) => if *b { "True" } else { "False" }.to_string(),
            Object::Str(s) => s.chars().take(MAX_META_VALUE_CHARS).collect(),
            _ => return,
        };
        if self.meta.len() < MAX_META_ENTRIES || self.meta.contains_key(&name) {
            self.meta.insert(name, value);
        }
    }
}

/// Streams a torch zip checkpoint to `out`: `archive/data.pkl` (an `OrderedDict` of
/// `_rebuild_tensor_v2` calls, inside `{"state_dict": ...}` when `wrap_state_dict`),
/// `archive/byteorder`, one stored record `archive/data/<i>` per tensor with its data
/// 64-byte aligned, then `archive/version`. Tensor `i`'s bytes come from `fill(i, buf)`
/// (little-endian, exactly the spec's size), one tensor in memory at a time.
/// Supported dtypes: F32, F16, BF16, F64, I64, I32, I16, I8, U8, Bool.
pub fn write<W: Write + Seek>(
    out: W,
    specs: &[WriteSpec],
    wrap_state_dict: bool,
    fill: impl FnMut(usize, &mut Vec<u8>) -> Result<()>,
) -> Result<W> {
    write_impl(
        out,
        Path::new("<ckpt output>"),
        specs,
        wrap_state_dict,
        fill,
    )
}

/// [`write`] to a new file at `path`.
pub fn write_file(
    path: &Path,
    specs: &[WriteSpec],
    wrap_state_dict: bool,
    fill: impl FnMut(usize, &mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    let f = File::create(path).map_err(|e| Error::io(path, e))?;
    let w = write_impl(
        BufWriter::with_capacity(1 << 20, f),
        path,
        specs,
        wrap_state_dict,
        fill,
    )?;
    let f = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// A torch zip of a given pickle: `pkl` as `archive/data.pkl` and `records[i]` as
/// `archive/data/{i}`, as torch lays them out. For tests and the fuzz harness, which
/// wrap arbitrary pickles this way to reach the state-dict walk behind the unpickler.
pub fn write_archive(path: &Path, pkl: &[u8], records: &[&[u8]]) -> Result<()> {
    let zerr = |e: zip::result::ZipError| Error::io(path, e.into());
    let ioerr = |e: std::io::Error| Error::io(path, e);
    let f = File::create(path).map_err(ioerr)?;
    let opts = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .with_alignment(RECORD_ALIGNMENT);
    let mut zw = ZipWriter::new(BufWriter::new(f));
    zw.start_file("archive/data.pkl", opts).map_err(zerr)?;
    zw.write_all(pkl).map_err(ioerr)?;
    for (i, r) in records.iter().enumerate() {
        zw.start_file(format!("archive/data/{i}"), opts)
            .map_err(zerr)?;
        zw.write_all(r).map_err(ioerr)?;
    }
    zw.start_file("archive/version", opts).map_err(zerr)?;
    zw.write_all(b"3\n").map_err(ioerr)?;
    zw.finish().map_err(zerr)?.flush().map_err(ioerr)
}

fn write_impl<W: Write + Seek>(
    out: W,
    label: &Path,
    specs: &[WriteSpec],
    wrap_state_dict: bool,
    mut fill: impl FnMut(usize, &mut Vec<u8>) -> Result<()>,
) -> Result<W> {
    let zerr = |e: zip::result::ZipError| Error::io(label, e.into());
    let ioerr = |e: std::io::Error| Error::io(label, e);
    let mut sizes = Vec::with_capacity(specs.len());
    for s in specs {
        if pickle::storage_class_name(s.dtype).is_none() {
            return Err(Error::Invalid(format!(
                "tensor `{}`: torch checkpoints cannot store type {}",
                s.name,
                s.dtype.name()
            )));
        }
        let bytes = s
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .and_then(|n| s.dtype.bytes_for(n));
        sizes.push(bytes.ok_or_else(|| {
            Error::Invalid(format!(
                "tensor `{}`: shape {:?} is too large",
                s.name, s.shape
            ))
        })?);
    }
    let refs: Vec<(&str, DType, &[usize])> = specs
        .iter()
        .map(|s| (s.name.as_str(), s.dtype, s.shape.as_slice()))
        .collect();
    let pkl = pickle::state_dict_pickle(&refs, wrap_state_dict)?;
    drop(refs);

    let opts = |bytes: u64| {
        SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .with_alignment(RECORD_ALIGNMENT)
            .large_file(bytes >= u32::MAX as u64)
    };
    let mut zw = ZipWriter::new(out);
    zw.start_file("archive/data.pkl", opts(pkl.len() as u64))
        .map_err(zerr)?;
    zw.write_all(&pkl).map_err(ioerr)?;
    drop(pkl);
    zw.start_file("archive/byteorder", opts(6)).map_err(zerr)?;
    zw.write_all(b"little").map_err(ioerr)?;
    let mut buf = Vec::new();
    for (i, (s, &size)) in specs.iter().zip(&sizes).enumerate() {
        buf.clear();
        fill(i, &mut buf)?;
        if buf.len() as u64 != size {
            return Err(Error::Invalid(format!(
                "tensor `{}`: wrote {} bytes, expected {size}",
                s.name,
                buf.len()
            )));
        }
        zw.start_file(format!("archive/data/{i}"), opts(size))
            .map_err(zerr)?;
        zw.write_all(&buf).map_err(ioerr)?;
    }
    zw.start_file("archive/version", opts(2)).map_err(zerr)?;
    zw.write_all(b"3\n").map_err(ioerr)?;
    zw.finish().map_err(zerr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::pickle::PickleWriter;
    use std::io::Cursor;

    fn spec(name: &str, shape: &[usize], dtype: DType) -> WriteSpec {
        WriteSpec {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype,
        }
    }

    fn pseudo_random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    /// Writes `specs` with random contents to a temp file; returns it and the contents.
    fn write_random(specs: &[WriteSpec], wrap: bool) -> (tempfile::NamedTempFile, Vec<Vec<u8>>) {
        let data: Vec<Vec<u8>> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let n: usize = s.shape.iter().product();
                pseudo_random_bytes(s.dtype.bytes_for(n as u64).unwrap() as usize, i as u64 + 7)
            })
            .collect();
        let tmp = tempfile::Builder::new().suffix(".ckpt").tempfile().unwrap();
        write_file(tmp.path(), specs, wrap, |i, out| {
            out.extend_from_slice(&data[i]);
            Ok(())
        })
        .unwrap();
        (tmp, data)
    }

    /// A zip with the given records (name, bytes, compressed?).
    fn zip_file(records: &[(&str, &[u8], bool)]) -> tempfile::NamedTempFile {
        let tmp = tempfile::Builder::new().suffix(".pt").tempfile().unwrap();
        let mut zw = ZipWriter::new(File::create(tmp.path()).unwrap());
        for (name, bytes, deflate) in records {
            let m = if *deflate {
                CompressionMethod::Deflated
            } else {
                CompressionMethod::Stored
            };
            zw.start_file(
                *name,
                SimpleFileOptions::default()
                    .compression_method(m)
                    .with_alignment(64),
            )
            .unwrap();
            zw.write_all(bytes).unwrap();
        }
        zw.finish().unwrap();
        tmp
    }

    fn err_of(path: &Path) -> String {
        match read_tensors(path) {
            Ok((t, _)) => panic!("expected an error, got {} tensors", t.len()),
            Err(e) => e.to_string(),
        }
    }

    /// `{"t": <f32 view of storage "0" (storage_numel) at offset, shape, stride>}`.
    fn view_pickle(
        key: &str,
        storage_numel: u64,
        offset: u64,
        shape: &[u64],
        stride: &[u64],
    ) -> Vec<u8> {
        let mut w = PickleWriter::new();
        w.empty_dict();
        w.str("t");
        w.tensor_view(key, DType::F32, storage_numel, offset, shape, stride)
            .unwrap();
        w.setitem();
        w.finish()
    }

    #[test]
    fn taef2_encoder_and_decoder_open_as_79_f16_tensors() {
        let Some(taef2) = crate::testdata::external("models/taef2") else {
            return;
        };
        for (which, first) in [
            ("encoder", ("0.weight", vec![64, 3, 3, 3])),
            ("decoder", ("1.weight", vec![64, 32, 3, 3])),
        ] {
            let ck = Checkpoint::open(&taef2.join(format!("taef2_{which}.pth"))).unwrap();
            assert_eq!(ck.format, SourceFormat::Ckpt);
            assert_eq!(ck.tensors.len(), 79, "{which}");
            assert!(ck.tensors.iter().all(|t| t.dtype == DType::F16));
            let t = ck
                .get(first.0)
                .unwrap_or_else(|| panic!("{which}: no {}", first.0));
            assert_eq!(t.shape, first.1);
            assert!(ck.get("1.conv.0.weight").is_some() || ck.get("3.conv.0.weight").is_some());
            let mut total = 0usize;
            for t in &ck.tensors {
                let v = t.read_f32().unwrap();
                assert_eq!(v.len() as u64, t.numel());
                assert!(v.iter().all(|x| x.is_finite()), "{which} {}", t.name);
                total += v.len();
            }
            assert!(total > 1_000_000);
            // Trained weights, not zeros.
            let w = ck.get(first.0).unwrap().read_f32().unwrap();
            assert!(w.iter().map(|x| x.abs()).sum::<f32>() > 1.0);
        }
        let ck = Checkpoint::open(&taef2.join("taef2_encoder.pth")).unwrap();
        assert_eq!(ck.tensors[0].name, "0.weight");
        assert_eq!(ck.tensors[1].name, "0.bias");
        assert_eq!(ck.tensors[2].name, "1.conv.0.weight");
        assert_eq!(ck.get("14.weight").unwrap().shape, vec![32, 64, 3, 3]);
        assert_eq!(
            ck.get("11.pool.0.weight").unwrap().shape,
            vec![256, 64, 1, 1]
        );
    }

    #[test]
    fn birb_textual_inversion_opens_as_one_f32_768_tensor() {
        let Some(birb) = crate::testdata::external("models/ti-sd15-birb-style/learned_embeds.bin")
        else {
            return;
        };
        let ck = Checkpoint::open(&birb).unwrap();
        assert_eq!(ck.tensors.len(), 1);
        let t = &ck.tensors[0];
        assert_eq!(t.name, "<birb-style>");
        assert_eq!(t.shape, vec![768]);
        assert_eq!(t.dtype, DType::F32);
        let v = t.read_f32().unwrap();
        assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x != 0.0));
    }

    #[test]
    fn write_then_open_round_trips_bit_exact_with_state_dict_wrapper() {
        let specs = vec![
            spec(
                "model.diffusion_model.input_blocks.0.0.weight",
                &[8, 4, 3, 3],
                DType::F32,
            ),
            spec("first_stage_model.decoder.conv_in.bias", &[5], DType::F16),
            spec("cond_stage_model.transformer.x", &[3, 7], DType::BF16),
            spec(
                "cond_stage_model.transformer.text_model.embeddings.position_ids",
                &[1, 77],
                DType::I64,
            ),
            spec("alphas_cumprod_scalar", &[], DType::F32),
            spec("empty", &[0, 4], DType::F16),
            spec("large", &[1024, 1024], DType::F32),
            spec("emb.ünïcode·name", &[2], DType::F32),
        ];
        let (tmp, data) = write_random(&specs, true);
        let ck = Checkpoint::open(tmp.path()).unwrap();
        assert_eq!(ck.format, SourceFormat::Ckpt);
        assert_eq!(ck.tensors.len(), specs.len());
        for ((t, s), d) in ck.tensors.iter().zip(&specs).zip(&data) {
            assert_eq!(t.name, s.name);
            assert_eq!(t.shape, s.shape);
            assert_eq!(t.dtype, s.dtype);
            assert_eq!(&t.read_raw().unwrap(), d, "{}", t.name);
            if let TensorData::Raw { offset, .. } = t.data {
                assert_eq!(offset % 64, 0, "{} is not 64-byte aligned", t.name);
            }
        }
        assert_eq!(ck.get("alphas_cumprod_scalar").unwrap().numel(), 1);
        assert!(ck.metadata.is_empty());
        // The archive looks like torch's.
        let mut z = ZipArchive::new(File::open(tmp.path()).unwrap()).unwrap();
        let names: Vec<String> = z.file_names().map(String::from).collect();
        for n in [
            "archive/data.pkl",
            "archive/byteorder",
            "archive/version",
            "archive/data/0",
            "archive/data/7",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing");
        }
        let mut v = String::new();
        z.by_name("archive/version")
            .unwrap()
            .read_to_string(&mut v)
            .unwrap();
        assert_eq!(v, "3\n");
    }

    #[test]
    fn write_without_wrapper_gives_a_flat_state_dict() {
        let specs = vec![
            spec("a.weight", &[4, 4], DType::F16),
            spec("b", &[3], DType::I64),
        ];
        let mut out = Cursor::new(Vec::new());
        write(&mut out, &specs, false, |i, buf| {
            buf.extend(pseudo_random_bytes(if i == 0 { 32 } else { 24 }, 3));
            Ok(())
        })
        .unwrap();
        let bytes = out.into_inner();
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), &bytes).unwrap();
        let (t, _) = read_tensors(tmp.path()).unwrap();
        assert_eq!(
            t.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["a.weight", "b"]
        );
        assert_eq!(t[1].read_raw().unwrap(), pseudo_random_bytes(24, 3));
    }

    #[test]
    fn writer_checks_fill_size_and_dtype() {
        let specs = vec![spec("a", &[4], DType::F32)];
        let e = write(Cursor::new(Vec::new()), &specs, false, |_, b| {
            b.extend([0u8; 15]);
            Ok(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("expected 16"), "{e}");
        let specs = vec![spec("q", &[32], DType::Ggml(crate::ggml::Type::Q8_0))];
        assert!(write(Cursor::new(Vec::new()), &specs, false, |_, _| Ok(())).is_err());
    }

    #[test]
    fn state_dict_is_used_and_top_level_scalars_become_metadata() {
        let mut w = PickleWriter::new();
        w.empty_dict();
        w.mark();
        w.str("epoch");
        w.int(6);
        w.str("global_step");
        w.int(470000);
        w.str("state_dict");
        w.empty_dict();
        w.str("model.w");
        w.tensor("0", DType::F32, &[2]).unwrap();
        w.setitem();
        w.str("ema_not_used");
        w.empty_dict();
        w.str("x");
        w.tensor("0", DType::F32, &[2]).unwrap();
        w.setitem();
        w.setitems();
        let tmp = zip_file(&[
            ("m/data.pkl", &w.finish(), false),
            ("m/data/0", &[0u8; 8], false),
            ("m/version", b"3\n", false),
        ]);
        let (t, meta) = read_tensors(tmp.path()).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].name, "model.w");
        assert_eq!(meta.get("global_step").map(String::as_str), Some("470000"));
        assert_eq!(meta.get("epoch").map(String::as_str), Some("6"));
    }

    #[test]
    fn a1111_textual_inversion_layout_is_flattened() {
        let mut w = PickleWriter::new();
        w.empty_dict();
        w.mark();
        w.str("string_to_token");
        w.empty_dict();
        w.str("*");
        w.int(265);
        w.setitem();
        w.str("string_to_param");
        w.empty_dict();
        w.str("*");
        // A Parameter: _rebuild_parameter(tensor, True, OrderedDict()).
        w.global("torch._utils", "_rebuild_parameter", "p");
        w.tensor("0", DType::F32, &[2, 768]).unwrap();
        w.bool(true);
        w.ordered_dict();
        w.raw(0x87); // TUPLE3
        w.reduce();
        w.setitem();
        w.str("name");
        w.str("my-style");
        w.str("step");
        w.int(3000);
        w.setitems();
        let data = pseudo_random_bytes(2 * 768 * 4, 11);
        let tmp = zip_file(&[
            ("archive/data.pkl", &w.finish(), false),
            ("archive/data/0", &data, false),
        ]);
        let ck = open(tmp.path()).unwrap();
        assert_eq!(ck.tensors.len(), 1);
        assert_eq!(ck.tensors[0].name, "string_to_param.*");
        assert_eq!(ck.tensors[0].shape, vec![2, 768]);
        assert_eq!(ck.tensors[0].read_raw().unwrap(), data);
        assert_eq!(
            ck.metadata.get("name").map(String::as_str),
            Some("my-style")
        );
        assert_eq!(
            ck.metadata.get("string_to_token.*").map(String::as_str),
            Some("265")
        );
    }

    #[test]
    fn tensors_sharing_a_storage_get_their_own_offsets() {
        let mut w = PickleWriter::new();
        w.empty_dict();
        w.mark();
        w.str("a");
        w.tensor_view("5", DType::F32, 10, 0, &[2, 2], &[2, 1])
            .unwrap();
        w.put();
        w.str("b");
        w.tensor_view("5", DType::F32, 10, 4, &[6], &[1]).unwrap();
        w.str("tied");
        w.raw(b'h');
        // Memo: 0 rebuild global, 1 storage class, 2 OrderedDict, 3 tensor `a`.
        w.raw(3);
        w.setitems();
        let data: Vec<u8> = (0..10u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let tmp = zip_file(&[
            ("archive/data.pkl", &w.finish(), false),
            ("archive/data/5", &data, false),
        ]);
        let ck = open(tmp.path()).unwrap();
        let names: Vec<&str> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "tied"]);
        assert_eq!(
            ck.get("a").unwrap().read_f32().unwrap(),
            [0.0, 1.0, 2.0, 3.0]
        );
        assert_eq!(
            ck.get("b").unwrap().read_f32().unwrap(),
            [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
        );
        assert_eq!(
            ck.get("tied").unwrap().read_f32().unwrap(),
            [0.0, 1.0, 2.0, 3.0]
        );
    }

    #[test]
    fn malicious_pickle_in_a_zip_is_refused_with_the_global_named() {
        let pkl = b"\x80\x02}X\x01\x00\x00\x00kcos\nsystem\nX\x04\x00\x00\x00echo\x85Rs.".to_vec();
        let tmp = zip_file(&[("archive/data.pkl", &pkl, false)]);
        match Checkpoint::open(tmp.path()) {
            Err(Error::UnsafePickle { global, path }) => {
                assert_eq!(global, "os.system");
                assert_eq!(path, tmp.path());
            }
            other => panic!("{other:?}"),
        }
        // Also when data.pkl is deflated.
        let tmp = zip_file(&[("archive/data.pkl", &pkl, true)]);
        assert!(matches!(
            read_tensors(tmp.path()),
            Err(Error::UnsafePickle { .. })
        ));
    }

    #[test]
    fn truncated_zip_is_an_error_at_every_length() {
        let specs = vec![
            spec("a", &[16, 16], DType::F32),
            spec("b", &[3], DType::F16),
        ];
        let (tmp, _) = write_random(&specs, true);
        let full = std::fs::read(tmp.path()).unwrap();
        let cut = tempfile::NamedTempFile::new().unwrap();
        let mut n = 0;
        while n < full.len() {
            std::fs::write(cut.path(), &full[..n]).unwrap();
            assert!(
                read_tensors(cut.path()).is_err(),
                "a {n}-byte prefix opened"
            );
            n += 1 + n / 50;
        }
        assert!(read_tensors(tmp.path()).is_ok());
    }

    #[test]
    fn missing_storage_record_is_an_error() {
        let pkl = view_pickle("0", 4, 0, &[4], &[1]);
        let tmp = zip_file(&[
            ("archive/data.pkl", &pkl, false),
            ("archive/data/1", &[0u8; 16], false),
        ]);
        let e = err_of(tmp.path());
        assert!(
            e.contains("archive/data/0") && e.contains("not in the archive"),
            "{e}"
        );
    }

    #[test]
    fn zip_slip_names_and_bad_storage_keys_are_refused() {
        let pkl = view_pickle("0", 4, 0, &[4], &[1]);
        for bad in [
            "../evil",
            "archive/../../etc/passwd",
            "/abs/path",
            "archive\\data\\0",
            "C:/x",
        ] {
            let tmp = zip_file(&[
                ("archive/data.pkl", &pkl, false),
                ("archive/data/0", &[0u8; 16], false),
                (bad, b"x", false),
            ]);
            let e = err_of(tmp.path());
            assert!(e.contains("refusing the archive"), "{bad}: {e}");
        }
        let pkl = view_pickle("../0", 4, 0, &[4], &[1]);
        let tmp = zip_file(&[
            ("archive/data.pkl", &pkl, false),
            ("archive/data/0", &[0u8; 16], false),
        ]);
        let e = err_of(tmp.path());
        assert!(e.contains("invalid storage key"), "{e}");
    }

    #[test]
    fn compressed_storage_record_is_an_error() {
        let pkl = view_pickle("0", 4, 0, &[4], &[1]);
        let tmp = zip_file(&[
            ("archive/data.pkl", &pkl, false),
            ("archive/data/0", &[0u8; 16], true),
        ]);
        let e = err_of(tmp.path());
        assert!(e.contains("compressed"), "{e}");
    }

    #[test]
    fn non_contiguous_stride_is_an_error() {
        let pkl = view_pickle("0", 6, 0, &[2, 3], &[1, 2]);
        let tmp = zip_file(&[
            ("archive/data.pkl", &pkl, false),
            ("archive/data/0", &[0u8; 24], false),
        ]);
        let e = err_of(tmp.path());
        assert!(e.contains("not contiguous"), "{e}");
        // Size-1 dimensions may carry any stride.
        let pkl = view_pickle("0", 6, 0, &[1, 6], &[99, 1]);
        let tmp = zip_file(&[
            ("archive/data.pkl", &pkl, false),
            ("archive/data/0", &[0u8; 24], false),
        ]);
        assert!(read_tensors(tmp.path()).is_ok());
    }

    #[test]
    fn storage_too_small_for_the_tensor_is_an_error() {
        let pkl = view_pickle("0", 4, 2, &[4], &[1]);
        let tmp = zip_file(&[
            ("archive/data.pkl", &pkl, false),
            ("archive/data/0", &[0u8; 16], false),
        ]);
        let e = err_of(tmp.path());
        assert!(e.contains("storage too small"), "{e}");
        let pkl = view_pickle("0", 4, u64::MAX / 2, &[4], &[1]);
        let tmp = zip_file(&[
            ("archive/data.pkl", &pkl, false),
            ("archive/data/0", &[0u8; 16], false),
        ]);
        assert!(read_tensors(tmp.path()).is_err());
    }

    #[test]
    fn big_endian_byteorder_is_an_error() {
        let pkl = view_pickle("0", 4, 0, &[4], &[1]);
        let tmp = zip_file(&[
            ("archive/data.pkl", &pkl, false),
            ("archive/byteorder", b"big", false),
            ("archive/data/0", &[0u8; 16], false),
        ]);
        let e = err_of(tmp.path());
        assert!(e.contains("little-endian"), "{e}");
    }

    #[test]
    fn zero_or_several_data_pkl_records_are_errors() {
        let pkl = view_pickle("0", 4, 0, &[4], &[1]);
        let tmp = zip_file(&[("archive/data/0", &[0u8; 16], false)]);
        assert!(err_of(tmp.path()).contains("no `<archive>/data.pkl`"));
        let tmp = zip_file(&[("a/data.pkl", &pkl, false), ("b/data.pkl", &pkl, false)]);
        assert!(err_of(tmp.path()).contains("2 `data.pkl` records"));
    }

    #[test]
    fn legacy_and_non_zip_files_are_errors() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
        assert!(err_of(tmp.path()).contains("legacy"));
        std::fs::write(tmp.path(), b"PK\x03\x04 this is not really a zip").unwrap();
        assert!(err_of(tmp.path()).contains("not a readable torch zip"));
        std::fs::write(tmp.path(), b"").unwrap();
        assert!(read_tensors(tmp.path()).is_err());
    }

    #[test]
    fn nested_dict_bomb_is_an_error_without_deep_recursion() {
        // {"k": {"k": {... 100k levels ...}}}
        let n = 100_000;
        let mut pkl = vec![0x80, 2];
        for _ in 0..n {
            pkl.extend(b"}X\x01\x00\x00\x00k");
        }
        pkl.push(b'}');
        pkl.extend(std::iter::repeat_n(b's', n));
        pkl.push(b'.');
        let tmp = zip_file(&[("archive/data.pkl", &pkl, false)]);
        let e = err_of(tmp.path());
        assert!(e.contains("nested deeper"), "{e}");
    }

    #[test]
    fn shared_dict_fan_out_bomb_is_an_error() {
        // d0 = {"t": tensor}; d(i+1) = {"a": d(i), "b": d(i)}: 2^40 names from a tiny pickle.
        let mut w = PickleWriter::new();
        w.empty_dict();
        w.str("t");
        w.tensor("0", DType::F32, &[1]).unwrap();
        w.setitem();
        let mut pkl = w.finish();
        pkl.pop(); // STOP
        for _ in 0..40 {
            // Memoize the newest dict d, then push {"a": d, "b": d} above it.
            pkl.extend(b"q\x00}X\x01\x00\x00\x00ah\x00sX\x01\x00\x00\x00bh\x00s");
        }
        // Older dicts stay on the stack; STOP takes the newest.
        pkl.push(b'.');
        let tmp = zip_file(&[
            ("archive/data.pkl", &pkl, false),
            ("archive/data/0", &[0u8; 4], false),
        ]);
        let e = err_of(tmp.path());
        assert!(e.contains("too many places"), "{e}");
    }

    #[test]
    fn cyclic_dict_is_an_error() {
        // d = {}; d["self"] = d
        let pkl = b"\x80\x02}q\x00X\x04\x00\x00\x00selfh\x00s.";
        let tmp = zip_file(&[("archive/data.pkl", pkl, false)]);
        assert!(err_of(tmp.path()).contains("contains itself"));
    }

    /// `pickle.dumps` output of CPython 3.11 (protocols 2-5) for a torch-like
    /// `{"state_dict": OrderedDict(enc.w, enc.b -> HalfStorage '0', emb -> Parameter of
    /// FloatStorage '1') with `_metadata`, "global_step": 12345, "lr": 0.5, "big": 2**70,
    /// "name": "x", "flag": True, "nums": [1, 2, 3]}`. (A `bytes` value would be
    /// refused at protocol 2, where CPython writes it as a `_codecs.encode` call.)
    const CPYTHON_PICKLES: [&str; 4] = [
        concat!(
            "80027d710028580a00000073746174655f64696374710163636f6c6c656374696f6e730a4f726465726564446963740a",
            "710229527103285805000000656e632e77710463746f7263682e5f7574696c730a5f72656275696c645f74656e736f72",
            "5f76320a71052828580700000073746f72616765710663746f7263680a48616c6653746f726167650a71075801000000",
            "3071085806000000637564613a3071094b0c74710a514b004b024b0386710b4b034b0186710c8968022952710d74710e",
            "52710f5805000000656e632e6271106805282868066807680868094b0c747111514b064b068571124b01857113896802",
            "295271147471155271165803000000656d62711763746f7263682e5f7574696c730a5f72656275696c645f706172616d",
            "657465720a711868052828680663746f7263680a466c6f617453746f726167650a7119580100000031711a68094b0474",
            "711b514b004b0485711c68138968022952711d74711e52711f88680229527120877121527122757d712358090000005f",
            "6d657461646174617124680229527125580000000071267d7127580700000076657273696f6e71284b0173737362580b",
            "000000676c6f62616c5f7374657071294d393058020000006c72712a473fe00000000000005803000000626967712b8a",
            "0900000000000000004058040000006e616d65712c580100000078712d5804000000666c6167712e8858040000006e75",
            "6d73712f5d7130284b014b024b0365752e",
        ),
        concat!(
            "80037d710028580a00000073746174655f64696374710163636f6c6c656374696f6e730a4f726465726564446963740a",
            "710229527103285805000000656e632e77710463746f7263682e5f7574696c730a5f72656275696c645f74656e736f72",
            "5f76320a71052828580700000073746f72616765710663746f7263680a48616c6653746f726167650a71075801000000",
            "3071085806000000637564613a3071094b0c74710a514b004b024b0386710b4b034b0186710c8968022952710d74710e",
            "52710f5805000000656e632e6271106805282868066807680868094b0c747111514b064b068571124b01857113896802",
            "295271147471155271165803000000656d62711763746f7263682e5f7574696c730a5f72656275696c645f706172616d",
            "657465720a711868052828680663746f7263680a466c6f617453746f726167650a7119580100000031711a68094b0474",
            "711b514b004b0485711c68138968022952711d74711e52711f88680229527120877121527122757d712358090000005f",
            "6d657461646174617124680229527125580000000071267d7127580700000076657273696f6e71284b0173737362580b",
            "000000676c6f62616c5f7374657071294d393058020000006c72712a473fe00000000000005803000000626967712b8a",
            "0900000000000000004058040000006e616d65712c580100000078712d5804000000666c6167712e8858040000006e75",
            "6d73712f5d7130284b014b024b0365752e",
        ),
        concat!(
            "800495b9010000000000007d94288c0a73746174655f64696374948c0b636f6c6c656374696f6e73948c0b4f72646572",
            "656444696374949394295294288c05656e632e77948c0c746f7263682e5f7574696c73948c125f72656275696c645f74",
            "656e736f725f763294939428288c0773746f72616765948c05746f726368948c0b48616c6653746f726167659493948c",
            "0130948c06637564613a30944b0c7494514b004b024b0386944b034b018694896804295294749452948c05656e632e62",
            "9468092828680a680d680e680f4b0c7494514b064b0685944b018594896804295294749452948c03656d629468078c12",
            "5f72656275696c645f706172616d6574657294939468092828680a680b8c0c466c6f617453746f726167659493948c01",
            "3194680f4b047494514b004b04859468198968042952947494529488680429529487945294757d948c095f6d65746164",
            "6174619468042952948c00947d948c0776657273696f6e944b01737373628c0b676c6f62616c5f73746570944d39308c",
            "026c7294473fe00000000000008c03626967948a090000000000000000408c046e616d65948c0178948c04666c616794",
            "888c046e756d73945d94284b014b024b0365752e",
        ),
        concat!(
            "800595b9010000000000007d94288c0a73746174655f64696374948c0b636f6c6c656374696f6e73948c0b4f72646572",
            "656444696374949394295294288c05656e632e77948c0c746f7263682e5f7574696c73948c125f72656275696c645f74",
            "656e736f725f763294939428288c0773746f72616765948c05746f726368948c0b48616c6653746f726167659493948c",
            "0130948c06637564613a30944b0c7494514b004b024b0386944b034b018694896804295294749452948c05656e632e62",
            "9468092828680a680d680e680f4b0c7494514b064b0685944b018594896804295294749452948c03656d629468078c12",
            "5f72656275696c645f706172616d6574657294939468092828680a680b8c0c466c6f617453746f726167659493948c01",
            "3194680f4b047494514b004b04859468198968042952947494529488680429529487945294757d948c095f6d65746164",
            "6174619468042952948c00947d948c0776657273696f6e944b01737373628c0b676c6f62616c5f73746570944d39308c",
            "026c7294473fe00000000000008c03626967948a090000000000000000408c046e616d65948c0178948c04666c616794",
            "888c046e756d73945d94284b014b024b0365752e",
        ),
    ];

    fn unhex(h: &str) -> Vec<u8> {
        (0..h.len() / 2)
            .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn cpython_pickles_of_protocols_2_to_5_read_the_same() {
        let half: Vec<u8> = (0..12u16)
            .flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes())
            .collect();
        let float: Vec<u8> = [0.5f32, -1.0, 2.0, 8.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        for (proto, hex) in (2..).zip(CPYTHON_PICKLES) {
            let pkl = unhex(hex);
            let tmp = zip_file(&[
                ("m/data.pkl", &pkl, false),
                ("m/data/0", &half, false),
                ("m/data/1", &float, false),
            ]);
            let ck = open(tmp.path()).unwrap_or_else(|e| panic!("protocol {proto}: {e}"));
            let names: Vec<&str> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, ["enc.w", "enc.b", "emb"], "protocol {proto}");
            assert_eq!(ck.get("enc.w").unwrap().shape, [2, 3]);
            assert_eq!(
                ck.get("enc.w").unwrap().read_f32().unwrap(),
                [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
            );
            assert_eq!(
                ck.get("enc.b").unwrap().read_f32().unwrap(),
                [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
            );
            assert_eq!(ck.get("emb").unwrap().dtype, DType::F32);
            assert_eq!(
                ck.get("emb").unwrap().read_f32().unwrap(),
                [0.5, -1.0, 2.0, 8.0]
            );
            let meta: Vec<(&str, &str)> = ck
                .metadata
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(
                meta,
                [
                    ("flag", "True"),
                    ("global_step", "12345"),
                    ("lr", "0.5"),
                    ("name", "x")
                ],
                "protocol {proto}"
            );
        }
    }
}
