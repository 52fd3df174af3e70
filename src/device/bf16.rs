//! Whether bfloat16 pays on a device, which is what `precision = "auto"` asks. On CUDA, cuDNN's bf16
//! convolutions (compute capability 8.0 or newer, read from libtorch's CUDA hooks by `bf16.cpp`).
//! On a CPU the bf16 instructions (x86 AVX-512 BF16 or AMX-BF16, ARM's BF16 extension) are needed:
//! without them libtorch converts every bf16 value on the way, 27× slower per iteration than f32 on
//! an AVX2-only CPU. They are not enough: on an AMD EPYC with AVX-512 BF16 bf16 was 1.6× faster, on
//! an Intel Xeon with AMX 1.9–2.7× faster, but on the same Xeon model with AMX hidden by its hypervisor
//! 1.1× slower at 160×90 and 1.5–1.8× slower at 256² (BENCHMARKS.md). So a CPU with the
//! instructions is measured once: a small VGG-like network's forward and backward pass in f32 and in
//! bf16, channels-last as the network runs by default, kept in `cpu-precision.json` in the cache
//! directory under the CPU's name, bf16 flags, thread count and libtorch (the ratio moves with the
//! threads: 1.27 on one, 1.42 on two). Deleting the file measures again.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::model::Layout;

#[cfg(impasto_cpp_layer)]
unsafe extern "C" {
    fn impasto_cuda_bf16_native(index: std::ffi::c_int) -> std::ffi::c_int;
}

/// Whether `device` computes bf16 convolutions in hardware.
pub fn native_on(device: Device) -> bool {
    match device {
        Device::Cpu => cpu_has_bf16(),
        Device::Cuda(index) => cuda_has_bf16(index),
        _ => false,
    }
}

/// Whether bf16 is the faster precision on `device`: CUDA cards that compute it natively, CPUs that
/// have the instructions and measured faster with them.
pub fn faster_on(device: Device) -> bool {
    match device {
        Device::Cpu => cpu_has_bf16() && cpu_bf16_is_faster(),
        other => native_on(other),
    }
}

/// The CPU's bf16 instructions, as the processor reports them.
pub fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // every CPU with AMX-BF16 also has AVX-512 BF16
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("bf16")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// cuDNN's bf16 convolutions on CUDA device `index` (libtorch's own test: cuDNN and compute
/// capability ≥ 8.0), so each card of a mixed node answers for itself. False where the C++ layer
/// was not built, the device does not exist or libtorch would not say.
fn cuda_has_bf16(index: usize) -> bool {
    #[cfg(impasto_cpp_layer)]
    {
        let Ok(index) = std::ffi::c_int::try_from(index) else { return false };
        // SAFETY: a plain C function taking an integer; the C++ side catches every exception.
        unsafe { impasto_cuda_bf16_native(index) == 1 }
    }
    #[cfg(not(impasto_cpp_layer))]
    {
        let _ = index;
        false
    }
}

/// bf16 must take at most this share of f32's time for `auto` to choose it.
const BF16_MARGIN: f64 = 0.9;

/// The probe network's pass on this CPU in each precision.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuMeasurement {
    /// Seconds for one forward and backward pass in f32 (the best of three).
    pub f32_seconds: f64,
    /// The same with bf16 weights and activations, the image in f32.
    pub bf16_seconds: f64,
}

impl CpuMeasurement {
    /// Whether bf16 is clearly the faster, by [`BF16_MARGIN`].
    pub fn bf16_is_faster(&self) -> bool {
        self.bf16_seconds < BF16_MARGIN * self.f32_seconds
    }
}

/// Whether bf16 measured faster than f32 on this CPU with the calling thread's libtorch thread
/// count: measured once per machine, thread count and libtorch (the kept answer is read afterwards)
/// and decided once per process.
pub fn cpu_bf16_is_faster() -> bool {
    static DECIDED: OnceLock<bool> = OnceLock::new();
    *DECIDED.get_or_init(|| {
        let path = crate::model::cache_dir().join("cpu-precision.json");
        kept_or_measured(&path, &machine_key(tch::get_num_threads())).bf16_is_faster()
    })
}

