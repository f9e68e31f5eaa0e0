//! Safe handles over `ggml_context`, its tensors, graphs and the CPU backend.
//!
//! Ownership: a [`Context`] owns its tensor metadata and every buffer that holds
//! its tensors' data (allocated ones, and wrappers around borrowed host memory such
//! as a GGUF mapping, whose lifetime `'d` the context cannot outlive). Tensors and
//! graphs borrow the context, so none can dangle.
use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

use super::{sys, Type};
use crate::error::{Error, Result};

/// ggml-backend's `TENSOR_ALIGNMENT`.
const TENSOR_ALIGNMENT: usize = 32;

pub struct Context<'d> {
    ptr: NonNull<sys::ggml_context>,
    /// Interior mutability so that tensors (which borrow the context) can be
    /// allocated and placed; buffers are only freed on drop.
    buffers: RefCell<Vec<sys::ggml_backend_buffer_t>>,
    /// Tensors whose data is borrowed read-only memory: never written through.
    borrowed: RefCell<HashSet<*mut sys::ggml_tensor>>,
    /// Allocator of the compute buffer for this context's graph (kept, so the
    /// buffer is reused when the same graph runs again).
    galloc: RefCell<Option<sys::ggml_gallocr_t>>,
    graph_size: usize,
    /// The graph built in this context (there is room for one), kept so that it can
    /// be run again without rebuilding.
    graph: std::cell::Cell<Option<NonNull<sys::ggml_cgraph>>>,
    /// Largest im2col matrix one convolution builds at once (see `conv2d`).
    pub(super) conv_budget: std::cell::Cell<usize>,
    /// Parameters of custom ops, alive as long as the graph that points at them.
    kept: RefCell<Vec<Box<dyn std::any::Any>>>,
    /// The GPU this context's graph is built for and runs on (`None`: the CPU). Set
    /// before the graph is built: ops are chosen for it (no CPU-only custom ops).
    gpu: RefCell<Option<Arc<Engines>>>,
    /// The scheduler that splits the graph between the GPU and the CPU (ops the GPU
    /// lacks) and owns both compute buffers.
    sched: std::cell::Cell<Option<NonNull<sys::ggml_backend_sched>>>,
    _data: PhantomData<&'d [u8]>,
}

// SAFETY: ggml contexts, their buffers and schedulers have no thread affinity; a
// context may move to another thread and be used there, one thread at a time
// (`Context` is not `Sync`: its cells are not).
unsafe impl Send for Context<'_> {}

/// A tensor of a context (metadata; its data lives in a buffer).
#[derive(Clone, Copy)]
pub struct Tensor<'c> {
    ptr: NonNull<sys::ggml_tensor>,
    _ctx: PhantomData<&'c ()>,
}

/// A computation graph built in a context.
pub struct Graph<'c> {
    ptr: NonNull<sys::ggml_cgraph>,
    ctx: &'c Context<'c>,
}

impl Graph<'_> {
    /// Floating-point operations of one evaluation, counting the matrix products
    /// (`mul_mat`, which also carries every convolution here, and flash attention):
    /// 2·M·N·K each. Element-wise work is a few percent of a diffusion UNet and left out,
    /// so this is the figure to divide by time for a GEMM-efficiency ratio.
    pub fn matmul_flops(&self) -> f64 {
        self.per_node(node_flops).sum()
    }

    /// `f` of every node. `f` must only read a node and its sources.
    fn per_node<T: 'static>(
        &self,
        f: unsafe fn(&sys::ggml_tensor) -> T,
    ) -> impl Iterator<Item = T> + '_ {
        let g = self.ptr.as_ptr();
        // SAFETY: the graph and its nodes live as long as the context borrowed by self.
        let n = unsafe { sys::ggml_graph_n_nodes(g) };
        // SAFETY: 0 <= i < n; a node's sources are valid while the graph lives.
        (0..n).map(move |i| unsafe { f(&*sys::ggml_graph_node(g, i)) })
    }

    /// The CPU work buffer the graph needs beside its tensors: ggml converts each
    /// matrix product's f32 input to its weight's dot-product type (q8_0 for q4_0/q5_0/
    /// q8_0, q8_1 for q4_1/q5_1, q8_K for k-quants, f16/bf16 for those) in one scratch
    /// buffer, sized for the largest product and kept by the backend. At 1024² a
    /// full-resolution 1x1 convolution of SDXL's VAE converts 1 GB of activations into
    /// 285 MB of q8_0: the planner has to count it.
    pub fn work_bytes(&self) -> usize {
        self.per_node(node_work).max().unwrap_or(0)
    }
}

/// Scratch bytes ggml's CPU matrix product `t` converts its input into.
///
/// # Safety
/// `t` must be a node of a live graph (its sources valid).
unsafe fn node_work(t: &sys::ggml_tensor) -> usize {
    if t.op != sys::GGML_OP_MUL_MAT {
        return 0;
    }
    let (a, b) = (&*t.src[0], &*t.src[1]);
    let w = Type(a.type_);
    let dot = match w {
        Type::F16 | Type::BF16 => w,
        Type::Q4_0 | Type::Q5_0 | Type::Q8_0 => Type::Q8_0,
        Type::Q4_1 | Type::Q5_1 => Type(sys::GGML_TYPE_Q8_1),
        Type::Q2_K | Type::Q3_K | Type::Q4_K | Type::Q5_K | Type::Q6_K => Type(sys::GGML_TYPE_Q8_K),
        _ => return 0,
    };
    if Type(b.type_) == dot || b.ne[0] % dot.block_size() as i64 != 0 {
        return 0;
    }
    let rows = (b.ne[1] * b.ne[2] * b.ne[3]) as usize;
    rows * (b.ne[0] as usize / dot.block_size()) * dot.type_size()
}

