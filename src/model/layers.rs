//! Names of VGG layers (`conv4_2`, `relu5_1`), the two architectures' layouts, and pooling modes.
//! A layer is named by its convolution; its features are always taken after the ReLU, as in the paper.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One convolution of a VGG network: `conv{block}_{index}`, both counted from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LayerId {
    /// Block number, 1..=5.
    pub block: u8,
    /// Convolution within the block, from 1.
    pub index: u8,
}

impl LayerId {
    /// `conv{block}_{index}`.
    pub const fn new(block: u8, index: u8) -> Self {
        LayerId { block, index }
    }
}

impl std::fmt::Display for LayerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "conv{}_{}", self.block, self.index)
    }
}

impl FromStr for LayerId {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        let bad = || Error::Settings(format!("layer '{text}': expected a name like conv4_2 or relu4_2"));
        let rest = text.strip_prefix("conv").or_else(|| text.strip_prefix("relu")).ok_or_else(bad)?;
        let (block, index) = rest.split_once('_').ok_or_else(bad)?;
        let block: u8 = block.parse().map_err(|_| bad())?;
        let index: u8 = index.parse().map_err(|_| bad())?;
        if !(1..=5).contains(&block) || index == 0 {
            return Err(bad());
        }
        Ok(LayerId { block, index })
    }
}

impl TryFrom<String> for LayerId {
    type Error = Error;
    fn try_from(text: String) -> Result<Self> {
        text.parse()
    }
}

impl From<LayerId> for String {
    fn from(id: LayerId) -> String {
        id.to_string()
    }
}

/// Which VGG feature stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// 13 convolutions (2, 2, 3, 3, 3 per block).
    Vgg16,
    /// 16 convolutions (2, 2, 4, 4, 4 per block), the paper's network.
    Vgg19,
}

/// Output channels of each block's convolutions.
pub const BLOCK_CHANNELS: [i64; 5] = [64, 128, 256, 512, 512];

impl Arch {
    /// Convolutions per block.
    pub fn block_sizes(self) -> [u8; 5] {
        match self {
            Arch::Vgg16 => [2, 2, 3, 3, 3],
            Arch::Vgg19 => [2, 2, 4, 4, 4],
        }
    }

    /// The architecture with `conv_count` convolutions, if any.
    pub fn from_conv_count(conv_count: usize) -> Option<Arch> {
        match conv_count {
            13 => Some(Arch::Vgg16),
            16 => Some(Arch::Vgg19),
            _ => None,
        }
    }

    /// Every convolution in order, with its index in torchvision's `features` list.
    pub fn convs(self) -> Vec<(LayerId, usize)> {
        let mut layers = Vec::new();
        let mut features_index = 0;
        for (block, &count) in self.block_sizes().iter().enumerate() {
            for index in 1..=count {
                layers.push((LayerId::new(block as u8 + 1, index), features_index));
                features_index += 2; // conv, relu
            }
            features_index += 1; // pool
        }
        layers
    }

    /// Whether the network has this layer.
    pub fn has(self, layer: LayerId) -> bool {
        (1..=5).contains(&layer.block) && layer.index <= self.block_sizes()[layer.block as usize - 1]
    }

    /// Input channels of a convolution.
    pub fn in_channels(self, layer: LayerId) -> i64 {
        match (layer.block, layer.index) {
            (1, 1) => 3,
            (b, 1) => BLOCK_CHANNELS[b as usize - 2],
            (b, _) => BLOCK_CHANNELS[b as usize - 1],
        }
    }

    /// Output channels of a convolution.
    pub fn out_channels(self, layer: LayerId) -> i64 {
        BLOCK_CHANNELS[layer.block as usize - 1]
    }
}

impl FromStr for Arch {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "vgg16" => Ok(Arch::Vgg16),
            "vgg19" => Ok(Arch::Vgg19),
            _ => Err(Error::Settings(format!("architecture '{text}': expected 'vgg16' or 'vgg19'"))),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arch::Vgg16 => "vgg16",
            Arch::Vgg19 => "vgg19",
        })
    }
}

/// How the network downsamples between blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Average pooling: the paper's choice for synthesis (smoother gradients).
    #[default]
    Avg,
    /// Max pooling, as the network was trained.
    Max,
}

impl FromStr for Pooling {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "avg" | "average" => Ok(Pooling::Avg),
            "max" => Ok(Pooling::Max),
            _ => Err(Error::Settings(format!("pooling '{text}': expected 'avg' or 'max'"))),
        }
    }
}

impl std::fmt::Display for Pooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pooling::Avg => "avg",
            Pooling::Max => "max",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_round_trip() {
        let layer: LayerId = "relu4_2".parse().unwrap();
        assert_eq!(layer, LayerId::new(4, 2));
        assert_eq!(layer.to_string(), "conv4_2");
        assert!("conv6_1".parse::<LayerId>().is_err());
        assert!("fc7".parse::<LayerId>().is_err());
    }

    #[test]
    fn torchvision_indices_match_the_published_layouts() {
        let vgg19 = Arch::Vgg19.convs();
        assert_eq!(vgg19.len(), 16);
        assert_eq!(vgg19.iter().find(|(l, _)| *l == LayerId::new(4, 2)).unwrap().1, 21);
        assert_eq!(vgg19.iter().find(|(l, _)| *l == LayerId::new(5, 1)).unwrap().1, 28);
        let vgg16 = Arch::Vgg16.convs();
        assert_eq!(vgg16.len(), 13);
        assert_eq!(vgg16.iter().find(|(l, _)| *l == LayerId::new(4, 2)).unwrap().1, 19);
        assert_eq!(vgg16.last().unwrap().1, 28);
        assert!(!Arch::Vgg16.has(LayerId::new(3, 4)));
    }
}
