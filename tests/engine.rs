//! End-to-end tests of the engine on the real shared VGG-16 weights and real photos and paintings,
//! at small sizes so they stay fast on a CPU.

mod common;

use impasto::imageio;
use impasto::model::{self, LayerId, Pooling};
use impasto::style::color::{self, ColorMode};
use impasto::style::optim::OptimizerKind;
use impasto::style::{Init, ScaleStep, StyleImage, StyleSettings, Stylizer, score};
use tch::{Kind, Tensor};

fn small_settings(size: u32, iterations: u32) -> StyleSettings {
    StyleSettings { size, iterations, ..StyleSettings::default() }
}

fn starry() -> StyleImage {
    StyleImage { image: imageio::read_rgb(&common::media("paintings/starry_night.jpg")).unwrap(), weight: 1.0 }
}

fn wave() -> StyleImage {
    StyleImage { image: imageio::read_rgb(&common::media("paintings/great_wave.png")).unwrap(), weight: 1.0 }
}

fn astronaut() -> image::RgbImage {
    imageio::read_rgb(&common::media("photos/astronaut.png")).unwrap()
}

#[test]
fn normalisation_only_rescales_each_feature_map() {
    let raw = common::vgg16(Pooling::Avg, false);
    let normalised = common::vgg16(Pooling::Avg, true);
    let photo = imageio::load_tensor(&common::media("photos/chelsea.png"), Some(96), tch::Device::Cpu).unwrap();
    let layers: Vec<LayerId> =
        ["conv1_1", "conv2_2", "conv3_3", "conv4_2", "conv5_3"].iter().map(|l| l.parse().unwrap()).collect();
    let _guard = tch::no_grad_guard();
    for ((layer, a), b) in layers.iter().zip(raw.features(&photo, &layers)).zip(normalised.features(&photo, &layers)) {
        // per channel, b = a / m with m > 0: the direction of every feature map is unchanged
        let dims = [0i64, 2, 3];
        let dot = (&a * &b).sum_dim_intlist(dims.as_slice(), false, Kind::Double);
        let norms = a.square().sum_dim_intlist(dims.as_slice(), false, Kind::Double).sqrt()
            * b.square().sum_dim_intlist(dims.as_slice(), false, Kind::Double).sqrt();
        let active = norms.gt(1e-8);
        let cosine = (dot / norms.clamp_min(1e-30)).masked_select(&active);
        let worst = cosine.min().double_value(&[]);
        assert!(worst > 0.9999, "{layer}: a feature map changed direction (cosine {worst})");
    }
}

#[test]
fn normalised_filters_average_one_over_the_calibration_images() {
    let normalised = common::vgg16(Pooling::Avg, true);
    let means = model::normalize::mean_activations(&normalised, &model::normalize::calibration_images());
    for (conv, mean) in normalised.convs().iter().zip(means) {
        // filters at or above the floor are exactly 1; floored ones are below 1
        let median = mean.median().double_value(&[]);
        let max = mean.max().double_value(&[]);
        assert!((median - 1.0).abs() < 1e-3, "{}: median mean activation {median}", conv.layer);
        assert!(max < 1.0 + 1e-3, "{}: max mean activation {max}", conv.layer);
    }
}

#[test]
fn stylization_moves_grams_towards_the_style_and_keeps_the_content() {
    let vgg = common::default_vgg16();
    let scorer = common::vgg16(Pooling::Max, false);
    let content = astronaut();
    let stylizer = Stylizer::new(&vgg, small_settings(96, 60)).unwrap();
    let result = stylizer.stylize(&content, &[starry()], &mut |_| {}).unwrap();
    let output = imageio::tensor_to_rgb(&result.image);
    assert_eq!(output.dimensions(), (96, 96));
    let style = imageio::read_rgb(&common::media("paintings/starry_night.jpg")).unwrap();
    let before = score::score(&scorer, &content, &style, &imageio::resize_long_side(&content, 96));
    let after = score::score(&scorer, &content, &style, &output);
    assert!(after.style < before.style * 0.6, "style distance {} → {}", before.style, after.style);
    assert!(after.content < 0.4, "content distance {}", after.content);
}