/// 2·M·N·K of a matrix product (and flash attention's two products); 0 for other ops.
///
/// # Safety
/// `t` must be a node of a live graph (its sources valid).
unsafe fn node_flops(t: &sys::ggml_tensor) -> f64 {
    match t.op {
        sys::GGML_OP_MUL_MAT => {
            let a = &*t.src[0];
            2.0 * a.ne[0] as f64 * (t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]) as f64
        }
        sys::GGML_OP_FLASH_ATTN_EXT => {
            let (q, k, v) = (&*t.src[0], &*t.src[1], &*t.src[2]);
            let (dk, dv, nq, nkv) = (
                q.ne[0] as f64,
                v.ne[0] as f64,
                q.ne[1] as f64,
                k.ne[1] as f64,
            );
            2.0 * nq * nkv * (dk + dv) * (q.ne[2] * q.ne[3]) as f64
        }
        // sdrs' attention kernel: q, k, v as flash attention's. (Its other custom ops,
        // im2col and the convolution epilogue, move data.)
        sys::GGML_OP_CUSTOM
            if std::ffi::CStr::from_ptr(t.name.as_ptr()).to_bytes() == b"sdrs.attention" =>
        {
            let (q, k, v) = (&*t.src[0], &*t.src[1], &*t.src[2]);
            2.0 * (q.ne[1] * k.ne[1]) as f64
                * (q.ne[0] + v.ne[0]) as f64
                * (q.ne[2] * q.ne[3]) as f64
        }
        // The Winograd convolution: the direct convolution's count (9 multiply-adds per
        // output and input channel), so its rate compares with im2col's as speed; it
        // makes a quarter of them.
        sys::GGML_OP_CUSTOM
            if std::ffi::CStr::from_ptr(t.name.as_ptr()).to_bytes() == b"sdrs.winograd" =>
        {
            let x = &*t.src[0];
            2.0 * 9.0 * x.ne[2] as f64 * (t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]) as f64
        }
        _ => 0.0,
    }
}

/// One graph node's run time, from [`Backend::set_profiling`].
#[derive(Clone, Debug)]
pub struct NodeTiming {
    /// ggml's op name (`MUL_MAT`, `IM2COL`, `SILU`, ...).
    pub op: String,
    /// Type of the first source (the weights of a matrix product).
    pub src_type: Type,
    pub flops: f64,
    pub seconds: f64,
}

impl<'d> Context<'d> {
    /// A context for the metadata of up to `max_tensors` tensors and one graph of
    /// as many nodes (data is never allocated in the context itself).
    pub fn new(max_tensors: usize) -> Result<Self> {
        let max_tensors = max_tensors.max(16);
        // SAFETY: pure size queries.
        let size = max_tensors * unsafe { sys::ggml_tensor_overhead() }
            + unsafe { sys::ggml_graph_overhead_custom(max_tensors, false) };
        let params = sys::ggml_init_params {
            mem_size: size,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: ggml allocates its own memory of `size` bytes.
        let ptr = NonNull::new(unsafe { sys::ggml_init(params) })
            .ok_or_else(|| Error::Ggml("ggml_init failed".into()))?;
        Ok(Context {
            ptr,
            buffers: RefCell::new(Vec::new()),
            borrowed: RefCell::new(HashSet::new()),
            galloc: RefCell::new(None),
            graph_size: max_tensors,
            graph: std::cell::Cell::new(None),
            conv_budget: std::cell::Cell::new(super::ops::CONV_COLUMNS_MAX_BYTES),
            kept: RefCell::new(Vec::new()),
            gpu: RefCell::new(None),
            sched: std::cell::Cell::new(None),
            _data: PhantomData,
        })
    }

    /// Builds and runs this context's graph where `backend` computes: on its GPU, if
    /// it has one. Call before building the graph.
    pub fn target(&self, backend: &Backend) {
        *self.gpu.borrow_mut() = backend
            .engines
            .gpu
            .is_some()
            .then(|| Arc::clone(&backend.engines));
    }

    /// Builds and runs this context's graph where `other`'s does (its weights' context).
    pub fn follow(&self, other: &Context<'_>) {
        *self.gpu.borrow_mut() = other.gpu.borrow().clone();
    }

    /// Whether the graph is built for a GPU (so ops must be ones it implements).
    pub fn on_gpu(&self) -> bool {
        self.gpu.borrow().is_some()
    }

    /// Whether the device the graph is built for runs `t`'s op (always, on the CPU).
    pub fn supports(&self, t: Tensor<'_>) -> bool {
        match self.gpu.borrow().as_ref().and_then(|e| e.gpu.as_ref()) {
            // SAFETY: the device is registered for the process; the tensor is a node of this context.
            Some(g) => unsafe { sys::ggml_backend_dev_supports_op(g.device.as_ptr(), t.raw()) },
            None => true,
        }
    }

    /// Bounds the column matrix of each convolution built from now on (bytes; larger
    /// ones run in bands of output rows, exactly): less memory, a little more copying.
    pub fn set_conv_budget(&self, bytes: usize) {
        self.conv_budget.set(bytes.max(1));
    }

    /// Fails (instead of ggml aborting) unless `tensors` more tensor objects fit,
    /// leaving room for the graph when it is not built yet.
    pub(super) fn ensure_room(&self, tensors: usize) -> Result<()> {
        // SAFETY: pure queries on a valid context.
        let (used, size, per, graph) = unsafe {
            (
                sys::ggml_used_mem(self.raw()),
                sys::ggml_get_mem_size(self.raw()),
                sys::ggml_tensor_overhead(),
                sys::ggml_graph_overhead_custom(self.graph_size, false),
            )
        };
        let reserve = if self.graph.get().is_some() { 0 } else { graph };
        if used + tensors * per + reserve > size {
            return Err(Error::Ggml(format!(
                "graph too large for its context ({} tensors of room, {tensors} more needed)",
                size.saturating_sub(used + reserve) / per
            )));
        }
        Ok(())
    }

    /// Keeps custom-op parameters for the context's lifetime; the pointer is stable
    /// (boxed) and only read by the op.
    /// A stable pointer to `p` for a custom op's userdata, alive as long as this context.
    pub(super) fn keep<T: 'static>(&self, p: T) -> *mut std::ffi::c_void {
        let b = Box::new(p);
        let ptr = &*b as *const T as *mut std::ffi::c_void;
        self.kept.borrow_mut().push(b);
        ptr
    }

