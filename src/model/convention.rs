//! Input conventions: how a network wants its pixels. Every model carries one; impasto never
//! guesses it. Images inside impasto are RGB in 0..1 (`[N, 3, H, W]`, f32); the convention maps them
//! to what the network was trained on.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// A network's input convention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Convention {
    /// torchvision: RGB, 0..1, minus the ImageNet mean, divided by its standard deviation.
    Torchvision,
    /// Caffe: BGR, 0..255, minus the ImageNet mean (103.939, 116.779, 123.68), no division.
    Caffe,
}

const IMAGENET_MEAN_RGB: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD_RGB: [f32; 3] = [0.229, 0.224, 0.225];
const CAFFE_MEAN_BGR: [f32; 3] = [103.939, 116.779, 123.68];

impl Convention {
    /// Maps RGB 0..1 images `[N, 3, H, W]` to the network's input.
    pub fn preprocess(self, rgb: &Tensor) -> Tensor {
        let device = rgb.device();
        match self {
            Convention::Torchvision => {
                (rgb - channel_vector(IMAGENET_MEAN_RGB, device)) / channel_vector(IMAGENET_STD_RGB, device)
            }
            Convention::Caffe => rgb.flip([1]) * 255.0 - channel_vector(CAFFE_MEAN_BGR, device),
        }
    }

    /// Reads a convention from a weight file's free-text metadata, if it states one.
    /// Accepts an explicit `convention` entry or an `input` description naming BGR and 0..255.
    pub fn from_metadata<'a>(entries: impl Iterator<Item = (&'a str, &'a str)>) -> Option<Convention> {
        let mut described = None;
        for (key, value) in entries {
            match key {
                "convention" | "impasto.convention" => return value.parse().ok(),
                "input" => {
                    let text = value.to_ascii_lowercase();
                    if text.contains("bgr") && text.contains("255") {
                        described = Some(Convention::Caffe);
                    } else if text.contains("rgb") && text.contains("std") {
                        described = Some(Convention::Torchvision);
                    }
                }
                _ => {}
            }
        }
        described
    }

    /// The convention of well-known published weight files, recognised by file name.
    pub fn from_known_file_name(name: &str) -> Option<Convention> {
        const TORCHVISION: [&str; 4] = ["vgg19-dcbb9e9d", "vgg16-397923af", "vgg19_bn", "vgg16_bn"];
        const CAFFE: [&str; 3] = ["vgg19-d01eb7cb", "vgg16-00b39a1b", "vgg_conv"];
        if TORCHVISION.iter().any(|known| name.starts_with(known)) {
            Some(Convention::Torchvision)
        } else if CAFFE.iter().any(|known| name.starts_with(known)) {
            Some(Convention::Caffe)
        } else {
            None
        }
    }
}

fn channel_vector(values: [f32; 3], device: Device) -> Tensor {
    Tensor::from_slice(&values).to_kind(Kind::Float).to_device(device).view([1, 3, 1, 1])
}

impl FromStr for Convention {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "torchvision" | "pytorch" => Ok(Convention::Torchvision),
            "caffe" => Ok(Convention::Caffe),
            _ => Err(Error::Settings(format!("input convention '{text}': expected 'torchvision' or 'caffe'"))),
        }
    }
}

impl std::fmt::Display for Convention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Convention::Torchvision => "torchvision",
            Convention::Caffe => "caffe",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caffe_maps_white_to_bgr_minus_mean() {
        let white = Tensor::ones([1, 3, 1, 1], (Kind::Float, Device::Cpu));
        let red = Tensor::from_slice(&[1.0f32, 0.0, 0.0]).view([1, 3, 1, 1]);
        let out = Convention::Caffe.preprocess(&white);
        assert!((out.double_value(&[0, 0, 0, 0]) - (255.0 - 103.939)).abs() < 1e-3);
        let out = Convention::Caffe.preprocess(&red);
        // red lands in the last (R) channel of BGR
        assert!((out.double_value(&[0, 2, 0, 0]) - (255.0 - 123.68)).abs() < 1e-3);
        assert!((out.double_value(&[0, 0, 0, 0]) + 103.939).abs() < 1e-3);
    }

    #[test]
    fn torchvision_standardises() {
        let grey = Tensor::full([1, 3, 1, 1], 0.485, (Kind::Float, Device::Cpu));
        let out = Convention::Torchvision.preprocess(&grey);
        assert!(out.double_value(&[0, 0, 0, 0]).abs() < 1e-6);
    }

    #[test]
    fn metadata_of_the_shared_file_reads_as_caffe() {
        let meta = [("input", "BGR channel order, 0..255 scale, mean-subtracted")];
        assert_eq!(Convention::from_metadata(meta.iter().copied()), Some(Convention::Caffe));
        let meta = [("layout", "whatever")];
        assert_eq!(Convention::from_metadata(meta.iter().copied()), None);
    }
}
