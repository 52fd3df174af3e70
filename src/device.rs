//! Devices and precisions: parsing `cpu`, `cuda:N` and `auto`, loading libtorch's CUDA backend at
//! start so that a GPU is seen at all (the linker drops `libtorch_cuda.so` otherwise), cuDNN
//! autotuning on CUDA devices, and the network precision (f32, TF32 on CUDA, or bf16; the optimised
//! image always stays f32; `auto` picks bf16 where it is the faster). `tf32` holds the TF32 switch,
//! `memory` the device-memory reading, `bf16` the hardware check and CPU measurement behind `auto`,
//! `threads` the per-thread CPU thread count, `heap` the process heap's settings for CPU tensors,
//! `products` the precision of the CPU's f32 matrix products (bf16 inputs for a bf16 network's Grams),
//! `bf16_rows` the CPU's reads of L-BFGS's pairs kept in bf16, `pair_rows` L-BFGS's other passes over
//! whole images on the CPU, fused.

pub mod bf16;
pub mod bf16_rows;
pub mod heap;
pub mod memory;
pub mod pair_rows;
pub mod products;
pub mod tf32;
pub mod threads;

use std::str::FromStr;
use std::sync::Once;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::error::{Error, Result};

/// Where the work runs, as the user asks for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceChoice {
    /// The first CUDA device if there is one, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        let bad = |problem: &str| Error::Device { device: text.to_string(), problem: problem.to_string() };
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            other => {
                let index = other.strip_prefix("cuda:").ok_or_else(|| bad("expected 'auto', 'cpu' or 'cuda:N'"))?;
                index.parse().map(DeviceChoice::Cuda).map_err(|_| bad("expected 'cuda:N' with N a number"))
            }
        }
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = Error;
    fn try_from(text: String) -> Result<Self> {
        text.parse()
    }
}

impl From<DeviceChoice> for String {
    fn from(choice: DeviceChoice) -> String {
        choice.to_string()
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Resolves the choice to a libtorch device, checking that it exists. On a CUDA device cuDNN
    /// autotuning is switched on: the first convolution of each shape tries the algorithms and keeps
    /// the fastest (frames of one video, or one benchmark size, share their shapes).
    pub fn resolve(&self) -> Result<Device> {
        let device = self.find()?;
        if device.is_cuda() {
            tch::Cuda::cudnn_set_benchmark(true);
        }
        Ok(device)
    }

    fn find(&self) -> Result<Device> {
        load_cuda_backend();
        match *self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto => Ok(if tch::Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu }),
            DeviceChoice::Cuda(n) => {
                let count = tch::Cuda::device_count() as usize;
                if n < count {
                    Ok(Device::Cuda(n))
                } else {
                    Err(Error::Device {
                        device: self.to_string(),
                        problem: format!("{count} CUDA device(s) available here"),
                    })
                }
            }
        }
    }
}

/// A short name for a resolved device (`cpu`, `cuda:0`).
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
        Device::Cpu => "cpu".into(),
    }
}

/// The precision the network runs in. The image and the loss sums stay f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats throughout (IEEE products on CUDA too).
    #[default]
    F32,
    /// f32 tensors whose convolutions and matrix products may use TF32 tensor cores on CUDA; plain
    /// f32 elsewhere.
    Tf32,
    /// bfloat16 network weights and activations; f32 image, Gram matrices and losses.
    Bf16,
}

impl Precision {
    /// The libtorch kind of the network's weights and activations.
    pub fn kind(self) -> Kind {
        match self {
            Precision::F32 | Precision::Tf32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }

    /// How the precision runs on `device`: `tf32` is plain f32 off CUDA, and says so.
    pub fn label_on(self, device: Device) -> String {
        match (self, device) {
            (Precision::Tf32, Device::Cuda(_)) | (Precision::F32 | Precision::Bf16, _) => self.to_string(),
            (Precision::Tf32, other) => format!("tf32 (f32 on {})", device_name(other)),
        }
    }
}

/// The precision as the user asks for it: a fixed one, or `auto` — bf16 where it is the faster (a
/// CUDA card of compute capability 8.0 or newer; a CPU with bf16 instructions where a short
/// measurement, made once per machine and thread count, finds it faster than f32), f32 elsewhere.
/// bf16 measured 1.6× and 1.9–2.7× faster per iteration than f32 at equal quality on two CPUs with
/// bf16 instructions, 1.1× (160×90) to 1.5–1.8× (256²) slower on a third, and 27× slower on one without
/// (BENCHMARKS.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum PrecisionChoice {
    /// bf16 where it is the faster, else f32.
    #[default]
    Auto,
    /// This precision wherever it runs.
    Fixed(Precision),
}

impl PrecisionChoice {
    /// The precision the network runs in on `device`.
    pub fn resolve(self, device: Device) -> Precision {
        match self {
            PrecisionChoice::Fixed(precision) => precision,
            PrecisionChoice::Auto => Self::auto_for(bf16::faster_on(device)),
        }
    }

    /// What `auto` means for a device where bf16 is (or is not) the faster precision.
    pub fn auto_for(bf16_faster: bool) -> Precision {
        if bf16_faster { Precision::Bf16 } else { Precision::F32 }
    }
}

impl From<Precision> for PrecisionChoice {
    fn from(precision: Precision) -> Self {
        PrecisionChoice::Fixed(precision)
    }
}

impl FromStr for PrecisionChoice {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        if text.trim().eq_ignore_ascii_case("auto") {
            return Ok(PrecisionChoice::Auto);
        }
        text.parse()
            .map(PrecisionChoice::Fixed)
            .map_err(|_| Error::Settings(format!("precision '{text}': expected 'auto', 'f32', 'tf32' or 'bf16'")))
    }
}