    pub(super) fn raw(&self) -> *mut sys::ggml_context {
        self.ptr.as_ptr()
    }

    pub(super) fn wrap_op(&self, p: *mut sys::ggml_tensor) -> Result<Tensor<'_>> {
        self.wrap(p)
    }

    fn wrap(&self, p: *mut sys::ggml_tensor) -> Result<Tensor<'_>> {
        NonNull::new(p)
            .map(|ptr| Tensor {
                ptr,
                _ctx: PhantomData,
            })
            .ok_or_else(|| Error::Ggml("ggml returned no tensor (context full?)".into()))
    }

    /// A new tensor of type `ty` with ggml dims `ne` (innermost first, 1 to 4 dims).
    pub fn tensor(&self, ty: Type, ne: &[usize], name: &str) -> Result<Tensor<'_>> {
        // ggml asserts that the element count fits an i64, multiplying the dims over 1.
        let count = ne
            .iter()
            .skip(1)
            .try_fold(ne.first().copied().unwrap_or(0), |n, &d| {
                if d > 1 {
                    n.checked_mul(d)
                } else {
                    Some(n)
                }
            });
        if ne.is_empty()
            || ne.len() > 4
            || !ty.fits_row(ne[0])
            || ne.iter().any(|&d| i64::try_from(d).is_err())
            || count.is_none_or(|n| i64::try_from(n).is_err())
        {
            return Err(Error::Ggml(format!(
                "cannot make a {} tensor of shape {ne:?}",
                ty.name()
            )));
        }
        let dims: Vec<i64> = ne.iter().map(|&d| d as i64).collect();
        // SAFETY: ctx valid; dims has ne.len() entries.
        let t = self.wrap(unsafe {
            sys::ggml_new_tensor(self.raw(), ty.0, dims.len() as i32, dims.as_ptr())
        })?;
        t.set_name(name)?;
        Ok(t)
    }

    /// The tensor named `name` in this context.
    pub fn get(&self, name: &str) -> Option<Tensor<'_>> {
        let c = CString::new(name).ok()?;
        // SAFETY: lookup by name in a valid context.
        NonNull::new(unsafe { sys::ggml_get_tensor(self.raw(), c.as_ptr()) }).map(|ptr| Tensor {
            ptr,
            _ctx: PhantomData,
        })
    }

    /// The graph computing `outputs` (a context holds one graph).
    pub fn graph<'c>(&'c self, outputs: &[Tensor<'c>]) -> Result<Graph<'c>> {
        if self.graph.get().is_some() {
            return Err(Error::Ggml("this context already holds a graph".into()));
        }
        // SAFETY: ctx has room for one graph of graph_size nodes (see `new`).
        let g =
            NonNull::new(unsafe { sys::ggml_new_graph_custom(self.raw(), self.graph_size, false) })
                .ok_or_else(|| Error::Ggml("no room for a graph".into()))?;
        self.graph.set(Some(g));
        for out in outputs {
            // SAFETY: graph and tensor valid.
            unsafe { sys::ggml_build_forward_expand(g.as_ptr(), out.ptr.as_ptr()) };
        }
        Ok(Graph { ptr: g, ctx: self })
    }

    /// The graph built earlier in this context, to run it again.
    pub fn built_graph<'c>(&'c self) -> Option<Graph<'c>> {
        self.graph.get().map(|ptr| Graph { ptr, ctx: self })
    }

    /// Names a tensor (so it can be found again with [`Context::get`]).
    pub fn name(&self, t: Tensor<'_>, name: &str) -> Result<()> {
        t.set_name(name)
    }

    /// Allocates every intermediate and input of `graph` in this context's compute
    /// buffer (reused and grown as needed). Returns the buffer size in bytes.
    pub fn alloc_graph(&self, graph: &Graph<'_>) -> Result<usize> {
        if let Some(engines) = self.gpu.borrow().as_ref() {
            return self.alloc_scheduled(engines, graph);
        }
        let mut slot = self.galloc.borrow_mut();
        let ga = match *slot {
            Some(g) => g,
            None => {
                // SAFETY: the CPU buffer type is a static singleton.
                let g = unsafe { sys::ggml_gallocr_new(sys::ggml_backend_cpu_buffer_type()) };
                if g.is_null() {
                    return Err(Error::Ggml("cannot create a graph allocator".into()));
                }
                *slot = Some(g);
                g
            }
        };
        // SAFETY: allocator and graph valid; tensors with data (weights) are skipped.
        if !unsafe { sys::ggml_gallocr_alloc_graph(ga, graph.ptr.as_ptr()) } {
            return Err(Error::Ggml(
                "cannot allocate the compute buffer (out of memory?)".into(),
            ));
        }
        // SAFETY: buffer 0 exists after a successful allocation.
        Ok(unsafe { sys::ggml_gallocr_get_buffer_size(ga, 0) })
    }

    /// Allocates `graph` through ggml's scheduler: each op on the GPU where it has the
    /// op, else on the CPU (with copies between them), and logs which ops fell back.
    fn alloc_scheduled(&self, engines: &Engines, graph: &Graph<'_>) -> Result<usize> {
        let gpu = engines
            .gpu
            .as_ref()
            .ok_or_else(|| Error::Ggml("no GPU to schedule for".into()))?;
        let sched = match self.sched.get() {
            Some(s) => s,
            None => {
                // The CPU comes last: ggml's scheduler requires it as the fallback.
                let mut backends = [gpu.backend.as_ptr(), engines.cpu.as_ptr()];
                // SAFETY: both backends live as long as `engines`, which this context keeps
                // (self.gpu) until after the scheduler is freed in Drop.
                let s = unsafe {
                    sys::ggml_backend_sched_new(
                        backends.as_mut_ptr(),
                        std::ptr::null_mut(),
                        2,
                        2 * self.graph_size + 1024,
                        false,
                        true,
                    )
                };
                let s = NonNull::new(s)
                    .ok_or_else(|| Error::Ggml("cannot create a backend scheduler".into()))?;
                self.sched.set(Some(s));
                s
            }
        };
        // SAFETY: scheduler and graph valid; allocation failure is reported, not asserted.
        unsafe {
            sys::ggml_backend_sched_reset(sched.as_ptr());
            if !sys::ggml_backend_sched_alloc_graph(sched.as_ptr(), graph.ptr.as_ptr()) {
                return Err(Error::Ggml(format!(
                    "cannot allocate the compute buffers on {} (out of device memory?)",
                    gpu.name
                )));
            }
        }
        let mut fallback: Vec<(String, usize)> = Vec::new();
        let g = graph.ptr.as_ptr();
        // SAFETY: graph nodes are valid while the context lives; op names are static.
        let n = unsafe { sys::ggml_graph_n_nodes(g) };
        for i in 0..n {
            unsafe {
                let node = sys::ggml_graph_node(g, i);
                if sys::ggml_backend_sched_get_tensor_backend(sched.as_ptr(), node)
                    == engines.cpu.as_ptr()
                {
                    let op = std::ffi::CStr::from_ptr(sys::ggml_op_desc(node))
                        .to_string_lossy()
                        .into_owned();
                    match fallback.iter_mut().find(|(o, _)| *o == op) {
                        Some((_, c)) => *c += 1,
                        None => fallback.push((op, 1)),
                    }
                }
            }
        }
        if !fallback.is_empty() {
            let list: Vec<String> = fallback.iter().map(|(o, c)| format!("{o} x{c}")).collect();
            log::info!(
                "{} runs {} of {n} ops on the CPU (not supported there): {}",
                gpu.name,
                fallback.iter().map(|f| f.1).sum::<usize>(),
                list.join(", ")
            );
        }
        // SAFETY: scheduler valid; both backends are part of it.
        let (splits, bytes) = unsafe {
            (
                sys::ggml_backend_sched_get_n_splits(sched.as_ptr()),
                sys::ggml_backend_sched_get_buffer_size(sched.as_ptr(), gpu.backend.as_ptr())
                    + sys::ggml_backend_sched_get_buffer_size(sched.as_ptr(), engines.cpu.as_ptr()),
            )
        };
        log::debug!(
            "{}: graph of {n} nodes in {splits} splits, compute buffers {bytes} bytes",
            gpu.name
        );
        Ok(bytes)
    }

    /// The compute buffer [`Context::alloc_graph`] would allocate for `graph`, in
    /// bytes, found without allocating it (the memory planner sizes stages with it).
    pub fn measure_graph(&self, graph: &Graph<'_>) -> Result<usize> {
        // SAFETY: the CPU buffer type is a static singleton; the allocator is freed below.
        let ga = unsafe { sys::ggml_gallocr_new(sys::ggml_backend_cpu_buffer_type()) };
        if ga.is_null() {
            return Err(Error::Ggml("cannot create a graph allocator".into()));
        }
        let mut size = 0usize;
        // SAFETY: one buffer (null id lists); `reserve_n_size` only plans offsets and
        // writes one size; it neither allocates nor modifies the graph.
        unsafe {
            sys::ggml_gallocr_reserve_n_size(
                ga,
                graph.ptr.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                &mut size,
            );
            sys::ggml_gallocr_free(ga);
        }
        // On the CPU the backend's scratch buffer comes on top.
        Ok(size + if self.on_gpu() { 0 } else { graph.work_bytes() })
    }

    /// Allocates CPU memory for every tensor of the context that has none yet.
    pub fn alloc_cpu(&self, backend: &Backend) -> Result<()> {
        self.alloc_with(backend.engines.cpu)
    }

    /// Allocates memory where `backend` computes (its GPU's, if it has one) for every
    /// tensor of the context that has none yet, and targets the context at it.
    pub fn alloc_on(&self, backend: &Backend) -> Result<()> {
        self.target(backend);
        self.alloc_with(backend.primary())
    }

    /// Allocates host memory for every tensor of the context that has none yet
    /// (weights converted at load, beside others borrowed from a mapping).
    pub fn alloc_host(&self) -> Result<()> {
        // SAFETY: ctx valid; the CPU buffer type is static; the buffer is owned by self.
        let buf = unsafe {
            sys::ggml_backend_alloc_ctx_tensors_from_buft(
                self.raw(),
                sys::ggml_backend_cpu_buffer_type(),
            )
        };
        if buf.is_null() {
            return Err(Error::Ggml(
                "cannot allocate host memory for tensors".into(),
            ));
        }
        self.buffers.borrow_mut().push(buf);
        Ok(())
    }

    fn alloc_with(&self, backend: NonNull<sys::ggml_backend>) -> Result<()> {
        // SAFETY: ctx and backend valid; the buffer is owned by self from now on.
        let buf = unsafe { sys::ggml_backend_alloc_ctx_tensors(self.raw(), backend.as_ptr()) };
        if buf.is_null() {
            return Err(Error::Ggml(
                "cannot allocate tensor memory (out of device memory?)".into(),
            ));
        }
        self.buffers.borrow_mut().push(buf);
        Ok(())
    }

    /// Makes `bytes` (e.g. a GGUF mapping) usable as tensor memory without copying.
    /// Returns a handle for [`Context::place`].
    pub fn borrow_host(&self, bytes: &'d [u8]) -> Result<HostRegion> {
        self.borrow(bytes, None)
    }

    /// Whether [`Context::borrow_interleaved`] can do anything on this CPU: its ggml
    /// library reads q4_0 matrices in [`super::repack::interleave_q4_0`]'s layout.
    pub fn reads_interleaved_q4_0() -> bool {
        super::repack::mapped_traits().is_some()
    }

    /// As [`Context::borrow_host`], for memory holding q4_0 matrices stored
    /// interleaved ([`super::repack`]): tensors placed there are multiplied by ggml's
    /// integer GEMM straight from that memory. `None` where this CPU's ggml reads
    /// another layout (see [`Context::reads_interleaved_q4_0`]).
    pub fn borrow_interleaved(&self, bytes: &'d [u8]) -> Result<Option<HostRegion>> {
        match super::repack::mapped_traits() {
            Some(traits) => self.borrow(bytes, Some(traits)).map(Some),
            None => Ok(None),
        }
    }

    fn borrow(&self, bytes: &'d [u8], traits: Option<usize>) -> Result<HostRegion> {
        // ggml asserts (aborts) on a misaligned base: refuse it here instead.
        if !(bytes.as_ptr() as usize).is_multiple_of(TENSOR_ALIGNMENT) {
            return Err(Error::Ggml(format!(
                "host memory must be {TENSOR_ALIGNMENT}-byte aligned"
            )));
        }
        // SAFETY: the buffer only records the pointer; `'d` keeps the bytes alive for
        // as long as the context, and tensors placed there are never written to.
        let buf =
            unsafe { sys::ggml_backend_cpu_buffer_from_ptr(bytes.as_ptr() as *mut _, bytes.len()) };
        if buf.is_null() {
            return Err(Error::Ggml("cannot wrap host memory".into()));
        }
        let mut buffers = self.buffers.borrow_mut();
        buffers.push(buf);
        if traits.is_some() {
            // SAFETY: `buf` was just made over `bytes` and holds no tensor yet.
            unsafe { super::repack::retype_as_repack(buf, bytes.len())? };
        }
        Ok(HostRegion {
            index: buffers.len() - 1,
            base: bytes.as_ptr() as usize,
            len: bytes.len(),
            traits,
        })
    }

    /// Points tensor `t` at `offset` inside a borrowed region (zero copy).
    /// In an interleaved region ([`Context::borrow_interleaved`]) only q4_0 matrices
    /// of 8-row groups may be placed, and only as the weights (`a`) of
    /// [`Context::mul_mat`].
    pub fn place(&self, region: &HostRegion, t: Tensor<'_>, offset: usize) -> Result<()> {
        let n = t.nbytes();
        if region.traits.is_some() {
            let ne: Vec<u64> = t.ne().iter().map(|&d| d as u64).collect();
            let ne = if ne[2..].iter().all(|&d| d == 1) {
                &ne[..2]
            } else {
                &ne[..]
            };
            if !super::repack::can_interleave(t.ty(), ne) {
                return Err(Error::Ggml(format!(
                    "{} {:?} cannot be read interleaved (only q4_0 matrices of 8-row groups)",
                    t.ty().name(),
                    t.ne()
                )));
            }
        }
        if offset.checked_add(n).is_none_or(|end| end > region.len) {
            return Err(Error::Ggml(format!(
                "tensor of {n} bytes at {offset} exceeds a region of {}",
                region.len
            )));
        }
        if !(region.base + offset).is_multiple_of(TENSOR_ALIGNMENT) {
            return Err(Error::Ggml(format!(
                "tensor data at offset {offset} is not {TENSOR_ALIGNMENT}-byte aligned"
            )));
        }
        let buf = *self
            .buffers
            .borrow()
            .get(region.index)
            .ok_or_else(|| Error::Ggml("region of another context".into()))?;
        // SAFETY: bounds and alignment checked; tensor has no data yet (else ggml asserts).
        unsafe {
            if !(*t.ptr.as_ptr()).data.is_null() {
                return Err(Error::Ggml("tensor already has data".into()));
            }
            let status = sys::ggml_backend_tensor_alloc(
                buf,
                t.ptr.as_ptr(),
                (region.base + offset) as *mut _,
            );
            if status != sys::GGML_STATUS_SUCCESS {
                return Err(Error::Ggml(format!(
                    "ggml_backend_tensor_alloc failed ({status})"
                )));
            }
            // What the repack buffer's own init would set: the kernel for the layout,
            // which `borrow_interleaved`'s probe found to be the one stored here.
            if let Some(traits) = region.traits {
                (*t.ptr.as_ptr()).extra = traits as *mut std::ffi::c_void;
            }
        }
        self.borrowed.borrow_mut().insert(t.ptr.as_ptr());
        Ok(())
    }

    /// Whether [`Context::alloc_repacked`] can do anything on this CPU.
    pub fn can_repack() -> bool {
        super::device::repack_buffer_type().is_some()
    }

    /// Allocates `tensors` (the context's only tensors without data) in ggml's
    /// `CPU_REPACK` buffer and fills each from its bytes, which ggml rearranges for
    /// its integer GEMM kernels where it has a layout for the tensor (a copy, not a
    /// mapping: anonymous memory). Such tensors may only be the weights (`a`) of
    /// [`Context::mul_mat`]. Returns how many were rearranged.
    /// `copied(i)` runs once tensor `i` is in place, so that its source can be let go
    /// at once (the copy otherwise holds both in memory until the end).
    pub fn alloc_repacked(
        &self,
        tensors: &[(Tensor<'_>, &[u8])],
        mut copied: impl FnMut(usize),
    ) -> Result<usize> {
        let buft = super::device::repack_buffer_type()
            .ok_or_else(|| Error::Ggml("this CPU library has no repack buffer".into()))?;
        for (t, bytes) in tensors {
            if t.has_data() || bytes.len() != t.nbytes() || t.ne()[2] != 1 || t.ne()[3] != 1 {
                return Err(Error::Ggml(format!(
                    "repack: tensor of {} bytes, {:?}, given {} (allocated: {})",
                    t.nbytes(),
                    t.ne(),
                    bytes.len(),
                    t.has_data()
                )));
            }
        }
        // SAFETY: ctx valid; only tensors without data are allocated (the listed ones,
        // checked by the caller's contract and verified below); the buffer is owned by
        // self from now on.
        let buf =
            unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(self.raw(), buft.as_ptr()) };
        if buf.is_null() {
            return Err(Error::Ggml("cannot allocate the repack buffer".into()));
        }
        self.buffers.borrow_mut().push(buf);
        let mut repacked = 0;
        for (i, (t, bytes)) in tensors.iter().enumerate() {
            // SAFETY: the tensor was just allocated in `buf` (host memory) with exactly
            // nbytes bytes. Its buffer's init set `extra` to the repack layout, or left
            // it NULL where ggml has none: then the GEMM reads the plain layout, and the
            // bytes are copied as they are (the buffer's setter would assert).
            unsafe {
                let raw = t.raw();
                if (*raw).data.is_null() || (*raw).buffer != buf {
                    return Err(Error::Ggml(
                        "repack: a tensor was not placed in the repack buffer".into(),
                    ));
                }
                if (*raw).extra.is_null() {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        (*raw).data.cast::<u8>(),
                        bytes.len(),
                    );
                } else {
                    sys::ggml_backend_tensor_set(raw, bytes.as_ptr().cast(), 0, bytes.len());
                    repacked += 1;
                }
            }
            copied(i);
        }
        Ok(repacked)
    }

    /// Copies `data` (raw bytes of the tensor's type) into an allocated tensor.
    pub fn set_bytes(&self, t: Tensor<'_>, data: &[u8]) -> Result<()> {
        if self.borrowed.borrow().contains(&t.ptr.as_ptr()) {
            return Err(Error::Ggml(
                "tensor lives in borrowed read-only memory".into(),
            ));
        }
        if data.len() != t.nbytes() || !t.has_data() {
            return Err(Error::Ggml(format!(
                "set: {} bytes for a tensor of {} (allocated: {})",
                data.len(),
                t.nbytes(),
                t.has_data()
            )));
        }
        // SAFETY: tensor allocated with exactly data.len() bytes.
        unsafe {
            sys::ggml_backend_tensor_set(t.ptr.as_ptr(), data.as_ptr().cast(), 0, data.len())
        };
        Ok(())
    }

    pub fn set_f32(&self, t: Tensor<'_>, data: &[f32]) -> Result<()> {
        if t.ty() != Type::F32 {
            return Err(Error::Ggml(format!(
                "set_f32 on a {} tensor",
                t.ty().name()
            )));
        }
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.set_bytes(t, &bytes)
    }

    pub fn set_i32(&self, t: Tensor<'_>, data: &[i32]) -> Result<()> {
        if t.ty() != Type::I32 {
            return Err(Error::Ggml(format!(
                "set_i32 on a {} tensor",
                t.ty().name()
            )));
        }
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.set_bytes(t, &bytes)
    }

    /// Reads an f32 tensor's values.
    pub fn get_f32(&self, t: Tensor<'_>) -> Result<Vec<f32>> {
        if t.ty() != Type::F32 || !t.has_data() || !t.is_contiguous() {
            return Err(Error::Ggml(
                "get_f32 needs an allocated, contiguous f32 tensor".into(),
            ));
        }
        let mut out = vec![0f32; t.nbytes() / 4];
        // SAFETY: out has nbytes bytes.
        unsafe {
            sys::ggml_backend_tensor_get(t.ptr.as_ptr(), out.as_mut_ptr().cast(), 0, t.nbytes())
        };
        Ok(out)
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: each buffer and the context were created by us and are freed once.
        unsafe {
            if let Some(s) = self.sched.get_mut().take() {
                sys::ggml_backend_sched_free(s.as_ptr());
            }
            if let Some(g) = self.galloc.get_mut().take() {
                sys::ggml_gallocr_free(g);
            }
            for b in self.buffers.get_mut().drain(..) {
                sys::ggml_backend_buffer_free(b);
            }
            sys::ggml_free(self.ptr.as_ptr());
        }
    }
}

