//! The flow module on real pictures: known motions of a photograph are recovered to a fraction of a
//! pixel, warping along the flow explains consecutive frames of a real clip, the reliability mask
//! finds disocclusions, and scene cuts of bikes.mp4 are found without firing inside a shot. One
//! ignored test prints the solver's speed (`cargo test --release --test flow -- --ignored --nocapture`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use impasto::flow::{self, FlowSettings};
use impasto::imageio::load_tensor;
use tch::{Device, Kind, Tensor};

/// One libtorch thread per test: the tests already run side by side, and on a shared machine
/// spinning worker threads cost far more than they bring.
fn single_threaded() {
    tch::set_num_threads(1);
}

/// The shared media folder beside the crate.
fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

/// The 512×512 astronaut photograph, RGB 0..1 `[1, 3, 512, 512]`.
fn astronaut() -> Tensor {
    load_tensor(&shared().join("media/photos/astronaut.png"), None, Device::Cpu).unwrap()
}

/// Runs of consecutive numbers in ascending `indices`, as `(first, last)`.
fn runs(indices: &[usize]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &n in indices {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == n => *last = n,
            _ => runs.push((n, n)),
        }
    }
    runs
}

/// Frames `indices` (ascending) of bikes.mp4, scaled to `width` px wide, via the ffmpeg CLI.
fn bikes_frames(indices: &[usize], width: u32) -> Vec<Tensor> {
    let folder = tempfile::tempdir().unwrap();
    let select: Vec<String> = runs(indices).iter().map(|(a, b)| format!("between(n\\,{a}\\,{b})")).collect();
    let filter = format!("select='{}',scale={width}:-2", select.join("+"));
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-i"])
        .arg(shared().join("media/video/bikes.mp4"))
        .args(["-vf", &filter, "-fps_mode", "passthrough"])
        .arg(folder.path().join("frame_%03d.png"))
        .status()
        .expect("the ffmpeg CLI runs");
    assert!(status.success(), "ffmpeg could not extract frames {indices:?}");
    (1..=indices.len())
        .map(|i| load_tensor(&folder.path().join(format!("frame_{i:03}.png")), None, Device::Cpu).unwrap())
        .collect()
}

/// Averages `factor`×`factor` blocks: an exact, interpolation-free way to make sub-pixel shifts.
fn shrink(image: &Tensor, factor: i64) -> Tensor {
    image.avg_pool2d([factor, factor], [factor, factor], [0, 0], false, true, None)
}

/// A `side`² crop of `image` whose top-left corner is `(x, y)`.
fn crop(image: &Tensor, x: i64, y: i64, side: i64) -> Tensor {
    image.narrow(2, y, side).narrow(3, x, side)
}

/// Mean endpoint error between two flows `[1, 2, H, W]`, ignoring a `margin`-pixel border.
fn mean_endpoint_error(flow: &Tensor, truth: &Tensor, margin: i64) -> f64 {
    let (_, _, height, width) = flow.size4().unwrap();
    let inner = |f: &Tensor| f.narrow(2, margin, height - 2 * margin).narrow(3, margin, width - 2 * margin);
    let error = (inner(flow) - inner(truth)).square().sum_dim_intlist(1, false, Kind::Float).sqrt();
    error.mean(Kind::Float).double_value(&[])
}

/// A constant flow `[1, 2, H, W]`.
fn constant_flow(dx: f64, dy: f64, height: i64, width: i64) -> Tensor {
    Tensor::from_slice(&[dx as f32, dy as f32]).view([1, 2, 1, 1]).expand([1, 2, height, width], false).contiguous()
}

/// Frames of a translation at 1/`factor` of the photo's resolution: `next(p) = prev(p + d)` with
/// `d = (dx, dy) / factor`, which is the backward flow to recover.
fn translated_pair(dx: i64, dy: i64, factor: i64) -> (Tensor, Tensor) {
    let photo = astronaut();
    let side = 512 - 32;
    (shrink(&crop(&photo, 16, 16, side), factor), shrink(&crop(&photo, 16 + dx, 16 + dy, side), factor))
}

