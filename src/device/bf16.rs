//! Whether a device runs bfloat16 natively, which is what `precision = "auto"` asks: on x86 CPUs the
//! AVX-512 BF16 (or AMX-BF16) instructions, on ARM the BF16 extension, on CUDA cuDNN's bf16
//! convolutions (compute capability 8.0 or newer, read from libtorch's CUDA hooks by `bf16.cpp`).
//! Without them libtorch converts every bf16 value on the way, which is far slower than f32 (27× per
//! iteration measured on an AVX2-only CPU), so auto stays f32 there.

use tch::Device;

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