impl TryFrom<String> for PrecisionChoice {
    type Error = Error;
    fn try_from(text: String) -> Result<Self> {
        text.parse()
    }
}

impl From<PrecisionChoice> for String {
    fn from(choice: PrecisionChoice) -> String {
        choice.to_string()
    }
}

impl std::fmt::Display for PrecisionChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrecisionChoice::Auto => f.write_str("auto"),
            PrecisionChoice::Fixed(precision) => precision.fmt(f),
        }
    }
}

/// Sets libtorch's process-wide TF32 switch for a network in `precision` on `device`: allowed for
/// `tf32`, forbidden otherwise (so that f32 is IEEE float32). Nothing to do off CUDA. Only `tf32`
/// fails where the switch is missing; the others then keep libtorch's default.
pub fn apply_precision(device: Device, precision: Precision) -> Result<()> {
    if !device.is_cuda() {
        return Ok(());
    }
    match tf32::set(precision == Precision::Tf32) {
        Err(error) if precision != Precision::Tf32 => {
            tracing::warn!(%error, "libtorch's default TF32 setting stays (TF32 convolutions on CUDA)");
            Ok(())
        }
        result => result,
    }
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(Error::Settings(format!("precision '{text}': expected 'f32', 'tf32' or 'bf16'"))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// Loads `libtorch_cuda.so` once with RTLD_GLOBAL so libtorch registers its CUDA backend.
/// Where the CUDA libraries are missing (a CPU-only install) this quietly leaves the CPU alone.
pub fn load_cuda_backend() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let built_dir = env!("IMPASTO_LIBTORCH_LIB");
        let mut candidates = vec!["libtorch_cuda.so".to_string()];
        if !built_dir.is_empty() {
            candidates.insert(0, format!("{built_dir}/libtorch_cuda.so"));
        }
        for name in candidates {
            let Ok(c_name) = std::ffi::CString::new(name.clone()) else { continue };
            // SAFETY: dlopen with a valid C string; the handle is intentionally never closed.
            let handle = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if !handle.is_null() {
                tracing::debug!(library = %name, "loaded the CUDA backend");
                return;
            }
        }
        tracing::debug!("no CUDA backend loaded (CPU-only libtorch or missing CUDA libraries)");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("cuda:3".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(3));
        let err = "tpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(err.contains("tpu") && err.contains("cuda:N"), "{err}");
    }

    #[test]
    fn tf32_parses_and_says_it_is_f32_off_cuda() {
        let tf32: Precision = "TF32".parse().unwrap();
        assert_eq!(tf32, Precision::Tf32);
        assert_eq!(tf32.kind(), Kind::Float);
        assert_eq!(tf32.label_on(Device::Cpu), "tf32 (f32 on cpu)");
        assert_eq!(tf32.label_on(Device::Cuda(0)), "tf32");
        assert_eq!(Precision::Bf16.label_on(Device::Cpu), "bf16");
        let err = "fp8".parse::<Precision>().unwrap_err().to_string();
        assert!(err.contains("'tf32'"), "{err}");
    }

    #[test]
    fn precision_choice_parses_and_auto_follows_the_hardware() {
        assert_eq!("Auto".parse::<PrecisionChoice>().unwrap(), PrecisionChoice::Auto);
        assert_eq!("bf16".parse::<PrecisionChoice>().unwrap(), PrecisionChoice::Fixed(Precision::Bf16));
        assert_eq!(PrecisionChoice::default(), PrecisionChoice::Auto);
        let err = "fp8".parse::<PrecisionChoice>().unwrap_err().to_string();
        assert!(err.contains("'fp8'") && err.contains("'auto'"), "{err}");
        assert_eq!(PrecisionChoice::auto_for(true), Precision::Bf16);
        assert_eq!(PrecisionChoice::auto_for(false), Precision::F32);
        assert_eq!(PrecisionChoice::Fixed(Precision::Tf32).resolve(Device::Cpu), Precision::Tf32);
        if !bf16::cpu_has_bf16() {
            // with the instructions, the measurement decides (tested through the commands, each
            // with its own cache folder)
            assert_eq!(PrecisionChoice::Auto.resolve(Device::Cpu), Precision::F32);
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if cfg!(target_arch = "x86_64") && !cpuinfo.is_empty() {
            let listed = cpuinfo.split_whitespace().any(|flag| flag == "avx512_bf16");
            assert_eq!(bf16::cpu_has_bf16(), listed, "the kernel's CPU flags and the detection disagree");
        }
        for (choice, text) in [(PrecisionChoice::Auto, "auto"), (Precision::Bf16.into(), "bf16")] {
            assert_eq!(serde_json::to_value(choice).unwrap(), text);
            assert_eq!(serde_json::from_value::<PrecisionChoice>(text.into()).unwrap(), choice);
        }
    }

    #[test]
    fn auto_on_a_cuda_device_that_is_not_there_stays_f32() {
        // each CUDA index answers for itself; one that does not exist (or a build without CUDA) is f32
        let absent = tch::Cuda::device_count() as usize + 3;
        assert!(!bf16::native_on(Device::Cuda(absent)));
        assert_eq!(PrecisionChoice::Auto.resolve(Device::Cuda(absent)), Precision::F32);
    }

    #[test]
    fn missing_cuda_device_is_an_error_naming_it() {
        let count = tch::Cuda::device_count() as usize;
        let err = DeviceChoice::Cuda(count + 7).resolve().unwrap_err().to_string();
        assert!(err.contains(&format!("cuda:{}", count + 7)), "{err}");
    }
}
