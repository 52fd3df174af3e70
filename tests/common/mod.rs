//! Helpers shared by the integration tests: where the shared real material is, and a network built
//! from the real VGG-16 weights.
#![allow(dead_code)]

use std::path::PathBuf;

#[cfg(feature = "service")]
pub mod postgres;

use impasto::device::bf16::{self, CpuMeasurement};
use impasto::device::{DeviceChoice, Precision, PrecisionChoice};
use impasto::model::{self, ModelSettings, Pooling, Vgg};

/// The shared folder of real weights, photos, paintings and clips (`$IMPASTO_SHARED` or `../shared`).
pub fn shared() -> PathBuf {
    let dir = std::env::var_os("IMPASTO_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    assert!(dir.join("models").is_dir(), "shared material not found at {} (set IMPASTO_SHARED)", dir.display());
    dir
}

/// The real VGG-16 weight file.
pub fn vgg16_weights() -> PathBuf {
    shared().join("models/vgg16_hed.safetensors")
}

/// A real photo or painting from the shared media.
pub fn media(relative: &str) -> PathBuf {
    shared().join("media").join(relative)
}

/// Model settings for the real VGG-16 on the CPU in f32. Its normalisation is cached in the cache
/// directory (`target/test-cache` under `scripts/test.sh`).
pub fn vgg16_settings(pooling: Pooling, normalize: bool) -> ModelSettings {
    ModelSettings {
        path: Some(vgg16_weights()),
        convention: None,
        pooling,
        normalize,
        device: DeviceChoice::Cpu,
        precision: Precision::F32.into(),
        layout: model::Layout::ChannelsFirst,
    }
}

/// The real VGG-16, loaded as impasto loads it.
pub fn vgg16(pooling: Pooling, normalize: bool) -> Vgg {
    model::load(&vgg16_settings(pooling, normalize)).expect("shared VGG-16 loads")
}

/// The real VGG-16 with impasto's default model settings on the CPU, except the precision: f32, so no
/// test depends on what `auto` measures on the machine.
pub fn default_vgg16() -> Vgg {
    let settings = ModelSettings {
        path: Some(vgg16_weights()),
        device: DeviceChoice::Cpu,
        precision: Precision::F32.into(),
        ..ModelSettings::default()
    };
    model::load(&settings).expect("shared VGG-16 loads")
}

/// Runs the ffmpeg CLI quietly, overwriting outputs; panics if it fails.
pub fn ffmpeg(args: &[&str]) {
    let status =
        std::process::Command::new("ffmpeg").args(["-v", "error", "-y"]).args(args).status().expect("ffmpeg runs");
    assert!(status.success(), "ffmpeg {args:?} failed");
}

/// ffprobe's JSON description of a file: streams (with counted frames) and format.
pub fn ffprobe(path: &std::path::Path) -> serde_json::Value {
    let output = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-show_streams", "-show_format", "-count_frames", "-of", "json"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(output.status.success(), "ffprobe failed on {}", path.display());
    serde_json::from_slice(&output.stdout).expect("ffprobe prints JSON")
}

/// `dir/truncated.mp4`: the shared bikes.mp4 with its index in front (`+faststart`), cut in the
/// middle of its frame data.
pub fn truncated_bikes(dir: &std::path::Path) -> PathBuf {
    let whole = dir.join("faststart.mp4");
    let source = media("video/bikes.mp4");
    ffmpeg(&["-i", source.to_str().unwrap(), "-c", "copy", "-movflags", "+faststart", whole.to_str().unwrap()]);
    let truncated = dir.join("truncated.mp4");
    let bytes = std::fs::read(&whole).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(&whole).unwrap();
    truncated
}

/// `dir/damaged.mp4`: the shared bikes.mp4 with 2000 bytes in the middle overwritten, so that some
/// frames cannot be decoded.
pub fn damaged_bikes(dir: &std::path::Path) -> PathBuf {
    let damaged = dir.join("damaged.mp4");
    let mut bytes = std::fs::read(media("video/bikes.mp4")).unwrap();
    let middle = bytes.len() / 2;
    for (offset, byte) in bytes[middle..middle + 2000].iter_mut().enumerate() {
        *byte = (offset as u8).wrapping_mul(151).wrapping_add(89);
    }
    std::fs::write(&damaged, &bytes).unwrap();
    damaged
}

/// The `impasto` binary with the real weights, a cache folder named `cache` shared by the tests of
/// one file, and one libtorch thread (far faster for tiny frames on a shared CPU). The cache holds
/// [`F32_IS_FASTER`] as this CPU's bf16 measurement, so `precision = "auto"` is decided the same way
/// in every command, none of them measuring.
pub fn impasto(cache: &str) -> std::process::Command {
    impasto_with_cache(&cache_dir(cache))
}

/// [`impasto`] with the cache folder `cache`, wherever it is.
pub fn impasto_with_cache(cache: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_impasto"));
    in_test_cache(&mut command, cache, F32_IS_FASTER).env("IMPASTO_MODEL", vgg16_weights());
    command
}

/// Runs `command` as the tests run impasto: with the cache folder `cache`, holding `measured` as
/// this CPU's bf16 measurement (so `precision = "auto"` reads it and never measures), one libtorch
/// thread, and no `IMPASTO_LOG` from the caller's shell.
pub fn in_test_cache<'a>(
    command: &'a mut std::process::Command,
    cache: &std::path::Path,
    measured: CpuMeasurement,
) -> &'a mut std::process::Command {
    keep_cpu_measurement(cache, measured);
    command.env("IMPASTO_CACHE_DIR", cache).env("OMP_NUM_THREADS", "1").env_remove("IMPASTO_LOG")
}

