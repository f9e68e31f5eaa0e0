//! The ControlNet (lllyasviel's `cldm.ControlNet`; diffusers `ControlNetModel`): the
//! UNet's encoder under its own prefix, a convolutional embedding of the
//! conditioning image added after `conv_in`, and one zero convolution per kept
//! encoder output and for the middle block.
//!
//! Canonical names are those of lllyasviel's ControlNet 1.0 and 1.1 files, under
//! [`CONTROL_PREFIX`]: the encoder as in the UNet (`input_blocks.N`,
//! `middle_block.N`), `input_hint_block.{0,2,…}` (the convolutions of an
//! `nn.Sequential` with SiLUs between them), `zero_convs.N.0` and
//! `middle_block_out.0`. Diffusers names: `controlnet_cond_embedding.{conv_in,
//! blocks.i, conv_out}`, `controlnet_down_blocks.N`, `controlnet_mid_block`.
use crate::config::ControlConfig;
use crate::error::{Error, Result};

use super::unet::Encoder;
use super::{params_of, At, Param};

/// Where a ControlNet's tensors live in lllyasviel's files and in our GGUFs.
pub const CONTROL_PREFIX: &str = "control_model.";

/// One convolution of the conditioning embedding.
#[derive(Clone, Debug)]
pub struct HintConv {
    pub layer: super::Layer,
    pub stride: usize,
}

#[derive(Clone, Debug)]
pub struct ControlNet {
    pub encoder: Encoder,
    /// The conditioning embedding's 3x3 convolutions in order, SiLU after all but
    /// the last.
    pub hint: Vec<HintConv>,
    /// 1x1 convolutions of the kept encoder outputs, in the order kept.
    pub zero_convs: Vec<super::Layer>,
    pub mid_out: super::Layer,
}

impl ControlNet {
    pub fn new(c: &ControlConfig) -> Result<Self> {
        let encoder = Encoder::new(&c.unet, CONTROL_PREFIX)?;
        let top = At::new(CONTROL_PREFIX, "");
        let emb = &c.embedding_channels;
        let first = *emb.first().ok_or_else(|| {
            Error::Invalid("the ControlNet's conditioning embedding has no levels".into())
        })?;
        // `input_hint_block` counts every module of its Sequential, SiLUs included.
        let canonical = |k: usize| format!("input_hint_block.{}", 2 * k);
        let mut hint = vec![HintConv {
            layer: top.conv(
                &canonical(0),
                "controlnet_cond_embedding.conv_in",
                first,
                c.hint_channels,
                3,
            ),
            stride: 1,
        }];
        for (i, pair) in emb.windows(2).enumerate() {
            let (a, b) = (pair[0], pair[1]);
            for (j, (out, stride)) in [(a, 1), (b, 2)].into_iter().enumerate() {
                let block = 2 * i + j;
                hint.push(HintConv {
                    layer: top.conv(
                        &canonical(block + 1),
                        &format!("controlnet_cond_embedding.blocks.{block}"),
                        out,
                        a,
                        3,
                    ),
                    stride,
                });
            }
        }
        let last = *emb.last().unwrap_or(&first);
        hint.push(HintConv {
            layer: top.conv(
                &canonical(hint.len()),
                "controlnet_cond_embedding.conv_out",
                c.unet.model_channels,
                last,
                3,
            ),
            stride: 1,
        });
        let zero_convs = encoder
            .skips
            .iter()
            .enumerate()
            .map(|(n, &ch)| {
                top.conv(
                    &format!("zero_convs.{n}.0"),
                    &format!("controlnet_down_blocks.{n}"),
                    ch,
                    ch,
                    1,
                )
            })
            .collect();
        let w = encoder.width;
        let mid_out = top.conv("middle_block_out.0", "controlnet_mid_block", w, w, 1);
        Ok(ControlNet {
            encoder,
            hint,
            zero_convs,
            mid_out,
        })
    }

    /// Every parameter, in module order.
    pub fn params(&self) -> Vec<Param> {
        let mut out = self.encoder.params();
        params_of(self.hint.iter().map(|h| &h.layer), &mut out);
        params_of(&self.zero_convs, &mut out);
        self.mid_out.params(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    fn sd15() -> ControlConfig {
        let mut unet = ModelConfig::sd1().unet;
        unet.up_blocks.clear();
        ControlConfig {
            family: "sd1".into(),
            unet,
            hint_channels: 3,
            embedding_channels: vec![16, 32, 96, 256],
        }
    }

    #[test]
    fn sd15_controlnet_has_lllyasviels_names_and_shapes() {
        let p = ControlNet::new(&sd15()).unwrap().params();
        let find = |n: &str| {
            p.iter()
                .find(|x| x.canonical == n)
                .unwrap_or_else(|| panic!("no {n}"))
        };
        assert_eq!(
            find("control_model.input_hint_block.0.weight").shape,
            [16, 3, 3, 3]
        );
        assert_eq!(
            find("control_model.input_hint_block.4.weight").shape,
            [32, 16, 3, 3]
        );
        assert_eq!(
            find("control_model.input_hint_block.12.weight").shape,
            [256, 96, 3, 3]
        );
        assert_eq!(
            find("control_model.input_hint_block.14.weight").shape,
            [320, 256, 3, 3]
        );
        assert_eq!(
            find("control_model.input_hint_block.10.weight").diffusers,
            ["controlnet_cond_embedding.blocks.4.weight"]
        );
        assert_eq!(
            find("control_model.zero_convs.11.0.weight").shape,
            [1280, 1280, 1, 1]
        );
        assert_eq!(
            find("control_model.zero_convs.0.0.weight").diffusers,
            ["controlnet_down_blocks.0.weight"]
        );
        assert_eq!(find("control_model.middle_block_out.0.bias").shape, [1280]);
        assert_eq!(
            find("control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight").diffusers,
            ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
        );
        assert!(p.iter().all(|x| !x.canonical.contains("output_blocks")));
        // lllyasviel's cldm_v15.yaml ControlNet: 12 zero convolutions, 8 hint
        // convolutions, and the encoder of SD 1.5 (conv_in, time MLP, 11 input
        // blocks, middle block).
        assert_eq!(
            p.iter()
                .filter(|x| x.canonical.contains("zero_convs"))
                .count(),
            24
        );
        assert_eq!(p.len(), 340);
    }
}