#[test]
fn known_translations_are_recovered_to_a_fraction_of_a_pixel() {
    single_threaded();
    let settings = FlowSettings::default();
    for (dx, dy, factor) in [(4, -6, 2), (3, -5, 2), (1, 3, 4), (-7, 2, 2)] {
        let (prev, next) = translated_pair(dx, dy, factor);
        let (_, _, height, width) = next.size4().unwrap();
        let flow = flow::flow_backward(&prev, &next, &settings).unwrap();
        let truth = constant_flow(dx as f64 / factor as f64, dy as f64 / factor as f64, height, width);
        let error = mean_endpoint_error(&flow, &truth, 8);
        println!("shift ({dx}, {dy})/{factor}: mean endpoint error {error:.4} px");
        assert!(error < 0.1, "shift ({dx}, {dy})/{factor}: mean endpoint error {error} px");
    }
}

/// Frames of a zoom by `zoom` about the centre, with the true backward flow. At full size
/// `next(P) = prev(C + (P − C)/zoom)` (libtorch's bicubic sampler); both frames are then halved, so
/// the flow at half size is `(q − c)(1/zoom − 1)` around the half-size centre `c`.
fn zoomed_pair(zoom: f64) -> (Tensor, Tensor, Tensor) {
    const SIDE: i64 = 480;
    const BICUBIC: i64 = 2;
    const EDGE_PADDING: i64 = 1;
    let prev_full = crop(&astronaut(), 16, 16, SIDE);
    let unit = Tensor::linspace(-1.0, 1.0, SIDE, (Kind::Float, Device::Cpu)) / zoom;
    let xs = unit.view([1, 1, SIDE, 1]).expand([1, SIDE, SIDE, 1], false);
    let ys = unit.view([1, SIDE, 1, 1]).expand([1, SIDE, SIDE, 1], false);
    let next_full = prev_full.grid_sampler_2d(&Tensor::cat(&[xs, ys], 3), BICUBIC, EDGE_PADDING, true);
    let half = SIDE / 2;
    let from_centre = Tensor::arange(half, (Kind::Float, Device::Cpu)) - (half as f64 - 1.0) / 2.0;
    let along = from_centre * (1.0 / zoom - 1.0);
    let truth = Tensor::stack(
        &[along.view([1, half]).expand([half, half], false), along.view([half, 1]).expand([half, half], false)],
        0,
    );
    (shrink(&prev_full, 2), shrink(&next_full, 2), truth.unsqueeze(0))
}

#[test]
fn a_small_zoom_is_recovered_to_a_fraction_of_a_pixel() {
    single_threaded();
    let zoom = 1.04; // up to 4.6 px of motion at the edges of the 240-px frames
    let (prev, next, truth) = zoomed_pair(zoom);
    let flow = flow::flow_backward(&prev, &next, &FlowSettings::default()).unwrap();
    let error = mean_endpoint_error(&flow, &truth, 8);
    println!("zoom {zoom}: mean endpoint error {error:.4} px");
    assert!(error < 0.15, "zoom {zoom}: mean endpoint error {error} px");
}

#[test]
fn identical_photos_give_zero_flow() {
    single_threaded();
    let photo = shrink(&astronaut(), 4);
    let flow = flow::flow_backward(&photo, &photo, &FlowSettings::default()).unwrap();
    let largest = flow.abs().max().double_value(&[]);
    assert!(largest < 1e-3, "flow up to {largest} px between identical frames");
}

#[test]
fn warping_by_an_integer_shift_reproduces_the_shifted_photo_exactly() {
    single_threaded();
    let (prev, next) = translated_pair(5, -3, 1);
    let (_, _, height, width) = next.size4().unwrap();
    let warped = flow::warp(&prev, &constant_flow(5.0, -3.0, height, width));
    // Rows 3.. and columns ..width − 5 have their source inside prev.
    let inside = |image: &Tensor| image.narrow(2, 3, height - 3).narrow(3, 0, width - 5);
    assert!(inside(&warped).equal(&inside(&next)));
}

/// Masked mean over pixels of the squared colour difference.
fn masked_photometric_error(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let squared = (a - b).square().sum_dim_intlist(1, true, Kind::Float);
    ((squared * mask).sum(Kind::Double) / mask.sum(Kind::Double)).double_value(&[])
}

