//! The only place that talks to ggml's C API. Everything here is `unsafe` inside and
//! safe outside: callers never see a raw pointer.
// The crate root denies unsafe code; this module is where it is allowed.
#![allow(unsafe_code)]
mod context;
mod device;
mod mapguard;
mod ops;
mod peak;
pub mod repack;
mod sys;

mod attention;
mod epilogue;
mod geglu;
mod im2col;
mod norm;
mod winograd;
pub use attention::kernel_variant as attention_kernel;
pub use context::{Backend, Context, Graph, HostRegion, NodeTiming, Tensor};
pub(crate) use device::cpu_backend_device;
pub use device::{
    cpu_backend_info, devices, CpuBackendInfo, DeviceInfo, DeviceKind, BACKEND_DIR_ENV,
    VULKAN_BUILT,
};
pub use mapguard::MapGuard;
pub use norm::finish as group_norm_statistics;
pub use ops::{ConvShape, NormAct, CONV_MAX_BANDS};
pub use peak::fma_peak_flops;
pub use winograd::{transform_kernel as winograd_kernel, POSITIONS as WINOGRAD_POSITIONS};

// The ggml libraries are linked only if the crate is referenced.
use llama_cpp_sys_2 as _;

/// Runs the body of one of sdrs' custom ops (a ggml callback) so that a panic, a bug,
/// never unwinds into C: it is logged with what it means for the op's output. Returns
/// whether the body finished.
fn custom_op_body(
    kernel: &str,
    on_panic: &str,
    body: impl FnOnce() + std::panic::UnwindSafe,
) -> bool {
    let finished = std::panic::catch_unwind(body).is_ok();
    if !finished {
        log::error!("sdrs {kernel} panicked; {on_panic}");
    }
    finished
}

use std::ffi::{CStr, CString};
use std::path::Path;

use crate::error::{Error, Result};

/// A ggml element type (`enum ggml_type`), validated to be one ggml still implements.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Type(sys::ggml_type);

impl Type {
    pub const F32: Type = Type(sys::GGML_TYPE_F32);
    pub const F16: Type = Type(sys::GGML_TYPE_F16);
    pub const BF16: Type = Type(sys::GGML_TYPE_BF16);
    pub const Q4_0: Type = Type(sys::GGML_TYPE_Q4_0);
    pub const Q4_1: Type = Type(sys::GGML_TYPE_Q4_1);
    pub const Q5_0: Type = Type(sys::GGML_TYPE_Q5_0);
    pub const Q5_1: Type = Type(sys::GGML_TYPE_Q5_1);
    pub const Q8_0: Type = Type(sys::GGML_TYPE_Q8_0);
    pub const Q2_K: Type = Type(sys::GGML_TYPE_Q2_K);
    pub const Q3_K: Type = Type(sys::GGML_TYPE_Q3_K);
    pub const Q4_K: Type = Type(sys::GGML_TYPE_Q4_K);
    pub const Q5_K: Type = Type(sys::GGML_TYPE_Q5_K);
    pub const Q6_K: Type = Type(sys::GGML_TYPE_Q6_K);
    pub const I8: Type = Type(sys::GGML_TYPE_I8);
    pub const I16: Type = Type(sys::GGML_TYPE_I16);
    pub const I32: Type = Type(sys::GGML_TYPE_I32);
    pub const I64: Type = Type(sys::GGML_TYPE_I64);
    pub const F64: Type = Type(sys::GGML_TYPE_F64);