/// The cache directory of the commands made with [`impasto`]`(cache)`.
pub fn cache_dir(cache: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(cache)
}

/// A bf16 measurement no CPU makes, in which f32 is the faster.
pub const F32_IS_FASTER: CpuMeasurement = CpuMeasurement { f32_seconds: 1.0, bf16_seconds: 2.0 };

/// A bf16 measurement no CPU makes, in which bf16 is the faster.
pub const BF16_IS_FASTER: CpuMeasurement = CpuMeasurement { f32_seconds: 2.0, bf16_seconds: 1.0 };

/// Keeps `measured` in the cache folder `dir` as this CPU's bf16 measurement for commands run with
/// one libtorch thread (`OMP_NUM_THREADS=1`), as `precision = "auto"` reads it.
pub fn keep_cpu_measurement(dir: &std::path::Path, measured: CpuMeasurement) {
    let path = dir.join("cpu-precision.json");
    let machine = bf16::machine_key(1);
    if bf16::read_measurement(&path, &machine) != Some(measured) {
        bf16::keep_measurement(&path, &machine, measured);
    }
}

/// What `precision = "auto"` becomes on this CPU when `measured` is kept: f32 without bf16
/// instructions (nothing is measured then), else the faster in `measured`.
pub fn auto_precision_with(measured: CpuMeasurement) -> String {
    PrecisionChoice::auto_for(bf16::cpu_has_bf16() && measured.bf16_is_faster()).to_string()
}

/// What a finished command wrote to stderr.
pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The names of the entries of `dir`, hidden ones included, sorted.
pub fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// The presentation timestamps of the video frames, as ffprobe decodes them.
pub fn frame_timestamps(path: &std::path::Path) -> Vec<i64> {
    ffprobe_timestamps(path, "v:0", "frame=pts")
}

/// The presentation timestamps of the sound packets, in file order.
pub fn sound_timestamps(path: &std::path::Path) -> Vec<i64> {
    ffprobe_timestamps(path, "a:0", "packet=pts")
}

/// The timestamps ffprobe lists for `entries` of the stream `selector` picks.
fn ffprobe_timestamps(path: &std::path::Path, selector: &str, entries: &str) -> Vec<i64> {
    let output = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", selector, "-show_entries", entries, "-of", "csv=p=0"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    String::from_utf8_lossy(&output.stdout).lines().filter_map(|l| l.split(',').next()?.trim().parse().ok()).collect()
}