/// A borrowed memory range registered with a context.
#[derive(Clone, Debug)]
pub struct HostRegion {
    index: usize,
    base: usize,
    len: usize,
    /// For an interleaved region, ggml's kernel for what is placed there.
    traits: Option<usize>,
}

impl Tensor<'_> {
    pub(super) fn raw(&self) -> *mut sys::ggml_tensor {
        self.ptr.as_ptr()
    }
    /// Strides in bytes.
    pub fn nb(&self) -> [usize; 4] {
        // SAFETY: tensor valid while its context lives.
        unsafe { (*self.ptr.as_ptr()).nb }
    }
    pub fn nelements(&self) -> usize {
        // SAFETY: as above.
        unsafe { sys::ggml_nelements(self.ptr.as_ptr()) as usize }
    }
    pub fn is_contiguous(&self) -> bool {
        // SAFETY: as above.
        unsafe { sys::ggml_is_contiguous(self.ptr.as_ptr()) }
    }
    pub fn is_transposed(&self) -> bool {
        // SAFETY: as above.
        unsafe { sys::ggml_is_transposed(self.ptr.as_ptr()) }
    }
    pub fn ne(&self) -> [usize; 4] {
        // SAFETY: tensor valid while its context lives ('c).
        let ne = unsafe { (*self.ptr.as_ptr()).ne };
        ne.map(|d| d as usize)
    }
    pub fn ty(&self) -> Type {
        // SAFETY: as above.
        Type(unsafe { (*self.ptr.as_ptr()).type_ })
    }
    pub fn nbytes(&self) -> usize {
        // SAFETY: as above.
        unsafe { sys::ggml_nbytes(self.ptr.as_ptr()) }
    }
    /// Whether the tensor has memory: weights, and the inputs and nodes of an allocated graph.
    pub fn has_data(&self) -> bool {
        // SAFETY: as above.
        unsafe { !(*self.ptr.as_ptr()).data.is_null() }
    }
    fn set_name(&self, name: &str) -> Result<()> {
        if name.len() >= super::max_name_len() {
            return Err(Error::Ggml(format!(
                "tensor name `{name}` too long for ggml"
            )));
        }
        let c = CString::new(name).map_err(|_| Error::Ggml("tensor name contains NUL".into()))?;
        // SAFETY: ggml copies the name (length checked).
        unsafe { sys::ggml_set_name(self.ptr.as_ptr(), c.as_ptr()) };
        Ok(())
    }
}

