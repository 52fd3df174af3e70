//! The precision of float32 matrix products on the CPU, which here are the Gram matrices and their
//! gradients. A bf16 network hands its features over as bf16 values carried in f32, so a product
//! with bf16 inputs and f32 accumulation gives the same Gram matrix as an f32 product (up to the
//! order of the sums). Allowing that lets libtorch hand the products to oneDNN instead of its f32
//! BLAS: on an AMD CPU with AVX-512 BF16 (no AMX) oneDNN keeps them in its own f32 kernels, which
//! are still faster there than the BLAS's, and where AMX is present it may take them in bf16. A bf16
//! iteration at 256² takes 11 % less time on the AMD CPU (BENCHMARKS.md). In the backward pass ∂G
//! may be rounded to bf16 on its way into the features' gradient, which the network's bf16 backward
//! pass rounds anyway.
//!
//! libtorch offers this only as a process-wide switch (the precision of its oneDNN float32 matrix
//! products; `products.cpp` sets it, as tch does not), so each use of a network on the CPU holds the
//! switch in the network's mode ([`hold`]): bf16 products for a bf16 network, IEEE float32 for the
//! others. Holders of one mode run together; a holder of the other mode waits until they are done,
//! and while it waits no new holder of the first mode comes in, so neither mode starves. Outside any
//! hold the products are IEEE float32. A thread must not hold twice at once: its second hold could
//! wait for its first.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use tch::Device;

use super::Precision;

/// The precision of float32 matrix products on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Products {
    /// IEEE float32, libtorch's default.
    Ieee,
    /// bf16 inputs, f32 accumulation and output.
    Bf16,
}

impl Products {
    /// The products a network in `precision` on `device` computes its Gram matrices with; `None` off
    /// the CPU (CUDA has its own TF32 switch).
    pub fn for_network(device: Device, precision: Precision) -> Option<Products> {
        match (device, precision) {
            (Device::Cpu, Precision::Bf16) => Some(Products::Bf16),
            (Device::Cpu, _) => Some(Products::Ieee),
            _ => None,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn other(self) -> Products {
        match self {
            Products::Ieee => Products::Bf16,
            Products::Bf16 => Products::Ieee,
        }
    }
}

/// Who holds the switch and who waits for it.
struct Holders {
    /// How many hold it now.
    count: usize,
    /// The mode they hold it in, or last held it in.
    mode: Products,
    /// How many wait for each mode.
    waiting: [usize; 2],
}

impl Holders {
    /// Whether a new holder of `mode` may come in now.
    fn admit(&self, mode: Products) -> bool {
        let other_waits = self.waiting[mode.other().index()] > 0;
        if self.count > 0 { self.mode == mode && !other_waits } else { !other_waits || self.mode != mode }
    }
}

static HOLDERS: Mutex<Holders> = Mutex::new(Holders { count: 0, mode: Products::Ieee, waiting: [0, 0] });
static TURN: Condvar = Condvar::new();

fn holders() -> MutexGuard<'static, Holders> {
    HOLDERS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The switch held in one mode; dropping it lets the other mode in.
#[must_use = "the products are held in this mode only while this lives"]
pub struct Held(Products);

impl Held {
    /// The mode held.
    pub fn products(&self) -> Products {
        self.0
    }
}

/// Holds the switch in the mode of a network in `precision` on `device` (waiting while the other mode
/// is held); `None` off the CPU.
pub fn hold(device: Device, precision: Precision) -> Option<Held> {
    Products::for_network(device, precision).map(hold_mode)
}

/// Holds the switch in `mode`, waiting while the other mode is held.
pub fn hold_mode(mode: Products) -> Held {
    let mut state = holders();
    state.waiting[mode.index()] += 1;
    while !state.admit(mode) {
        state = TURN.wait(state).unwrap_or_else(PoisonError::into_inner);
    }
    state.waiting[mode.index()] -= 1;
    if state.count == 0 {
        state.mode = mode;
        if mode == Products::Bf16 {
            set(Products::Bf16);
        }
    }
    state.count += 1;
    Held(mode)
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut state = holders();
        state.count -= 1;
        if state.count == 0 {
            if state.mode == Products::Bf16 {
                set(Products::Ieee);
            }
            TURN.notify_all();
        }
    }
}

#[cfg(impasto_cpp_layer)]
unsafe extern "C" {
    fn impasto_set_cpu_products_bf16(bf16: std::ffi::c_int) -> std::ffi::c_int;
    fn impasto_cpu_products_bf16() -> std::ffi::c_int;
}

/// Sets libtorch's switch; where it is missing or refuses, the products stay IEEE float32 (slower,
/// never wrong), said once in the log.
fn set(mode: Products) {
    #[cfg(impasto_cpp_layer)]
    {
        // SAFETY: a plain C function without pointers; the C++ side catches every exception.
        if unsafe { impasto_set_cpu_products_bf16(std::ffi::c_int::from(mode == Products::Bf16)) } == 0 {
            return;
        }
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| tracing::warn!(?mode, "libtorch's CPU matrix-product precision could not be set; f32 products"));
}

/// The mode libtorch's switch is in now; `None` where this build has no switch or libtorch refused.
pub fn current() -> Option<Products> {
    #[cfg(impasto_cpp_layer)]
    {
        // SAFETY: as in `set`.
        match unsafe { impasto_cpu_products_bf16() } {
            0 => Some(Products::Ieee),
            1 => Some(Products::Bf16),
            _ => None,
        }
    }
    #[cfg(not(impasto_cpp_layer))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_network_holds_its_own_mode_on_the_cpu_only() {
        assert_eq!(Products::for_network(Device::Cpu, Precision::Bf16), Some(Products::Bf16));
        assert_eq!(Products::for_network(Device::Cpu, Precision::F32), Some(Products::Ieee));
        assert_eq!(Products::for_network(Device::Cpu, Precision::Tf32), Some(Products::Ieee));
        assert_eq!(Products::for_network(Device::Cuda(0), Precision::Bf16), None);
    }

