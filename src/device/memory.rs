//! Device memory on a CUDA device, for benchmarks, two ways. [`allocator_peaks_mib`]: the peaks of
//! libtorch's caching allocator (the most the tensors held, and the most it reserved from the
//! driver), read through a small C++ layer (`allocator.cpp`) because tch does not expose them, and
//! [`reset_allocator_peaks`] to start them again. [`in_use_mib`]: what the CUDA runtime that libtorch
//! loaded (`cudaMemGetInfo`, opened with `dlopen`) reports as total − free, which includes the
//! caching allocator's reserve and the CUDA context itself, so it bounds the peak from above.
//! Anything missing (no CUDA runtime, no device, a failing call) gives `None`.

use std::ffi::{CString, c_int, c_void};
use std::sync::OnceLock;

use tch::Device;

/// `cudaError_t cudaMemGetInfo(size_t* free, size_t* total)`.
type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
/// `cudaError_t cudaGetDevice(int* device)`.
type GetDevice = unsafe extern "C" fn(*mut c_int) -> c_int;
/// `cudaError_t cudaSetDevice(int device)`.
type SetDevice = unsafe extern "C" fn(c_int) -> c_int;

/// Sonames of the CUDA runtime, newest first; the one libtorch already loaded is found by its soname.
const RUNTIME_NAMES: [&str; 3] = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"];

/// `cudaSuccess`.
const CUDA_SUCCESS: c_int = 0;

/// The three runtime entry points this module calls.
struct Runtime {
    mem_get_info: MemGetInfo,
    get_device: GetDevice,
    set_device: SetDevice,
}

/// MiB of memory in use on `device` (total − free, for every process on it); `None` off CUDA or when
/// the runtime cannot tell.
pub fn in_use_mib(device: Device) -> Option<f64> {
    let Device::Cuda(index) = device else { return None };
    let runtime = runtime()?;
    let index = c_int::try_from(index).ok()?;
    let (free, total) = runtime.mem_info_on(index)?;
    Some(total.saturating_sub(free) as f64 / (1024.0 * 1024.0))
}

/// The caching allocator's peaks on `device` since the process started or the last
/// [`reset_allocator_peaks`], MiB: (allocated by tensors, reserved from the driver). `None` off CUDA,
/// before the allocator has started, or in a build without the C++ layer.
pub fn allocator_peaks_mib(device: Device) -> Option<(f64, f64)> {
    let Device::Cuda(index) = device else { return None };
    let index = c_int::try_from(index).ok()?;
    allocator::peaks(index).map(|(allocated, reserved)| (mib(allocated), mib(reserved)))
}

/// Starts the caching allocator's peaks on `device` again from what is held now; false when there is
/// nothing to reset (see [`allocator_peaks_mib`]).
pub fn reset_allocator_peaks(device: Device) -> bool {
    let Device::Cuda(index) = device else { return false };
    c_int::try_from(index).is_ok_and(allocator::reset_peaks)
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(impasto_cpp_layer)]
mod allocator {
    use std::ffi::c_int;

    unsafe extern "C" {
        fn impasto_cuda_allocator_peaks(device: c_int, allocated: *mut i64, reserved: *mut i64) -> c_int;
        fn impasto_cuda_allocator_reset_peaks(device: c_int) -> c_int;
    }

    pub fn peaks(device: c_int) -> Option<(i64, i64)> {
        let (mut allocated, mut reserved) = (0i64, 0i64);
        // SAFETY: valid out-pointers; the C++ side catches every exception.
        let status = unsafe { impasto_cuda_allocator_peaks(device, &mut allocated, &mut reserved) };
        (status == 0).then_some((allocated, reserved))
    }

    pub fn reset_peaks(device: c_int) -> bool {
        // SAFETY: a plain C function; the C++ side catches every exception.
        unsafe { impasto_cuda_allocator_reset_peaks(device) == 0 }
    }
}

#[cfg(not(impasto_cpp_layer))]
mod allocator {
    use std::ffi::c_int;