/// The ggml backends one [`Backend`] computes with: the CPU always (the best variant
/// for this CPU when ggml was built with one loadable library per instruction set, see
/// [`super::cpu_backend_device`]), and a GPU where one was asked for.
pub(super) struct Engines {
    pub(super) cpu: NonNull<sys::ggml_backend>,
    pub(super) gpu: Option<Gpu>,
}

pub(super) struct Gpu {
    pub(super) backend: NonNull<sys::ggml_backend>,
    pub(super) device: super::device::Device,
    /// `Vulkan0` and the like, for messages.
    pub(super) name: String,
}

// SAFETY: ggml backends may be used from any thread, one caller at a time. Engines are
// shared only between a `Backend` and the contexts it targets, all of which belong to
// one owner (a pipeline), and neither `Backend` nor `Context` is `Sync`.
unsafe impl Send for Engines {}
unsafe impl Sync for Engines {}

impl Drop for Engines {
    fn drop(&mut self) {
        // SAFETY: created by ggml_backend_dev_init, freed once, after every scheduler
        // and buffer that used them (contexts hold this struct until they are freed).
        unsafe {
            if let Some(g) = self.gpu.take() {
                let _one = GPU_LIFECYCLE.lock().unwrap_or_else(|e| e.into_inner());
                sys::ggml_backend_free(g.backend.as_ptr());
            }
            sys::ggml_backend_free(self.cpu.as_ptr());
        }
    }
}