    #[test]
    fn a_mode_waits_while_the_other_is_held_and_new_holders_wait_behind_it() {
        let mut holders = Holders { count: 1, mode: Products::Bf16, waiting: [0, 0] };
        assert!(holders.admit(Products::Bf16));
        assert!(!holders.admit(Products::Ieee));
        holders.waiting[Products::Ieee.index()] = 1;
        assert!(!holders.admit(Products::Bf16), "a waiting IEEE holder keeps new bf16 holders out");
        holders.count = 0;
        holders.waiting[Products::Bf16.index()] = 1;
        assert!(holders.admit(Products::Ieee), "with both waiting, the mode not held last goes first");
        assert!(!holders.admit(Products::Bf16));
    }

    #[cfg(impasto_cpp_layer)]
    #[test]
    fn a_bf16_hold_sets_the_switch_keeps_bf16_valued_grams_and_lets_go() {
        use tch::{Kind, Tensor};
        tch::manual_seed(7);
        let features = Tensor::randn([64, 4096], (Kind::Float, Device::Cpu)).relu();
        let bf16_valued = features.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        let gram = || bf16_valued.mm(&bf16_valued.tr());
        let ieee = {
            let _held = hold_mode(Products::Ieee);
            assert_eq!(current(), Some(Products::Ieee));
            gram()
        };
        let bf16 = {
            let _held = hold_mode(Products::Bf16);
            assert_eq!(current(), Some(Products::Bf16));
            gram()
        };
        // the same products, summed in another order
        let difference = (&bf16 - &ieee).abs().max().double_value(&[]) / ieee.abs().max().double_value(&[]);
        assert!(difference < 1e-5, "{difference}");
        let _held = hold_mode(Products::Ieee);
        assert_eq!(current(), Some(Products::Ieee), "the switch goes back when the bf16 hold ends");
    }
}