#[test]
fn noise_init_is_reproducible_with_a_seed() {
    let vgg = common::default_vgg16();
    let run = |seed| {
        let settings = StyleSettings { init: Init::Noise, seed, ..small_settings(48, 5) };
        Stylizer::new(&vgg, settings).unwrap().stylize(&astronaut(), &[starry()], &mut |_| {}).unwrap().image
    };
    let first = run(7);
    assert!(first.equal(&run(7)), "same seed, different result");
    assert!(!first.equal(&run(8)), "different seeds, same result");
}

#[test]
fn luminance_mode_keeps_the_content_colours() {
    let vgg = common::default_vgg16();
    let settings = StyleSettings { color: ColorMode::Luminance, ..small_settings(64, 10) };
    let content = astronaut();
    let result = Stylizer::new(&vgg, settings).unwrap().stylize(&content, &[starry()], &mut |_| {}).unwrap();
    let content_tensor = imageio::rgb_to_tensor(&imageio::resize_long_side(&content, 64));
    let out_iq = color::rgb_to_yiq(&result.image).narrow(1, 1, 2);
    let content_iq = color::rgb_to_yiq(&content_tensor).narrow(1, 1, 2);
    // chrominance equals the content's except where clamping to 0..1 bit
    let difference = (out_iq - content_iq).abs().mean(Kind::Float).double_value(&[]);
    assert!(difference < 0.01, "mean chrominance difference {difference}");
}

#[test]
fn blending_two_styles_lands_between_them() {
    let vgg = common::default_vgg16();
    let scorer = common::vgg16(Pooling::Max, false);
    let content = astronaut();
    let blend = |weights: Vec<f64>| {
        let settings = StyleSettings { style_blend: weights, ..small_settings(64, 40) };
        let result =
            Stylizer::new(&vgg, settings).unwrap().stylize(&content, &[starry(), wave()], &mut |_| {}).unwrap();
        imageio::tensor_to_rgb(&result.image)
    };
    let mostly_starry = blend(vec![1.0, 0.0]);
    let mostly_wave = blend(vec![0.0, 1.0]);
    let starry_image = starry().image;
    let to_starry = |out: &image::RgbImage| score::score(&scorer, &content, &starry_image, out).style;
    assert!(to_starry(&mostly_starry) < to_starry(&mostly_wave), "blend weights had no effect");
}