    /// The types `sdrs convert --type` accepts, by their ggml names.
    pub const CONVERT_TARGETS: &'static [Type] = &[
        Type::F32,
        Type::F16,
        Type::BF16,
        Type::Q8_0,
        Type::Q5_0,
        Type::Q5_1,
        Type::Q4_0,
        Type::Q4_1,
        Type::Q2_K,
        Type::Q3_K,
        Type::Q4_K,
        Type::Q5_K,
        Type::Q6_K,
    ];

    /// The type with this numeric id, if ggml implements it (ids of removed types
    /// and out-of-range ids give `None`).
    pub fn from_id(id: u32) -> Option<Type> {
        if id >= sys::GGML_TYPE_COUNT {
            return None;
        }
        let t = Type(id as sys::ggml_type);
        // SAFETY: id is in range; ggml returns 0 sizes for removed types.
        let (bs, ts) = unsafe { (sys::ggml_blck_size(t.0), sys::ggml_type_size(t.0)) };
        (bs > 0 && ts > 0).then_some(t)
    }

    pub fn id(self) -> u32 {
        self.0
    }

    /// ggml's lower-case name (`f16`, `q4_0`, `q4_K`).
    pub fn name(self) -> &'static str {
        // SAFETY: a valid type has a static NUL-terminated name.
        unsafe {
            let p = sys::ggml_type_name(self.0);
            if p.is_null() {
                return "?";
            }
            CStr::from_ptr(p).to_str().unwrap_or("?")
        }
    }

    /// Parses a name case-insensitively (`q4_k` == `q4_K`).
    pub fn parse(name: &str) -> Option<Type> {
        (0..sys::GGML_TYPE_COUNT)
            .filter_map(Type::from_id)
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> usize {
        // SAFETY: valid type.
        unsafe { sys::ggml_blck_size(self.0) as usize }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        // SAFETY: valid type.
        unsafe { sys::ggml_type_size(self.0) }
    }

    pub fn is_quantized(self) -> bool {
        // SAFETY: valid type.
        unsafe { sys::ggml_is_quantized(self.0) }
    }

    /// Whether ggml's CPU matrix product takes this type as its weights operand: every
    /// float or block type but f64 and the activation-only blocks (q8_1, q8_K), which
    /// ggml-cpu has no dot product for.
    pub fn is_matrix_weight(self) -> bool {
        let activation_only = matches!(self.0, sys::GGML_TYPE_Q8_1 | sys::GGML_TYPE_Q8_K);
        self.is_float_or_quant() && self != Type::F64 && !activation_only
    }

    pub fn is_float_or_quant(self) -> bool {
        self.is_quantized() || matches!(self, Type::F32 | Type::F16 | Type::BF16 | Type::F64)
    }

    /// Bytes for `n` elements, or `None` if `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size() as u64)
    }

    /// Whether a row of `n` elements can be stored in this type.
    pub fn fits_row(self, n: usize) -> bool {
        n.is_multiple_of(self.block_size())
    }

    /// Converts `n` elements stored as this type to f32.
    pub fn dequantize(self, raw: &[u8], n: usize) -> Result<Vec<f32>> {
        let need = self.bytes_for(n as u64).ok_or_else(|| {
            Error::Ggml(format!("{n} elements are not whole {} blocks", self.name()))
        })?;
        if (raw.len() as u64) < need {
            return Err(Error::Ggml(format!(
                "{} bytes for {n} {} elements (need {need})",
                raw.len(),
                self.name()
            )));
        }
        let mut out = vec![0f32; n];
        if self == Type::F32 {
            for (o, b) in out.iter_mut().zip(raw.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            return Ok(out);
        }
        // SAFETY: traits are static; to_float reads exactly `n` elements' worth of
        // blocks from `raw` (length checked above) and writes `n` floats.
        unsafe {
            let tr = sys::ggml_get_type_traits(self.0);
            let f = tr
                .as_ref()
                .and_then(|t| t.to_float)
                .ok_or_else(|| Error::Ggml(format!("type {} has no dequantizer", self.name())))?;
            f(raw.as_ptr().cast(), out.as_mut_ptr(), n as i64);
        }
        Ok(out)
    }

    /// Quantizes `rows` rows of `row_len` f32 values into this type, appending to `out`.
    /// `row_len` must be a whole number of blocks.
    pub fn quantize_rows(
        self,
        src: &[f32],
        rows: usize,
        row_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let row_bytes = self.check_encode(row_len)?;
        let start = out.len();
        out.resize(start + rows * row_bytes, 0);
        self.quantize_rows_into(src, row_len, &mut out[start..])
    }

    /// Bytes per row of `row_len`, if f32 rows of that length can be encoded as this type.
    fn check_encode(self, row_len: usize) -> Result<usize> {
        if !self.fits_row(row_len) {
            return Err(Error::Ggml(format!(
                "row of {row_len} is not whole {} blocks of {}",
                self.name(),
                self.block_size()
            )));
        }
        if !(self.is_quantized() || matches!(self, Type::F32 | Type::F16 | Type::BF16)) {
            return Err(Error::Ggml(format!(
                "cannot encode f32 values as {}",
                self.name()
            )));
        }
        // SAFETY: pure query.
        if unsafe { sys::ggml_quantize_requires_imatrix(self.0) } {
            return Err(Error::Ggml(format!(
                "type {} needs an importance matrix",
                self.name()
            )));
        }
        Ok(self.bytes_for(row_len as u64).unwrap_or(0) as usize)
    }

    /// Quantizes whole rows of `src` into `dst`, which must hold exactly their bytes.
    pub fn quantize_rows_into(self, src: &[f32], row_len: usize, dst: &mut [u8]) -> Result<()> {
        let row_bytes = self.check_encode(row_len)?;
        if row_len == 0 || !src.len().is_multiple_of(row_len) {
            return Err(Error::Ggml(format!(
                "quantize: {} values are not whole rows of {row_len}",
                src.len()
            )));
        }
        let rows = src.len() / row_len;
        if dst.len() != rows * row_bytes {
            return Err(Error::Ggml(format!(
                "quantize: {} output bytes for {rows} rows of {row_bytes}",
                dst.len()
            )));
        }
        // SAFETY: dst holds rows*row_bytes bytes and src rows*row_len floats (checked
        // above); the type is supported without an importance matrix.
        let written = unsafe {
            sys::ggml_quantize_chunk(
                self.0,
                src.as_ptr(),
                dst.as_mut_ptr().cast(),
                0,
                rows as i64,
                row_len as i64,
                std::ptr::null(),
            )
        };
        if written != dst.len() {
            return Err(Error::Ggml(format!(
                "quantize {} wrote {written} bytes, expected {}",
                self.name(),
                dst.len()
            )));
        }
        Ok(())
    }
}

