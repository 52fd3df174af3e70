//! The VGG feature stack on libtorch: convolutions with ReLU, pooling between blocks, run only as deep
//! as the deepest requested layer. Weights live on the model's device in its precision; inputs are
//! RGB 0..1 images, mapped through the model's input convention.

use std::collections::BTreeSet;

use tch::{Device, Kind, Tensor};

use super::convention::Convention;
use super::layers::{Arch, LayerId, Pooling};
use super::weights::ConvWeights;
use crate::device::Precision;
use crate::error::{Error, Result};

/// A VGG-16 or VGG-19 feature network ready to run.
#[derive(Debug)]
pub struct Vgg {
    arch: Arch,
    convs: Vec<ConvWeights>,
    pooling: Pooling,
    convention: Convention,
    device: Device,
    precision: Precision,
    layout: Layout,
}

/// How activations are laid out in memory. Channels-last (NHWC strides) lets oneDNN/cuDNN pick
/// their fastest convolution kernels; the tensors' logical shape stays `[N, C, H, W]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Plain NCHW: weights and activations contiguous in that order, whatever strides they came in.
    ChannelsFirst,
    /// NHWC strides.
    #[default]
    ChannelsLast,
}

impl Layout {
    /// `tensor` (4-D) with this layout's strides.
    pub fn apply(self, tensor: &Tensor) -> Tensor {
        match self {
            Layout::ChannelsFirst => tensor.contiguous(),
            Layout::ChannelsLast => tensor.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]),
        }
    }
}

impl std::str::FromStr for Layout {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "channels-first" | "nchw" => Ok(Layout::ChannelsFirst),
            "channels-last" | "nhwc" => Ok(Layout::ChannelsLast),
            _ => Err(Error::Settings(format!("layout '{text}': expected 'channels-first' or 'channels-last'"))),
        }
    }
}

impl Vgg {
    /// Builds the network from weights (f32, any device) and moves them to `device` in `precision`.
    pub fn new(
        arch: Arch,
        convs: Vec<ConvWeights>,
        convention: Convention,
        pooling: Pooling,
        device: Device,
        precision: Precision,
    ) -> Self {
        Self::with_layout(arch, convs, convention, pooling, device, precision, Layout::default())
    }

    /// Like [`Vgg::new`] with a memory layout for weights and activations.
    pub fn with_layout(
        arch: Arch,
        convs: Vec<ConvWeights>,
        convention: Convention,
        pooling: Pooling,
        device: Device,
        precision: Precision,
        layout: Layout,
    ) -> Self {
        let convs = convs
            .into_iter()
            .map(|c| ConvWeights {
                layer: c.layer,
                weight: layout.apply(&c.weight.to_device(device).to_kind(precision.kind())).detach(),
                bias: c.bias.to_device(device).to_kind(precision.kind()).detach(),
            })
            .collect();
        Vgg { arch, convs, pooling, convention, device, precision, layout }
    }

    /// Another handle on the same weights (no copy): for a second thread on the same device, as a
    /// `Vgg` is `Send` but not `Sync`. The weights are never written, so both may run at once.
    pub fn share(&self) -> Vgg {
        let convs = self
            .convs
            .iter()
            .map(|c| ConvWeights { layer: c.layer, weight: c.weight.shallow_clone(), bias: c.bias.shallow_clone() })
            .collect();
        Vgg { convs, ..*self }
    }

    /// VGG-16 or VGG-19.
    pub fn arch(&self) -> Arch {
        self.arch
    }
    /// The input convention.
    pub fn convention(&self) -> Convention {
        self.convention
    }
    /// The pooling mode.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }
    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.device
    }
    /// The network precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }
    /// The memory layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// The convolutions, in order.
    pub fn convs(&self) -> &[ConvWeights] {
        &self.convs
    }

    /// Checks that every layer exists in this network.
    pub fn check_layers(&self, layers: &[LayerId]) -> Result<()> {
        match layers.iter().find(|l| !self.arch.has(**l)) {
            Some(missing) => Err(Error::Settings(format!("layer {missing} does not exist in a {}", self.arch))),
            None => Ok(()),
        }
    }

    /// ReLU features of `rgb` (`[N, 3, H, W]`, RGB 0..1, f32) at each of `layers`, in the order asked,
    /// as f32 tensors `[N, C, h, w]`. Stops after the deepest requested layer. Holds the CPU's matrix
    /// products in this network's precision (`device::products`) while it runs.
    pub fn features(&self, rgb: &Tensor, layers: &[LayerId]) -> Vec<Tensor> {
        let _products = crate::device::products::hold(self.device, self.precision);
        let wanted: BTreeSet<LayerId> = layers.iter().copied().collect();
        let Some(&deepest) = wanted.iter().next_back() else { return Vec::new() };
        let mut found: Vec<(LayerId, Tensor)> = Vec::with_capacity(wanted.len());
        let mut x = self.layout.apply(&self.convention.preprocess(rgb).to_kind(self.precision.kind()));
        let mut block = 1;
        for conv in &self.convs {
            if conv.layer.block != block {
                x = self.pool(&x);
                block = conv.layer.block;
            }
            x = x.conv2d(&conv.weight, Some(&conv.bias), [1, 1], [1, 1], [1, 1], 1).relu();
            if wanted.contains(&conv.layer) {
                found.push((conv.layer, x.to_kind(Kind::Float)));
            }
            if conv.layer == deepest {
                break;
            }
        }
        layers
            .iter()
            .map(|l| found.iter().find(|(id, _)| id == l).map(|(_, t)| t.shallow_clone()).expect("layer checked"))
            .collect()
    }

    fn pool(&self, x: &Tensor) -> Tensor {
        match self.pooling {
            Pooling::Avg => x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>),
            Pooling::Max => x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Whether `tensor` (4-D) has NHWC strides.
    pub fn is_channels_last(tensor: &Tensor) -> bool {
        !tensor.is_contiguous() && tensor.permute([0, 2, 3, 1]).is_contiguous()
    }

    #[test]
    fn each_layout_gives_its_own_strides_from_either() {
        let nchw = crate::seeded::uniform(&[1, 4, 3, 5], 21);
        let nhwc = Layout::ChannelsLast.apply(&nchw);
        assert!(is_channels_last(&nhwc));
        assert!(Layout::ChannelsFirst.apply(&nhwc).is_contiguous());
        assert!(is_channels_last(&Layout::ChannelsLast.apply(&nhwc)));
        assert!(Layout::ChannelsLast.apply(&nchw).equal(&Layout::ChannelsFirst.apply(&nhwc)));
    }
}