/// ggml-vulkan sets up a device's shared state on its first backend and tears it down
/// with the last, unguarded: two threads starting backends at once abort in the
/// driver. Creation and release take turns; running graphs needs no lock.
static GPU_LIFECYCLE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Where graphs run: ggml's CPU backend, or a GPU with the CPU for the ops the GPU lacks.
pub struct Backend {
    engines: Arc<Engines>,
    /// Per-node timings while profiling is on.
    profile: RefCell<Option<Vec<NodeTiming>>>,
}

impl Backend {
    pub fn cpu(threads: usize) -> Result<Backend> {
        Ok(Backend {
            engines: Arc::new(Engines {
                cpu: cpu_engine(threads)?,
                gpu: None,
            }),
            profile: RefCell::new(None),
        })
    }

    /// `cpu`, or device `device` of a GPU backend by ggml's name (`vulkan`), with a
    /// CPU backend of `threads` threads for the ops the GPU lacks.
    pub fn open(name: &str, device: usize, threads: usize) -> Result<Backend> {
        if name.eq_ignore_ascii_case("cpu") {
            return Backend::cpu(threads);
        }
        Backend::gpu(super::device::gpu_device(name, device)?, threads)
    }

    fn gpu(device: super::device::Device, threads: usize) -> Result<Backend> {
        let cpu = cpu_engine(threads)?;
        let _one = GPU_LIFECYCLE.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the device is registered for the life of the process.
        let (ptr, name) = unsafe {
            (
                sys::ggml_backend_dev_init(device.as_ptr(), std::ptr::null()),
                super::device::cstr(sys::ggml_backend_dev_name(device.as_ptr())),
            )
        };
        let Some(backend) = NonNull::new(ptr) else {
            // SAFETY: created above, freed once.
            unsafe { sys::ggml_backend_free(cpu.as_ptr()) };
            return Err(Error::Ggml(format!("cannot start the {name} backend")));
        };
        Ok(Backend {
            engines: Arc::new(Engines {
                cpu,
                gpu: Some(Gpu {
                    backend,
                    device,
                    name,
                }),
            }),
            profile: RefCell::new(None),
        })
    }