#[test]
fn warping_explains_consecutive_frames_of_a_real_clip() {
    single_threaded();
    // Same-shot pairs: a slow pan (60), a fast cyclist with motion blur (100), a street (200).
    for first in [60usize, 100, 200] {
        let frames = bikes_frames(&[first, first + 1], 256);
        let (prev, next) = (&frames[0], &frames[1]);
        let pair = flow::flow_pair(prev, next, &FlowSettings::default()).unwrap();
        let mask = pair.reliability();
        let unwarped = masked_photometric_error(next, prev, &mask);
        let warped = masked_photometric_error(next, &flow::warp(prev, &pair.backward), &mask);
        let reliable = mask.mean(Kind::Float).double_value(&[]);
        println!(
            "frames {first}→{}: error {unwarped:.6} → {warped:.6} ({:.1}×), reliable {reliable:.3}",
            first + 1,
            unwarped / warped
        );
        assert!(reliable > 0.4, "frames {first}→{}: only {reliable} of the pixels reliable", first + 1);
        assert!(
            warped * 8.0 < unwarped,
            "frames {first}→{}: warping took the error from {unwarped} to {warped}",
            first + 1
        );
    }
}

/// Share of the pixels of `mask` `[1, 1, H, W]` inside the box (`x`, `y`, `width`, `height`) that are 1.
fn share_set(mask: &Tensor, (x, y, width, height): (i64, i64, i64, i64)) -> f64 {
    mask.narrow(2, y, height).narrow(3, x, width).mean(Kind::Float).double_value(&[])
}

#[test]
fn the_band_entering_a_shifted_photo_is_flagged_and_the_rest_is_reliable() {
    single_threaded();
    // next(p) = prev(p + (6, −4)) at half size: the picture moves left and down, so next's
    // rightmost 6 columns and top 4 rows show what prev never saw.
    let (prev, next) = translated_pair(12, -8, 2);
    let (_, _, height, width) = next.size4().unwrap();
    let mask = flow::flow_pair(&prev, &next, &FlowSettings::default()).unwrap().reliability();
    let unreliable = mask.neg() + 1.0;
    let right_band = share_set(&unreliable, (width - 6, 4, 6, height - 4));
    let top_band = share_set(&unreliable, (0, 0, width - 6, 4));
    let rest = share_set(&mask, (2, 6, width - 10, height - 8));
    println!("flagged: right band {right_band:.3}, top band {top_band:.3}; reliable elsewhere {rest:.3}");
    assert!(right_band > 0.95 && top_band > 0.95, "bands flagged: right {right_band}, top {top_band}");
    assert!(rest > 0.97, "only {rest} of the seen part is reliable");
}

#[test]
fn the_ground_uncovered_behind_a_moving_object_is_flagged() {
    single_threaded();
    // A 64-px patch of the cat slides 8 px right over the still astronaut: in next, the strip it
    // has just left shows background that prev had hidden.
    let background = shrink(&astronaut(), 2);
    let cat = load_tensor(&shared().join("media/photos/chelsea.png"), Some(256), Device::Cpu).unwrap();
    let patch = crop(&cat, 90, 40, 64);
    let with_patch_at = |x: i64| {
        let frame = background.copy();
        frame.narrow(2, 96, 64).narrow(3, x, 64).copy_(&patch);
        frame
    };
    let (prev, next) = (with_patch_at(80), with_patch_at(88));
    let mask = flow::flow_pair(&prev, &next, &FlowSettings::default()).unwrap().reliability();
    let unreliable = mask.neg() + 1.0;
    let uncovered = share_set(&unreliable, (80, 100, 8, 56));
    let far_background = share_set(&mask, (0, 0, 256, 80)).min(share_set(&mask, (0, 176, 256, 80)));
    let patch_inside = share_set(&mask, (96, 104, 48, 48));
    println!(
        "uncovered strip flagged {uncovered:.3}; reliable: background {far_background:.3}, patch {patch_inside:.3}"
    );
    assert!(uncovered > 0.8, "only {uncovered} of the uncovered strip flagged");
    assert!(
        far_background > 0.95 && patch_inside > 0.95,
        "reliable: background {far_background}, patch {patch_inside}"
    );
}