#[test]
fn multi_scale_schedule_ends_at_the_last_size_and_adam_descends() {
    let vgg = common::default_vgg16();
    let settings = StyleSettings {
        scales: vec![ScaleStep { size: 32, iterations: 5 }, ScaleStep { size: 64, iterations: 5 }],
        optimizer: OptimizerKind::Adam,
        ..StyleSettings::default()
    };
    let mut totals = Vec::new();
    let mut scales_seen = Vec::new();
    let result = Stylizer::new(&vgg, settings)
        .unwrap()
        .stylize(&astronaut(), &[starry()], &mut |p| {
            totals.push(p.losses.total);
            scales_seen.push(p.scale.0);
        })
        .unwrap();
    assert_eq!(result.image.size(), vec![1, 3, 64, 64]);
    assert_eq!(result.iterations, 10);
    assert_eq!(scales_seen, vec![1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
    assert!(totals[4] < totals[0], "Adam did not descend at the first scale: {totals:?}");
}

#[test]
fn bf16_network_gives_nearly_the_same_losses() {
    let f32_net = common::vgg16(Pooling::Avg, true);
    let bf16_net = model::load(&impasto::model::ModelSettings {
        precision: impasto::device::Precision::Bf16.into(),
        ..common::vgg16_settings(Pooling::Avg, true)
    })
    .unwrap();
    let photo = imageio::load_tensor(&common::media("photos/chelsea.png"), Some(64), tch::Device::Cpu).unwrap();
    let layer = [LayerId::new(3, 1)];
    let _guard = tch::no_grad_guard();
    let a = &f32_net.features(&photo, &layer)[0];
    let b = &bf16_net.features(&photo, &layer)[0];
    assert_eq!(b.kind(), Kind::Float, "features come back in f32");
    let relative = (a - b).norm().double_value(&[]) / a.norm().double_value(&[]);
    assert!(relative < 0.05, "bf16 features differ by {relative}");
}

#[test]
fn unknown_layer_is_a_settings_error() {
    let vgg = common::default_vgg16();
    let settings = StyleSettings { style_layers: vec![LayerId::new(3, 4)], ..StyleSettings::default() };
    let error = Stylizer::new(&vgg, settings).err().expect("conv3_4 is not in VGG-16").to_string();
    assert!(error.contains("conv3_4") && error.contains("vgg16"), "{error}");
}

#[test]
fn weights_without_a_stated_convention_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = model::weights::load(&common::vgg16_weights()).unwrap();
    let bare = dir.path().join("bare.safetensors");
    let named: Vec<(String, Tensor)> = loaded
        .convs
        .iter()
        .zip(model::Arch::Vgg16.convs())
        .flat_map(|(c, (_, index))| {
            [
                (format!("features.{index}.weight"), c.weight.shallow_clone()),
                (format!("features.{index}.bias"), c.bias.shallow_clone()),
            ]
        })
        .collect();
    Tensor::write_safetensors(&named, &bare).unwrap();
    let settings =
        impasto::model::ModelSettings { path: Some(bare.clone()), ..common::vgg16_settings(Pooling::Avg, false) };
    let error = model::load(&settings).expect_err("no convention").to_string();
    assert!(error.contains("bare.safetensors") && error.contains("--convention"), "{error}");
    let settings = impasto::model::ModelSettings { convention: Some(model::Convention::Caffe), ..settings };
    assert!(model::load(&settings).is_ok());
}

#[test]
fn reported_losses_are_the_papers_terms_under_every_balance() {
    use impasto::style::loss;
    use impasto::style::{LayerBalance, Targets};
    let vgg = common::vgg16(Pooling::Avg, false);
    let content = imageio::load_tensor(&common::media("photos/chelsea.png"), Some(64), tch::Device::Cpu).unwrap();
    let start = imageio::load_tensor(&common::media("photos/astronaut.png"), Some(64), tch::Device::Cpu).unwrap();
    // on whole 8-bit levels, as the loss sees the image as it will be saved
    let start = (impasto::style::stylizer::resize_to(&start, &content) * 255.0).round() / 255.0;
    for balance in [LayerBalance::Paper, LayerBalance::Relative, LayerBalance::Distance] {
        let settings = StyleSettings { layer_balance: balance, ratio: 0.25, ..StyleSettings::default() };
        let stylizer = Stylizer::new(&vgg, settings.clone()).unwrap();
        let targets = Targets {
            content: stylizer.content_targets(&content),
            style: stylizer.style_targets(&[starry()], 64),
            temporal: None,
        };
        let mut first = None;
        let _ = stylizer.optimise(&targets, &start, 1, &mut |_, losses, _| first = Some(losses));
        let reported = first.unwrap();

        let _guard = tch::no_grad_guard();
        let f = &vgg.features(&start, &settings.content_layers)[0];
        let p = &targets.content[0];
        let mut content_term = loss::content_loss(f, p).double_value(&[]);
        let mut style_term = 0.0;
        for (feature, per_position) in vgg.features(&start, &settings.style_layers).iter().zip(&targets.style) {
            let target = per_position * (feature.size()[2] * feature.size()[3]) as f64;
            let target = &target;
            let e = loss::style_layer_loss(feature, target).double_value(&[]);
            let relative = e / loss::style_layer_loss(&feature.zeros_like(), target).double_value(&[]);
            style_term += match balance {
                LayerBalance::Paper => e / 5.0,
                LayerBalance::Relative => relative / 5.0,
                LayerBalance::Distance => relative.sqrt() / 5.0,
            };
        }
        let relative_content = content_term / loss::content_loss(&p.zeros_like(), p).double_value(&[]);
        match balance {
            LayerBalance::Paper => {}
            LayerBalance::Relative => content_term = relative_content,
            LayerBalance::Distance => content_term = relative_content.sqrt(),
        }
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1e-12);
        assert!(
            close(reported.content, 0.25 * content_term),
            "{balance:?}: content {} vs {}",
            reported.content,
            0.25 * content_term
        );
        assert!(close(reported.style, style_term), "{balance:?}: style {} vs {style_term}", reported.style);
        assert!(close(reported.total, reported.content + reported.style));
    }
}

