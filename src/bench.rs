//! `impasto bench`: seconds per optimisation iteration (forward + backward through the network,
//! losses, optimiser step) and per forward pass at given sizes, with achieved TFLOP/s against the
//! convolutions' FLOP count and the peak memory. Engine-only, so it runs where only libtorch is.

use std::time::Instant;

use image::RgbImage;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::device::device_name;
use crate::model::{LayerId, Vgg};
use crate::style::{StyleImage, StyleSettings, Stylizer, Targets};

/// One measured size.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// Width × height in pixels.
    pub width: i64,
    /// Height in pixels.
    pub height: i64,
    /// Device the network ran on.
    pub device: String,
    /// Network precision.
    pub precision: String,
    /// Network architecture.
    pub arch: String,
    /// Activation memory layout.
    pub layout: String,
    /// Mean seconds per full iteration (forward, backward, losses, optimiser step).
    pub seconds_per_iteration: f64,
    /// Mean seconds per forward pass alone (no gradient).
    pub seconds_per_forward: f64,
    /// Convolution FLOPs of one iteration (forward + input-gradient backward ≈ 2 × forward).
    pub gflop_per_iteration: f64,
    /// Achieved TFLOP/s over a full iteration.
    pub tflops: f64,
    /// Peak resident memory of the process so far, MiB.
    pub peak_rss_mib: f64,
    /// Iterations timed.
    pub iterations: usize,
}

/// Forward FLOPs of the convolutions up to and including `deepest` at `width` × `height`.
pub fn forward_flops(vgg: &Vgg, deepest: LayerId, width: i64, height: i64) -> f64 {
    let mut flops = 0.0;
    for conv in vgg.convs() {
        let scale = 1i64 << (conv.layer.block - 1);
        let positions = ((width / scale) * (height / scale)) as f64;
        let size = conv.weight.size();
        flops += 2.0 * positions * (size[0] * size[1] * size[2] * size[3]) as f64;
        if conv.layer == deepest {
            break;
        }
    }
    flops
}

/// Peak resident set size of this process in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn synthetic_image(width: u32, height: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let v = x.wrapping_mul(2_654_435_761).wrapping_add(y.wrapping_mul(40_503)).wrapping_add(seed.wrapping_mul(97));
        image::Rgb([(v >> 3) as u8, (v >> 11) as u8, ((x + y) % 256) as u8])
    })
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Times `iterations` iterations (after `warmup`) at `width` × `height` with `settings`' layers.
pub fn bench_size(
    vgg: &Vgg,
    settings: &StyleSettings,
    width: u32,
    height: u32,
    warmup: usize,
    iterations: usize,
) -> BenchRow {
    let mut settings = settings.clone();
    settings.tolerance = 0.0;
    let stylizer = Stylizer::new(vgg, settings.clone()).expect("bench settings are valid");
    let content = crate::imageio::rgb_to_tensor(&synthetic_image(width, height, 1)).to_device(vgg.device());
    let style = StyleImage { image: synthetic_image(width, height, 2), weight: 1.0 };
    let targets = Targets {
        content: stylizer.content_targets(&content),
        style: stylizer.style_targets(&[style], width.max(height)),
        temporal: None,
    };
    let mut ignore = |_: usize, _: crate::style::Losses, _: &Tensor| {};
    let _ = stylizer.optimise(&targets, &content, warmup, &mut ignore);
    synchronize(vgg.device());
    let started = Instant::now();
    let _ = stylizer.optimise(&targets, &content, iterations, &mut ignore);
    synchronize(vgg.device());
    let seconds_per_iteration = started.elapsed().as_secs_f64() / iterations as f64;

    let layers: Vec<LayerId> = settings.content_layers.iter().chain(&settings.style_layers).copied().collect();
    let deepest = *layers.iter().max().expect("layers");
    let seconds_per_forward = {
        let _guard = tch::no_grad_guard();
        let _ = vgg.features(&content, &layers);
        synchronize(vgg.device());
        let started = Instant::now();
        for _ in 0..iterations {
            let _ = vgg.features(&content, &layers);
        }
        synchronize(vgg.device());
        started.elapsed().as_secs_f64() / iterations as f64
    };
    let (h, w) = (content.size()[2], content.size()[3]);
    let flops = 2.0 * forward_flops(vgg, deepest, w, h);
    BenchRow {
        width: w,
        height: h,
        device: device_name(vgg.device()),
        precision: vgg.precision().to_string(),
        arch: vgg.arch().to_string(),
        layout: format!("{:?}", vgg.layout()),
        seconds_per_iteration,
        seconds_per_forward,
        gflop_per_iteration: flops / 1e9,
        tflops: flops / seconds_per_iteration / 1e12,
        peak_rss_mib: peak_rss_mib(),
        iterations,
    }
}

/// A VGG with random weights of the given architecture (for benchmarking without weight files).
pub fn random_vgg(arch: crate::model::Arch, settings: &crate::model::ModelSettings, device: Device) -> Vgg {
    tch::manual_seed(0);
    let convs = arch
        .convs()
        .into_iter()
        .map(|(layer, _)| {
            let (out, inp) = (arch.out_channels(layer), arch.in_channels(layer));
            let std = (2.0 / (inp * 9) as f64).sqrt();
            crate::model::weights::ConvWeights {
                layer,
                weight: Tensor::randn([out, inp, 3, 3], (Kind::Float, Device::Cpu)) * std,
                bias: Tensor::zeros([out], (Kind::Float, Device::Cpu)),
            }
        })
        .collect();
    Vgg::with_layout(
        arch,
        convs,
        crate::model::Convention::Torchvision,
        settings.pooling,
        device,
        settings.precision,
        settings.layout,
    )
}