    pub fn peaks(_device: c_int) -> Option<(i64, i64)> {
        None
    }

    pub fn reset_peaks(_device: c_int) -> bool {
        false
    }
}

impl Runtime {
    /// (free, total) bytes on device `index`, leaving the calling thread's current device as it was.
    fn mem_info_on(&self, index: c_int) -> Option<(usize, usize)> {
        let mut current: c_int = 0;
        // SAFETY: the runtime's documented C signatures, with valid out-pointers.
        unsafe {
            if (self.get_device)(&mut current) != CUDA_SUCCESS {
                return None;
            }
            if current != index && (self.set_device)(index) != CUDA_SUCCESS {
                return None;
            }
            let (mut free, mut total) = (0usize, 0usize);
            let status = (self.mem_get_info)(&mut free, &mut total);
            if current != index {
                (self.set_device)(current);
            }
            (status == CUDA_SUCCESS).then_some((free, total))
        }
    }
}

/// The CUDA runtime, opened once.
fn runtime() -> Option<&'static Runtime> {
    static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();
    RUNTIME.get_or_init(open_runtime).as_ref()
}

fn open_runtime() -> Option<Runtime> {
    let handle = RUNTIME_NAMES.iter().find_map(|name| open_library(name))?;
    // SAFETY: each symbol is the runtime's function of the matching C signature.
    unsafe {
        Some(Runtime {
            mem_get_info: std::mem::transmute::<*mut c_void, MemGetInfo>(symbol(handle, "cudaMemGetInfo")?),
            get_device: std::mem::transmute::<*mut c_void, GetDevice>(symbol(handle, "cudaGetDevice")?),
            set_device: std::mem::transmute::<*mut c_void, SetDevice>(symbol(handle, "cudaSetDevice")?),
        })
    }
}

/// A handle on the library, never closed.
fn open_library(name: &str) -> Option<*mut c_void> {
    let name = CString::new(name).ok()?;
    // SAFETY: dlopen with a valid C string.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    (!handle.is_null()).then_some(handle)
}

fn symbol(handle: *mut c_void, name: &str) -> Option<*mut c_void> {
    let name = CString::new(name).ok()?;
    // SAFETY: a live handle from dlopen and a valid C string.
    let address = unsafe { libc::dlsym(handle, name.as_ptr()) };
    (!address.is_null()).then_some(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_off_cuda() {
        assert_eq!(in_use_mib(Device::Cpu), None);
        assert_eq!(allocator_peaks_mib(Device::Cpu), None);
        assert!(!reset_allocator_peaks(Device::Cpu));
    }

    #[test]
    fn allocator_peaks_follow_a_tensor_on_cuda_and_are_unknown_without_it() {
        crate::device::load_cuda_backend();
        if !tch::Cuda::is_available() {
            // the CUDA allocator is absent or never started: asking must not fail or crash
            assert_eq!(allocator_peaks_mib(Device::Cuda(0)), None);
            assert!(!reset_allocator_peaks(Device::Cuda(0)));
            return;
        }
        let tensor = tch::Tensor::zeros([64, 1024, 1024], (tch::Kind::Float, Device::Cuda(0))); // 256 MiB
        let (allocated, reserved) = allocator_peaks_mib(Device::Cuda(0)).expect("peaks on a CUDA device");
        assert!(allocated >= 256.0 && reserved >= allocated, "{allocated} {reserved}");
        drop(tensor);
        assert!(reset_allocator_peaks(Device::Cuda(0)));
        let (after, _) = allocator_peaks_mib(Device::Cuda(0)).unwrap();
        assert!(after < 256.0, "{after}");
    }

    #[test]
    fn a_sane_value_or_none_on_cuda_device_zero() {
        crate::device::load_cuda_backend();
        match in_use_mib(Device::Cuda(0)) {
            None => assert!(!tch::Cuda::is_available(), "a CUDA device is here but its memory was not read"),
            Some(mib) => assert!(mib.is_finite() && mib > 0.0, "{mib}"),
        }
    }
}