#[test]
fn default_settings_meet_the_quality_target_at_256_px() {
    // The target, measured as `impasto score` does: astronaut × The Starry Night, 256 px,
    // 200 iterations, default settings → style distance < 0.30 with content distance < 0.25.
    let vgg = common::default_vgg16();
    let scorer = common::vgg16(Pooling::Max, false);
    let content = astronaut();
    let stylizer = Stylizer::new(&vgg, small_settings(256, 200)).unwrap();
    let result = stylizer.stylize(&content, &[starry()], &mut |_| {}).unwrap();
    let output = imageio::tensor_to_rgb(&result.image);
    let measured = score::score(&scorer, &content, &starry().image, &output);
    assert!(measured.style < 0.30 && measured.content < 0.25, "style {} content {}", measured.style, measured.content);
}

#[test]
fn a_frame_painter_takes_the_motion_measured_ahead_only_from_the_frame_it_painted_last() {
    use impasto::flow::FlowPair;
    use impasto::pipeline::motion::Motion;
    use impasto::pipeline::{FramePainter, VideoSettings};
    use impasto::style::{Losses, Optimised};

    let vgg = common::default_vgg16();
    let video = VideoSettings { size: 64, ..VideoSettings::default() };
    let mut painter = FramePainter::new(&vgg, &small_settings(64, 5), &video, &[starry()], 64, false).unwrap();
    let frame = imageio::load_tensor(&common::media("photos/chelsea.png"), Some(64), tch::Device::Cpu).unwrap();
    let (item, plan) = painter.plan(0, 0, &frame, None).unwrap();
    let losses = Losses { content: 1.0, style: 1.0, tv: 0.0, temporal: 0.0, total: 2.0 };
    painter.finish(plan, Optimised { image: item.start, losses, iterations: 0, curvature_carried: false }, 0.0);

    // a motion no solver would give: no flow, every pixel half reliable
    let still = frame.zeros_like().narrow(1, 0, 2);
    let half_reliable = |from| Motion {
        from,
        pair: FlowPair { forward: still.copy(), backward: still.copy() },
        reliable: frame.narrow(1, 0, 1).full_like(0.5),
        is_cut: false,
        seconds: 0.0,
    };
    let next = frame.roll([2], [3]);
    let mask = |ahead| painter.plan(1, 1, &next, Some(ahead)).unwrap().0.targets.temporal.expect("a temporal term").1;
    let taken = mask(half_reliable(0));
    assert!(taken.eq(0.5).all().int64_value(&[]) == 1, "the motion from frame 0 was not taken as it came");
    // from a frame this painter did not paint last: measured again, a mask of 0s and 1s
    let measured = mask(half_reliable(5));
    let binary = measured.eq(0.0).logical_or(&measured.eq(1.0));
    assert!(binary.all().int64_value(&[]) == 1, "the motion from frame 5 was used for frame 0's painting");
    assert!(measured.mean(Kind::Float).double_value(&[]) > 0.5);
}
