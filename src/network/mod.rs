//! Each network's structure, described once. A plan ([`unet::Unet`], [`vae::Vae`],
//! [`clip::TextEncoder`]) is derived from the network's config and lists its blocks in
//! module order, every weight-bearing layer with its single-file (canonical) name, its
//! diffusers name and its shape. Everything that needs names or structure walks it:
//! the checkpoint layout ([`crate::formats::layout`]), the diffusers name mapping and
//! writer ([`crate::formats::diffusers`]), LoRA key resolution, and the ggml graphs
//! ([`crate::model`]). A new block kind is one change here.
pub mod clip;
pub mod controlnet;
pub mod unet;
pub mod vae;

/// Where the UNet's tensors live in a single-file checkpoint (and in our GGUFs).
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Where the VAE's tensors live.
pub const VAE_PREFIX: &str = "first_stage_model.";

/// How the diffusers tensors of a [`Param`] become the canonical one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Same,
    /// A diffusers linear weight [C, C] that the single file stores as a 1x1
    /// convolution [C, C, 1, 1] (VAE mid-block attention): same bytes, new shape.
    Conv1x1,
    /// Diffusers tensors stacked along axis 0 (OpenCLIP `in_proj` from q, k, v).
    Concat,
    /// The canonical 2-D tensor is the transpose of the diffusers one (OpenCLIP
    /// `text_projection` is applied as `x @ P`, a linear layer as `x @ W^T`).
    Transpose,
}

/// One parameter tensor: its canonical name and shape (PyTorch order) and the
/// diffusers tensor(s) it is made of.
#[derive(Clone, Debug)]
pub struct Param {
    pub canonical: String,
    pub shape: Vec<usize>,
    pub diffusers: Vec<String>,
    pub op: Op,
}

impl Param {
    fn same(canonical: String, diffusers: String, shape: Vec<usize>) -> Self {
        Param {
            canonical,
            shape,
            diffusers: vec![diffusers],
            op: Op::Same,
        }
    }

    /// The shape of each diffusers tensor of this parameter.
    pub fn part_shape(&self) -> Vec<usize> {
        match self.op {
            Op::Same => self.shape.clone(),
            Op::Conv1x1 => self.shape.iter().take(2).copied().collect(),
            Op::Concat => {
                let mut s = self.shape.clone();
                if let Some(first) = s.first_mut() {
                    *first /= self.diffusers.len().max(1);
                }
                s
            }
            Op::Transpose => self.shape.iter().rev().copied().collect(),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// What a [`Layer`] computes, which fixes its parameters' shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// GroupNorm or LayerNorm: `weight` and `bias` of `channels`.
    Norm {
        channels: usize,
    },
    Linear {
        out: usize,
        inp: usize,
        bias: bool,
    },
    /// A `kernel`x`kernel` convolution with a bias.
    Conv {
        out: usize,
        inp: usize,
        kernel: usize,
    },
    /// A 1x1 convolution in the single file that diffusers stores as a linear layer.
    LinearAsConv {
        channels: usize,
    },
    /// A lookup table of `rows` vectors `dim` wide (`weight` only).
    Embedding {
        rows: usize,
        dim: usize,
    },
    /// A fixed vector of `len` values (`weight` only).
    Vector {
        len: usize,
    },
}

/// One weight-bearing layer: `name.weight` (and `name.bias`) in the single file,
/// `diffusers.weight` (and `.bias`) in a diffusers folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// Canonical name, without `.weight`.
    pub name: String,
    /// Diffusers name, without `.weight`.
    pub diffusers: String,
    pub kind: Kind,
}

impl Layer {
    pub fn new(name: impl Into<String>, diffusers: impl Into<String>, kind: Kind) -> Self {
        Layer {
            name: name.into(),
            diffusers: diffusers.into(),
            kind,
        }
    }

    /// The layer's parameters, weight first.
    pub fn params(&self, out: &mut Vec<Param>) {
        let w = |suffix: &str, shape: Vec<usize>| {
            Param::same(
                format!("{}.{suffix}", self.name),
                format!("{}.{suffix}", self.diffusers),
                shape,
            )
        };
        match self.kind {
            Kind::Norm { channels } => {
                out.push(w("weight", vec![channels]));
                out.push(w("bias", vec![channels]));
            }
            Kind::Linear { out: o, inp, bias } => {
                out.push(w("weight", vec![o, inp]));
                if bias {
                    out.push(w("bias", vec![o]));
                }
            }
            Kind::Conv {
                out: o,
                inp,
                kernel,
            } => {
                out.push(w("weight", vec![o, inp, kernel, kernel]));
                out.push(w("bias", vec![o]));
            }
            Kind::LinearAsConv { channels } => {
                out.push(Param {
                    op: Op::Conv1x1,
                    ..w("weight", vec![channels, channels, 1, 1])
                });
                out.push(w("bias", vec![channels]));
            }
            Kind::Embedding { rows, dim } => out.push(w("weight", vec![rows, dim])),
            Kind::Vector { len } => out.push(w("weight", vec![len])),
        }
    }
}

/// Builds layers under a pair of block prefixes (canonical, diffusers).
#[derive(Clone, Debug)]
pub(crate) struct At {
    canonical: String,
    diffusers: String,
}

impl At {
    pub(crate) fn new(canonical: impl Into<String>, diffusers: impl Into<String>) -> Self {
        At {
            canonical: canonical.into(),
            diffusers: diffusers.into(),
        }
    }

    /// The sub-block `c` (canonical) / `d` (diffusers).
    pub(crate) fn sub(&self, c: &str, d: &str) -> At {
        At::new(join(&self.canonical, c), join(&self.diffusers, d))
    }

    pub(crate) fn layer(&self, c: &str, d: &str, kind: Kind) -> Layer {
        Layer::new(join(&self.canonical, c), join(&self.diffusers, d), kind)
    }

    pub(crate) fn norm(&self, c: &str, d: &str, channels: usize) -> Layer {
        self.layer(c, d, Kind::Norm { channels })
    }

    pub(crate) fn linear(&self, c: &str, d: &str, out: usize, inp: usize) -> Layer {
        self.layer(
            c,
            d,
            Kind::Linear {
                out,
                inp,
                bias: true,
            },
        )
    }

    pub(crate) fn conv(&self, c: &str, d: &str, out: usize, inp: usize, kernel: usize) -> Layer {
        self.layer(c, d, Kind::Conv { out, inp, kernel })
    }
}

/// `a.b`, or `b` alone under the empty prefix; prefixes that end in `.` are kept as is.
fn join(a: &str, b: &str) -> String {
    if a.is_empty() || a.ends_with('.') {
        format!("{a}{b}")
    } else {
        format!("{a}.{b}")
    }
}

/// Parameters of several layers in order.
pub(crate) fn params_of<'a>(layers: impl IntoIterator<Item = &'a Layer>, out: &mut Vec<Param>) {
    for l in layers {
        l.params(out);
    }
}