    /// The GPU's name (`Vulkan0`), or `None` for the CPU.
    pub fn gpu_name(&self) -> Option<&str> {
        self.engines.gpu.as_ref().map(|g| g.name.as_str())
    }

    /// The backend that holds weights and runs the graph (the GPU if there is one).
    fn primary(&self) -> NonNull<sys::ggml_backend> {
        self.engines
            .gpu
            .as_ref()
            .map_or(self.engines.cpu, |g| g.backend)
    }

    /// Times every graph node from now on ([`Backend::take_profile`] collects them).
    /// Nodes then run one at a time: same results, a little slower, and none of the
    /// CPU backend's cross-node fusions.
    pub fn set_profiling(&self, on: bool) {
        *self.profile.borrow_mut() = on.then(Vec::new);
    }

    /// The timings recorded since profiling started or the last call.
    pub fn take_profile(&self) -> Vec<NodeTiming> {
        self.profile
            .borrow_mut()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn compute_raw(&self, g: *mut sys::ggml_cgraph) -> Result<()> {
        // SAFETY: graph and backend valid; inputs allocated (ggml checks and asserts otherwise,
        // so callers allocate every context tensor before computing).
        let status = unsafe { sys::ggml_backend_graph_compute(self.engines.cpu.as_ptr(), g) };
        if status != sys::GGML_STATUS_SUCCESS {
            return Err(Error::Ggml(format!("graph compute failed ({status})")));
        }
        Ok(())
    }

    /// Runs `g` node by node, in its order (so every input is ready, and the
    /// allocator's buffer reuse stays valid), through a one-node graph.
    fn compute_profiled(&self, g: &Graph<'_>, out: &mut Vec<NodeTiming>) -> Result<()> {
        // SAFETY: a context just big enough for one graph of one node, freed below.
        let size = unsafe { sys::ggml_graph_overhead_custom(1, false) } + 1024;
        let params = sys::ggml_init_params {
            mem_size: size,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        let scratch = NonNull::new(unsafe { sys::ggml_init(params) })
            .ok_or_else(|| Error::Ggml("ggml_init failed".into()))?;
        struct Free(NonNull<sys::ggml_context>);
        impl Drop for Free {
            fn drop(&mut self) {
                // SAFETY: created above, freed once.
                unsafe { sys::ggml_free(self.0.as_ptr()) }
            }
        }
        let scratch = Free(scratch);
        // SAFETY: room for exactly this graph (see size).
        let one = NonNull::new(unsafe { sys::ggml_new_graph_custom(scratch.0.as_ptr(), 1, false) })
            .ok_or_else(|| Error::Ggml("no room for a graph".into()))?;
        // SAFETY: the graph and its nodes live as long as `g`'s context.
        let n = unsafe { sys::ggml_graph_n_nodes(g.ptr.as_ptr()) };
        for i in 0..n {
            // SAFETY: 0 <= i < n; the one-node graph only references the node.
            let node = unsafe { sys::ggml_graph_node(g.ptr.as_ptr(), i) };
            unsafe {
                sys::ggml_graph_clear(one.as_ptr());
                sys::ggml_graph_add_node(one.as_ptr(), node);
            }
            let t = std::time::Instant::now();
            self.compute_raw(one.as_ptr())?;
            let seconds = t.elapsed().as_secs_f64();
            // SAFETY: node valid (above); ggml_op_desc returns a static string.
            let (op, src_type, flops) = unsafe {
                let r = &*node;
                let mut op = std::ffi::CStr::from_ptr(sys::ggml_op_desc(node))
                    .to_string_lossy()
                    .into_owned();
                // sdrs' own ops are custom ops named for what they are.
                let name = std::ffi::CStr::from_ptr(r.name.as_ptr()).to_string_lossy();
                if r.op == sys::GGML_OP_CUSTOM && name.starts_with("sdrs.") {
                    op = format!("{} (sdrs)", name[5..].to_uppercase());
                }
                let src_type = if r.src[0].is_null() {
                    Type(r.type_)
                } else {
                    Type((*r.src[0]).type_)
                };
                (op, src_type, node_flops(r))
            };
            out.push(NodeTiming {
                op,
                src_type,
                flops,
                seconds,
            });
        }
        Ok(())
    }

    /// Runs a graph whose tensors all have data.
    pub fn compute(&self, g: &Graph<'_>) -> Result<()> {
        if let Some(sched) = g.ctx.sched.get() {
            // SAFETY: the scheduler allocated this graph (alloc_graph) and lives as long
            // as its context.
            let status =
                unsafe { sys::ggml_backend_sched_graph_compute(sched.as_ptr(), g.ptr.as_ptr()) };
            if status != sys::GGML_STATUS_SUCCESS {
                return Err(Error::Ggml(format!("graph compute failed ({status})")));
            }
            return Ok(());
        }
        if let Some(rec) = self.profile.borrow_mut().as_mut() {
            return self.compute_profiled(g, rec);
        }
        self.compute_raw(g.ptr.as_ptr())
    }
}

/// A CPU backend with `threads` threads.
fn cpu_engine(threads: usize) -> Result<NonNull<sys::ggml_backend>> {
    let dev = super::cpu_backend_device()?;
    // SAFETY: the device is registered for the life of the process.
    let ptr = NonNull::new(unsafe { sys::ggml_backend_dev_init(dev.as_ptr(), std::ptr::null()) })
        .ok_or_else(|| Error::Ggml("cannot start the CPU backend".into()))?;
    // The thread setter lives in the (possibly dynamically loaded) CPU library, so it
    // is looked up through the registry instead of linked by name.
    // SAFETY: registry entries are valid for the process; the name is NUL-terminated.
    let setter = unsafe {
        let reg = sys::ggml_backend_dev_backend_reg(dev.as_ptr());
        sys::ggml_backend_reg_get_proc_address(reg, c"ggml_backend_set_n_threads".as_ptr())
    };
    if !setter.is_null() {
        // SAFETY: ggml documents this entry point as `ggml_backend_set_n_threads_t`.
        let set: sys::ggml_backend_set_n_threads_t = unsafe { std::mem::transmute(setter) };
        if let Some(set) = set {
            unsafe { set(ptr.as_ptr(), threads.max(1) as i32) };
        }
    }
    Ok(ptr)
}