/// The measurement kept for `machine` in the cache file at `path`, or a new one, then kept there.
pub fn kept_or_measured(path: &Path, machine: &str) -> CpuMeasurement {
    if let Some(kept) = read_measurement(path, machine) {
        return kept;
    }
    let measured = measure_cpu();
    tracing::info!(
        f32_seconds = measured.f32_seconds,
        bf16_seconds = measured.bf16_seconds,
        bf16 = measured.bf16_is_faster(),
        "measured bf16 against f32 on this CPU (once per machine and thread count)"
    );
    keep_measurement(path, machine, measured);
    measured
}

/// What the measurement depends on: the CPU's name and model, its bf16 flags, the libtorch thread
/// count `threads`, the libtorch, and the probe's layout (measurements of the channels-first probe
/// before it are not taken for it).
pub fn machine_key(threads: i32) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name).then(|| value.trim().to_string())
        })
    };
    let flags = field("flags").unwrap_or_default();
    let bf16_flags: Vec<&str> =
        flags.split_whitespace().filter(|flag| flag.contains("bf16") || flag.starts_with("amx")).collect();
    let name = [field("vendor_id"), field("model name"), field("cpu family"), field("model")]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" / ");
    format!(
        "{} / {} [{}] / {threads} threads / libtorch {} / channels-last",
        std::env::consts::ARCH,
        name,
        bf16_flags.join(" "),
        env!("IMPASTO_LIBTORCH_LIB")
    )
}

/// The measurement kept for `machine` in the cache file at `path`, if any.
pub fn read_measurement(path: &Path, machine: &str) -> Option<CpuMeasurement> {
    kept_measurements(path).get(machine).copied()
}

/// Every measurement kept in the cache file at `path`, by machine (none when it is missing or damaged).
fn kept_measurements(path: &Path) -> BTreeMap<String, CpuMeasurement> {
    std::fs::read_to_string(path).ok().and_then(|text| serde_json::from_str(&text).ok()).unwrap_or_default()
}

/// Adds `measured` for `machine` to the cache file at `path` (written to a temporary name and
/// renamed); a cache that cannot be written only costs a measurement next time.
pub fn keep_measurement(path: &Path, machine: &str, measured: CpuMeasurement) {
    let mut kept = kept_measurements(path);
    kept.insert(machine.to_string(), measured);
    let text = serde_json::to_string_pretty(&kept).expect("plain numbers");
    crate::fsutil::write_cache_file(path, "the CPU's precision measurement", |temp| {
        std::fs::write(temp, &text).map_err(|e| crate::error::Error::io(temp, e))
    });
}

/// Times the probe network in both precisions, alternating, the best of three after a warm-up each.
pub fn measure_cpu() -> CpuMeasurement {
    let probe = ProbeNetwork::new();
    let time = |kind: Kind| {
        let start = Instant::now();
        // with gradients on whatever the caller set: the daemon loads its networks under no_grad
        tch::with_grad(|| probe.pass(kind));
        start.elapsed().as_secs_f64()
    };
    let (mut f32_seconds, mut bf16_seconds) = (f64::INFINITY, f64::INFINITY);
    for round in 0..4 {
        let (f32_time, bf16_time) = (time(Kind::Float), time(Kind::BFloat16));
        if round > 0 {
            f32_seconds = f32_seconds.min(f32_time);
            bf16_seconds = bf16_seconds.min(bf16_time);
        }
    }
    CpuMeasurement { f32_seconds, bf16_seconds }
}

/// VGG's first eight 3×3 convolutions with max pooling (64 to 512 channels) on a 64² image, in the
/// network's default layout (channels-last): the layer shapes the style losses run through, at a
/// size measured in a few tens of milliseconds.
/// Its weights are fixed (made without the random generator, whose state the program's other users
/// rely on).
struct ProbeNetwork {
    /// Each convolution's weights in f32 and in bf16, and whether a 2×2 max pooling follows it.
    weights: Vec<(Tensor, Tensor, bool)>,
    image: Tensor,
}

