//! TF32 on CUDA: whether cuDNN convolutions and cuBLAS matrix products on float32 tensors may use the
//! TF32 tensor cores (10-bit mantissa products, f32 accumulation). tch has no switch for this, so a
//! small C++ layer (`tf32.cpp`, compiled against libtorch's headers by the build script) sets it on
//! libtorch's global context. The switch is process-wide: the last network placed on a CUDA device
//! decides it. libtorch's own default (TF32 for convolutions, not for matrix products) is replaced by
//! a definite choice, so that `f32` means IEEE float32 throughout.

use crate::error::{Error, Result};

/// Where TF32 is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tf32 {
    /// cuDNN convolutions.
    pub convolutions: bool,
    /// cuBLAS matrix products (the Gram matrices).
    pub matmuls: bool,
}

#[cfg(impasto_cpp_layer)]
unsafe extern "C" {
    fn impasto_set_tf32(allowed: std::ffi::c_int) -> std::ffi::c_int;
    fn impasto_tf32_allowed() -> std::ffi::c_int;
}

/// Allows or forbids TF32 for both convolutions and matrix products.
pub fn set(allowed: bool) -> Result<()> {
    #[cfg(impasto_cpp_layer)]
    {
        // SAFETY: plain C functions without pointers; the C++ side catches every exception.
        if unsafe { impasto_set_tf32(std::ffi::c_int::from(allowed)) } == 0 {
            return Ok(());
        }
        Err(Error::Torch("libtorch refused to change its TF32 setting".into()))
    }
    #[cfg(not(impasto_cpp_layer))]
    {
        let _ = allowed;
        Err(unsupported())
    }
}

/// What libtorch allows now.
pub fn current() -> Result<Tf32> {
    #[cfg(impasto_cpp_layer)]
    {
        // SAFETY: as in `set`.
        let bits = unsafe { impasto_tf32_allowed() };
        if bits < 0 {
            return Err(Error::Torch("libtorch refused to report its TF32 setting".into()));
        }
        Ok(Tf32 { convolutions: bits & 1 != 0, matmuls: bits & 2 != 0 })
    }
    #[cfg(not(impasto_cpp_layer))]
    {
        Err(unsupported())
    }
}

#[cfg(not(impasto_cpp_layer))]
fn unsupported() -> Error {
    Error::Settings("precision 'tf32': this build has no TF32 switch (libtorch's headers were not found)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The switch is global, so one test sets it both ways and leaves it forbidden.
    #[cfg(impasto_cpp_layer)]
    #[test]
    fn switches_both_ways_without_a_gpu() {
        set(true).unwrap();
        assert_eq!(current().unwrap(), Tf32 { convolutions: true, matmuls: true });
        set(false).unwrap();
        assert_eq!(current().unwrap(), Tf32 { convolutions: false, matmuls: false });
    }
    #[cfg(not(impasto_cpp_layer))]
    #[test]
    fn tf32_is_refused_without_the_switch() {
        assert!(set(true).unwrap_err().to_string().contains("tf32"));
    }
}