/// Must be called once before quantizing from several threads (ggml builds lookup
/// tables lazily, and that first call is not thread-safe for every type).
pub fn quantize_init(t: Type) {
    // SAFETY: valid type.
    unsafe { sys::ggml_quantize_init(t.0) }
}

/// The kernel's second hardware-capability word (`AT_HWCAP2`) on aarch64 Linux, for
/// the CPU features std cannot detect on stable Rust yet (SME). Here because every
/// `unsafe` call of sdrs lives in this module.
#[cfg(all(
    target_arch = "aarch64",
    any(target_os = "linux", target_os = "android")
))]
pub fn aarch64_hwcap2() -> u64 {
    // SAFETY: getauxval only reads the process's auxiliary vector.
    unsafe { libc::getauxval(libc::AT_HWCAP2) as u64 }
}

/// Length of `ggml_tensor.name` as bindgen saw it (`GGML_MAX_NAME`).
pub fn max_name_len() -> usize {
    // SAFETY: ggml_tensor is plain data; all-zero is a valid (empty) value.
    let t: sys::ggml_tensor = unsafe { std::mem::zeroed() };
    t.name.len()
}

/// Bytes ggml reserves per tensor object; equals the struct size bindgen saw only if
/// both agree on `GGML_MAX_NAME`.
pub fn tensor_overhead() -> usize {
    // SAFETY: pure function.
    unsafe { sys::ggml_tensor_overhead() }
}

pub fn tensor_struct_size() -> usize {
    std::mem::size_of::<sys::ggml_tensor>()
}

/// What ggml's own GGUF parser sees in a file: used to prove our files are readable
/// by the reference implementation.
#[derive(Debug, Clone)]
pub struct GgufSummary {
    pub version: u32,
    pub alignment: usize,
    pub n_kv: usize,
    pub tensors: Vec<(String, Type, u64, usize)>, // name, type, offset in data section, size
}