impl ProbeNetwork {
    const LAYERS: [(i64, i64, bool); 8] = [
        (64, 3, false),
        (64, 64, true),
        (128, 64, false),
        (128, 128, true),
        (256, 128, false),
        (256, 256, true),
        (512, 256, false),
        (512, 512, false),
    ];
    const SIZE: i64 = 64;

    fn new() -> Self {
        let options = (Kind::Float, Device::Cpu);
        let weights = Self::LAYERS
            .iter()
            .map(|&(outputs, inputs, pool)| {
                let count = outputs * inputs * 9;
                let scale = (2.0 / (inputs * 9) as f64).sqrt();
                let weight = (Tensor::arange(count, options) * 0.7).sin() * scale;
                let weight = Layout::ChannelsLast.apply(&weight.view([outputs, inputs, 3, 3]));
                let in_bf16 = weight.to_kind(Kind::BFloat16);
                (weight, in_bf16, pool)
            })
            .collect();
        let pixels = 3 * Self::SIZE * Self::SIZE;
        let image = ((Tensor::arange(pixels, options) * 0.01).cos() * 0.5 + 0.5).view([1, 3, Self::SIZE, Self::SIZE]);
        ProbeNetwork { weights, image }
    }

    /// One forward and backward pass down to the image, the network in `kind` (f32 or bf16).
    fn pass(&self, kind: Kind) {
        let image = self.image.copy().set_requires_grad(true);
        let mut features = Layout::ChannelsLast.apply(&image.to_kind(kind));
        for (in_f32, in_bf16, pool) in &self.weights {
            let weight = if kind == Kind::BFloat16 { in_bf16 } else { in_f32 };
            features = features.conv2d(weight, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1).relu();
            if *pool {
                features = features.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
            }
        }
        features.to_kind(Kind::Float).square().mean(Kind::Float).backward();
        let _ = image.grad().sum(Kind::Float).double_value(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_measurement_is_kept_per_machine_and_read_back() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("cache").join("cpu-precision.json");
        assert_eq!(read_measurement(&path, "a"), None);
        let slower = CpuMeasurement { f32_seconds: 1.0, bf16_seconds: 1.5 };
        let faster = CpuMeasurement { f32_seconds: 1.0, bf16_seconds: 0.5 };
        keep_measurement(&path, "a", slower);
        keep_measurement(&path, "b", faster);
        assert_eq!(read_measurement(&path, "a"), Some(slower));
        assert_eq!(read_measurement(&path, "b"), Some(faster));
        assert_eq!(read_measurement(&path, "c"), None);
        assert!(!slower.bf16_is_faster() && faster.bf16_is_faster());
        assert!(!CpuMeasurement { f32_seconds: 1.0, bf16_seconds: 0.95 }.bf16_is_faster(), "within the margin");
        std::fs::write(&path, "not json").unwrap();
        assert_eq!(read_measurement(&path, "a"), None, "a damaged cache is measured again");
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn a_kept_measurement_is_read_and_another_thread_count_is_measured() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("cpu-precision.json");
        // no CPU measures exactly these
        let kept = CpuMeasurement { f32_seconds: 3.0, bf16_seconds: 2.0 };
        keep_measurement(&path, &machine_key(3), kept);
        assert_eq!(kept_or_measured(&path, &machine_key(3)), kept);
        let on_one_thread = kept_or_measured(&path, &machine_key(1));
        assert_ne!(on_one_thread, kept, "another thread count is measured for itself");
        assert_eq!(read_measurement(&path, &machine_key(1)), Some(on_one_thread));
        assert_eq!(read_measurement(&path, &machine_key(3)), Some(kept));
    }

    #[test]
    fn the_probe_network_runs_in_both_precisions() {
        let measured = {
            let _no_grad = tch::no_grad_guard(); // as `impasto serve` loads its networks
            measure_cpu()
        };
        assert!(measured.f32_seconds.is_finite() && measured.f32_seconds > 0.0, "{measured:?}");
        assert!(measured.bf16_seconds.is_finite() && measured.bf16_seconds > 0.0, "{measured:?}");
        let key = machine_key(2);
        assert!(key.starts_with(std::env::consts::ARCH) && key.contains(" 2 threads / libtorch"), "{key}");
    }
}