#[test]
fn scene_cuts_of_a_real_clip_are_found_and_shots_are_left_whole() {
    single_threaded();
    // bikes.mp4 cuts after frames 29, 75, 136, 186 and 241 (ffmpeg's scene score > 0.4 finds the same).
    // The in-shot pairs include the hardest ones: bokeh lights (73), a blurred cyclist (99).
    let cuts = [29usize, 75, 136, 186, 241];
    let in_shot = [5usize, 73, 99, 160, 230];
    let mut firsts: Vec<usize> = cuts.iter().chain(&in_shot).copied().collect();
    firsts.sort();
    let indices: Vec<usize> = firsts.iter().flat_map(|&n| [n, n + 1]).collect();
    let frames = bikes_frames(&indices, 256);
    let settings = FlowSettings::default();
    for (k, first) in firsts.iter().enumerate() {
        let (prev, next) = (&frames[2 * k], &frames[2 * k + 1]);
        let reliable = flow::flow_pair(prev, next, &settings).unwrap().reliability();
        let change = flow::scene_change(prev, next, &reliable, &settings.scene_cut);
        println!("{first}→{}: {change:?}", first + 1);
        assert_eq!(change.is_cut, cuts.contains(first), "frames {first}→{}: {change:?}", first + 1);
    }
}

/// CPU time this process has used, in seconds.
fn process_cpu_seconds() -> f64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9
}

/// Fastest of `runs` calls of `work`, as (wall seconds, CPU seconds), after one warm-up call.
fn fastest(runs: usize, work: impl Fn()) -> (f64, f64) {
    work();
    let mut best = (f64::INFINITY, f64::INFINITY);
    for _ in 0..runs {
        let (wall, cpu) = (Instant::now(), process_cpu_seconds());
        work();
        best = (best.0.min(wall.elapsed().as_secs_f64()), best.1.min(process_cpu_seconds() - cpu));
    }
    best
}

/// One function-and-gradient evaluation of a Gatys-style loss through VGG-16 (the cost of one
/// optimiser iteration, give or take the Gram matrices), for comparison.
fn style_iteration(image: &Tensor) {
    let weights = impasto::model::weights::load(&shared().join("models/vgg16_hed.safetensors")).unwrap();
    let convention = weights.convention.expect("the shared file states its convention");
    let vgg = impasto::model::Vgg::new(
        weights.arch,
        weights.convs,
        convention,
        impasto::model::Pooling::Avg,
        Device::Cpu,
        impasto::device::Precision::F32,
    );
    let layers: Vec<impasto::model::LayerId> =
        ["conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv4_2", "conv5_1"].iter().map(|n| n.parse().unwrap()).collect();
    let (wall, cpu) = fastest(2, || {
        let x = image.copy().set_requires_grad(true);
        let loss = vgg
            .features(&x, &layers)
            .iter()
            .map(|f| f.square().mean(Kind::Float))
            .fold(x.zeros_like().sum(Kind::Float), |a, b| a + b);
        loss.backward();
        let _ = x.grad().sum(Kind::Float).double_value(&[]);
    });
    println!("    one VGG-16 loss+gradient evaluation: {wall:.3} s wall, {cpu:.3} s CPU");
}

