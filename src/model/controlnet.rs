//! The ControlNet as a ggml graph, walking the plan of
//! [`network::controlnet`](crate::network::controlnet): the UNet's embedding and
//! encoder code ([`super::unet::embed`], [`super::unet::encode`]) on the
//! ControlNet's weights, the conditioning image's embedding added after `conv_in`,
//! and a zero convolution on every kept output. The residuals it returns are
//! what [`super::unet::Inputs::control`] takes.
use crate::config::ControlConfig;
use crate::error::{Error, Result};
use crate::ggml::{Backend, Context, Tensor, Type};
use crate::network::controlnet::ControlNet;

use super::nn::{Attention, Nn};
use super::unet::{self, Inputs, Shape};
use super::Weights;

/// Builds the ControlNet for `shape` (latent size); returns its outputs in the
/// order the UNet takes them.
fn build<'c>(nn: &Nn<'c>, cfg: &ControlConfig, shape: Shape) -> Result<Vec<Tensor<'c>>> {
    let c = nn.ctx;
    let plan = ControlNet::new(cfg)?;
    let e = unet::embed(nn, &cfg.unet, &plan.encoder, shape)?;
    let f = cfg.downscale();
    let hint_in = c.tensor(
        Type::F32,
        &[
            shape.width * f,
            shape.height * f,
            cfg.hint_channels,
            shape.batch,
        ],
        "control.hint",
    )?;
    c.set_input(hint_in);
    let mut h = hint_in;
    for (i, conv) in plan.hint.iter().enumerate() {
        h = nn.conv(h, &conv.layer.name, 3, conv.stride, 1)?;
        if i + 1 < plan.hint.len() {
            h = c.silu(h)?;
        }
    }
    let (skips, mid, _) = unet::encode(nn, &cfg.unet, &plan.encoder, &e, Some(h))?;
    if skips.len() != plan.zero_convs.len() {
        return Err(Error::Invalid(format!(
            "the ControlNet keeps {} encoder outputs but has {} zero convolutions",
            skips.len(),
            plan.zero_convs.len()
        )));
    }
    let mut outs = Vec::with_capacity(skips.len() + 1);
    for (k, (s, z)) in skips.into_iter().zip(&plan.zero_convs).enumerate() {
        let o = nn.conv(s, &z.name, 1, 1, 0)?;
        c.name(o, &format!("control.out.{k}"))?;
        outs.push(o);
    }
    let o = nn.conv(mid, &plan.mid_out.name, 1, 1, 0)?;
    c.name(o, &format!("control.out.{}", outs.len()))?;
    outs.push(o);
    for &o in &outs {
        c.set_output(o);
    }
    Ok(outs)
}

/// A ControlNet graph built once for one shape and run at every step it is active.
pub struct Runner<'w> {
    ctx: Context<'w>,
    cfg: ControlConfig,
    shape: Shape,
    outputs: usize,
    /// Compute-buffer size in bytes.
    pub buffer_bytes: usize,
    /// Matrix-product FLOPs of one evaluation (all of the batch).
    pub flops: f64,
    _weights: std::marker::PhantomData<&'w Weights<'w>>,
}

impl<'w> Runner<'w> {
    /// Builds the graph for `shape` (the UNet's latent size and batch).
    pub fn new(
        w: &'w Weights<'w>,
        cfg: &ControlConfig,
        shape: Shape,
        attention: Attention,
    ) -> Result<Self> {
        let ctx = Context::new(16384)?;
        let (buffer_bytes, flops, outputs) = {
            let nn = Nn {
                attention,
                ..Nn::new(&ctx, w)
            };
            let outs = build(&nn, cfg, shape)?;
            let graph = ctx.graph(&outs)?;
            (ctx.alloc_graph(&graph)?, graph.matmul_flops(), outs.len())
        };
        Ok(Runner {
            ctx,
            cfg: cfg.clone(),
            shape,
            outputs,
            buffer_bytes,
            flops,
            _weights: std::marker::PhantomData,
        })
    }

    /// The compute buffer [`Runner::new`] would allocate, without allocating it.
    pub fn measure(
        w: &Weights<'_>,
        cfg: &ControlConfig,
        shape: Shape,
        attention: Attention,
    ) -> Result<usize> {
        let ctx = Context::new(16384)?;
        let nn = Nn {
            attention,
            ..Nn::new(&ctx, w)
        };
        let outs = build(&nn, cfg, shape)?;
        let graph = ctx.graph(&outs)?;
        ctx.measure_graph(&graph)
    }

    /// One evaluation on `inputs` (as the UNet's, without residuals) and the
    /// conditioning image `hint` `[B][hint_channels][H·f][W·f]` in [0, 1]; returns
    /// the residuals `[B][C][H][W]`, the kept encoder outputs' then the middle
    /// block's.
    pub fn run(
        &self,
        inputs: &Inputs<'_>,
        hint: &[f32],
        backend: &Backend,
    ) -> Result<Vec<Vec<f32>>> {
        unet::set_inputs(&self.ctx, &self.cfg.unet, self.shape, None, inputs)?;
        let get = |n: &str| {
            self.ctx
                .get(n)
                .ok_or_else(|| Error::Invalid(format!("ControlNet graph lacks `{n}`")))
        };
        let h = get("control.hint")?;
        if hint.len() != h.nelements() {
            return Err(Error::Invalid(format!(
                "the ControlNet takes a {}x{} conditioning image of {} channels per latent; {} values given",
                h.ne()[0],
                h.ne()[1],
                self.cfg.hint_channels,
                hint.len()
            )));
        }
        self.ctx.set_f32(h, hint)?;
        let graph = self
            .ctx
            .built_graph()
            .ok_or_else(|| Error::Invalid("ControlNet graph missing".into()))?;
        backend.compute(&graph)?;
        (0..self.outputs)
            .map(|k| self.ctx.get_f32(get(&format!("control.out.{k}"))?))
            .collect()
    }
}