/// Opens a GGUF file with ggml's `gguf_init_from_file` (metadata only).
pub fn gguf_summary(path: &Path) -> Result<GgufSummary> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Invalid(format!("{}: path contains NUL", path.display())))?;
    let params = sys::gguf_init_params {
        no_alloc: true,
        ctx: std::ptr::null_mut(),
    };
    // SAFETY: valid C string; no_alloc so no ggml context is created.
    let ctx = unsafe { sys::gguf_init_from_file(c.as_ptr(), params) };
    if ctx.is_null() {
        return Err(Error::format(
            path,
            "ggml's gguf_init_from_file rejected the file",
        ));
    }
    struct Guard(*mut sys::gguf_context);
    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: allocated by gguf_init_from_file, freed once.
            unsafe { sys::gguf_free(self.0) }
        }
    }
    let g = Guard(ctx);
    // SAFETY: ctx valid until g drops; indices in range.
    unsafe {
        let n = sys::gguf_get_n_tensors(g.0);
        let mut tensors = Vec::with_capacity(n as usize);
        for i in 0..n {
            let name = CStr::from_ptr(sys::gguf_get_tensor_name(g.0, i))
                .to_string_lossy()
                .into_owned();
            let t = Type(sys::gguf_get_tensor_type(g.0, i));
            tensors.push((
                name,
                t,
                sys::gguf_get_tensor_offset(g.0, i) as u64,
                sys::gguf_get_tensor_size(g.0, i),
            ));
        }
        Ok(GgufSummary {
            version: sys::gguf_get_version(g.0),
            alignment: sys::gguf_get_alignment(g.0),
            n_kv: sys::gguf_get_n_kv(g.0) as usize,
            tensors,
        })
    }
}

/// A read-only file mapping, watched for the file shrinking under it ([`MapGuard`]).
pub struct Mapped {
    /// Declared before `map`, so the watch ends before the mapping does.
    guard: Option<MapGuard>,
    map: memmap2::Mmap,
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl Mapped {
    /// False once a read of a page the file no longer has came back as zeros (the file
    /// was truncated or rewritten while mapped): whatever was computed from it is void.
    pub fn intact(&self) -> bool {
        !self.guard.as_ref().is_some_and(MapGuard::damaged)
    }
}

/// Maps a file read-only.
///
/// `memmap2` marks this unsafe because the file can change under the mapping; a
/// shrunk file makes later reads of the lost pages fault (SIGBUS). Callers validate
/// every offset against the length seen at open time, and the mapping is watched by a
/// [`MapGuard`], which turns such a fault into zeros read and [`Mapped::intact`] false.
pub fn map_file(file: &std::fs::File) -> std::io::Result<Mapped> {
    // SAFETY: see above; the map is read-only and private to this process.
    let map = unsafe { memmap2::Mmap::map(file) }?;
    Ok(Mapped {
        guard: MapGuard::watch(&map),
        map,
    })
}

/// Makes freed large blocks go back to the system at once. glibc's malloc otherwise
/// raises its mmap threshold to the largest block freed (up to 32 MB) and its trim
/// threshold to twice that, so a banded decode's per-band copies and per-pass graphs,
/// allocated and freed over and over, stay resident: tens of MB the memory plan does
/// not count (a 150 MiB cgroup run was OOM-killed by them). Fixed thresholds keep what
/// is freed out of the resident set. Elsewhere (other C libraries) nothing to do.
pub fn return_freed_memory_promptly() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; any value is valid to pass.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}

/// Drops the resident pages of `len` bytes at `offset` of a read-only file mapping
/// from this process (whole pages inside the range only). The data stays valid: a
/// later read faults the page in again from the page cache or the file. This is how
/// a stage's weights stop counting against the process once the stage is done.
pub fn release_pages(map: &Mapped, offset: usize, len: usize) {
    let map = &map.map;
    const PAGE: usize = 4096;
    let base = map.as_ptr() as usize;
    let start = (base + offset).next_multiple_of(PAGE) - base;
    let end = ((base + offset + len.min(map.len().saturating_sub(offset))) / PAGE * PAGE)
        .saturating_sub(base);
    if end > start {
        // SAFETY: the mapping is read-only and file-backed (never written through), so
        // MADV_DONTNEED cannot lose data: it only unmaps pages that fault back in with
        // the file's contents. The range lies inside the mapping (clamped above).
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
    }
}