#[test]
#[ignore = "prints timings; run with --ignored --nocapture"]
fn flow_speed() {
    let threads: i32 = std::env::var("IMPASTO_BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    tch::set_num_threads(threads);
    println!("libtorch threads: {threads} (set IMPASTO_BENCH_THREADS)");
    let settings = FlowSettings::default();
    let photo = astronaut();
    let cases = [
        ("bikes, 256 wide", bikes_frames(&[100, 101], 256)),
        ("bikes, 512 wide", bikes_frames(&[100, 101], 512)),
        ("astronaut, 512 square", vec![photo.roll([3, -5], [2, 3]), photo]),
    ];
    for (name, frames) in cases {
        let (prev, next) = (&frames[0], &frames[1]);
        let (_, _, height, width) = prev.size4().unwrap();
        let (wall, cpu) = fastest(3, || {
            let _ = flow::flow_backward(prev, next, &settings).unwrap().sum(Kind::Float).double_value(&[]);
        });
        let (pair_wall, pair_cpu) = fastest(3, || {
            let _ = flow::flow_pair(prev, next, &settings).unwrap().reliability().sum(Kind::Float).double_value(&[]);
        });
        println!("{name} ({width}×{height}):");
        println!("    one flow field: {wall:.3} s wall, {cpu:.3} s CPU");
        println!("    forward+backward pair with reliability mask: {pair_wall:.3} s wall, {pair_cpu:.3} s CPU");
        style_iteration(next);
    }
}

#[test]
#[ignore = "prints the scene-cut measures of all 249 frame pairs of bikes.mp4 (a few minutes)"]
fn scene_cut_measures_of_every_frame_pair() {
    single_threaded();
    let frames = bikes_frames(&(0..250).collect::<Vec<_>>(), 256);
    let settings = FlowSettings::default();
    println!("pair  histogram  unreliable  sum  cut");
    for (first, pair) in frames.windows(2).enumerate() {
        let reliable = flow::flow_pair(&pair[0], &pair[1], &settings).unwrap().reliability();
        let change = flow::scene_change(&pair[0], &pair[1], &reliable, &settings.scene_cut);
        let sum = change.histogram_distance + change.unreliable_fraction;
        println!(
            "{first:3}→{:3}  {:.4}  {:.4}  {sum:.3}  {}",
            first + 1,
            change.histogram_distance,
            change.unreliable_fraction,
            change.is_cut
        );
    }
}

#[test]
#[ignore = "prints how far cheaper solver settings stray from the defaults; run with --ignored --nocapture"]
fn cheaper_settings_against_the_defaults() {
    single_threaded();
    let width: u32 = std::env::var("FLOW_WIDTH").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let shots = [(40usize, 52usize), (94, 106), (196, 208)];
    let full = FlowSettings::default();
    let variants: Vec<(String, FlowSettings)> =
        [(5, 20, 8), (4, 20, 8), (3, 20, 8), (2, 20, 8), (5, 10, 8), (3, 10, 8), (3, 20, 16), (3, 15, 12)]
            .into_iter()
            .map(|(warps, iterations, min_level_size)| {
                (
                    format!("{warps}W {iterations}I min{min_level_size}"),
                    FlowSettings { warps, iterations, min_level_size, ..full.clone() },
                )
            })
            .collect();
    let mut known: Vec<(String, Tensor, Tensor, Tensor)> = [1.04, 1.08]
        .into_iter()
        .map(|zoom| {
            let (prev, next, truth) = zoomed_pair(zoom);
            (format!("zoom {zoom}"), prev, next, truth)
        })
        .collect();
    for (dx, dy, factor) in [(3, -5, 2), (-7, 2, 2), (-16, 10, 2)] {
        let (prev, next) = translated_pair(dx, dy, factor);
        let (_, _, height, width) = next.size4().unwrap();
        let truth = constant_flow(dx as f64 / factor as f64, dy as f64 / factor as f64, height, width);
        known.push((format!("shift ({dx}, {dy})/{factor}"), prev, next, truth));
    }
    for (name, settings) in &variants {
        let errors: Vec<String> = known
            .iter()
            .map(|(what, prev, next, truth)| {
                let flow = flow::flow_backward(prev, next, settings).unwrap();
                format!("{what} {:.4}", mean_endpoint_error(&flow, truth, 8))
            })
            .collect();
        println!("{name:>16}: endpoint errors {}", errors.join(", "));
    }
    for (first, last) in shots {
        let indices: Vec<usize> = (first..=last).collect();
        let frames = bikes_frames(&indices, width);
        let reference: Vec<flow::FlowPair> =
            frames.windows(2).map(|w| flow::flow_pair(&w[0], &w[1], &full).unwrap()).collect();
        for (name, settings) in &variants {
            let (mut seconds, mut error, mut epe, mut reliable) = (0.0, 0.0, 0.0, 0.0);
            for (k, pair_frames) in frames.windows(2).enumerate() {
                let (prev, next) = (&pair_frames[0], &pair_frames[1]);
                let started = process_cpu_seconds();
                let pair = flow::flow_pair(prev, next, settings).unwrap();
                let mask = pair.reliability();
                let _ = mask.sum(Kind::Float).double_value(&[]);
                seconds += process_cpu_seconds() - started;
                let truth_mask = reference[k].reliability();
                error += masked_photometric_error(next, &flow::warp(prev, &pair.backward), &truth_mask);
                epe += mean_endpoint_error(&pair.backward, &reference[k].backward, 4);
                reliable += mask.mean(Kind::Float).double_value(&[]);
            }
            let n = (frames.len() - 1) as f64;
            println!(
                "frames {first}..{last} {width} wide, {name:>16}: {:.3} s/pair, error {:.6}, EPE vs default {:.3}, reliable {:.3}",
                seconds / n,
                error / n,
                epe / n,
                reliable / n
            );
        }
    }
}
