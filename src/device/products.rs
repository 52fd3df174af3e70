//! The precision of float32 matrix products on the CPU. The ones that matter here are a network's
//! Gram matrices and their gradients; libtorch's fallback convolution (im2col and a matrix product,
//! which it takes for some small f32 layers) follows the same switch. A bf16 network hands its
//! features over as bf16 values carried in f32, so a product with bf16 inputs and f32 accumulation
//! gives the same Gram matrix as an f32 product (up to the order of the sums). Allowing that lets
//! libtorch hand the products to oneDNN instead of its f32 BLAS. On an AMD CPU with AVX-512 BF16
//! (no AMX), oneDNN keeps them in its own f32 kernels, which are still faster there than the
//! BLAS's; where AMX is present it may take them in bf16. A bf16 iteration at 256² takes 11 % less
//! time on the AMD CPU (BENCHMARKS.md). Where oneDNN does round, two inputs are not bf16 values
//! already: ∂G in the backward pass (the network's bf16 backward pass rounds the gradient anyway)
//! and the feathered features of tiled Grams (features times blending weights).
//!
//! libtorch offers this only as a process-wide switch (the precision of its oneDNN float32 matrix
//! products; `products.cpp` sets it, as tch does not). So each use of a network on the CPU holds
//! the switch in the network's mode ([`hold`]): bf16 products for a bf16 network on a CPU with
//! bf16 instructions, IEEE float32 for the others. Every forward pass holds it
//! (`Vgg::features`), and so do a whole evaluation (forward, loss, backward) and the Gram matrices
//! taken of features. Holders of one mode run together; a holder of the other mode waits until they
//! are done. While it waits, only the holders of the first mode that were already waiting when
//! their turn began still come in, so neither mode starves. Outside any hold the products are IEEE
//! float32. A thread may hold again while it holds, in the same mode (the inner hold changes
//! nothing); a nested hold in the other mode is a bug and panics.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use tch::Device;

use super::Precision;

/// The precision of float32 matrix products on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Products {
    /// IEEE float32, libtorch's default.
    Ieee,
    /// bf16 inputs allowed, f32 accumulation and output.
    Bf16,
}

impl Products {
    /// The products a network in `precision` on `device` computes with: bf16 for a bf16 network on
    /// a CPU with bf16 instructions (elsewhere oneDNN would emulate them), IEEE for the other CPU
    /// networks; `None` off the CPU (CUDA has its own TF32 switch).
    pub fn for_network(device: Device, precision: Precision) -> Option<Products> {
        match (device, precision) {
            (Device::Cpu, Precision::Bf16) if super::bf16::cpu_has_bf16() => Some(Products::Bf16),
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
#[derive(Debug)]
struct Holders {
    /// How many hold it now.
    count: usize,
    /// The mode they hold it in, or last held it in.
    mode: Products,
    /// How many wait for each mode.
    waiting: [usize; 2],
    /// Holders of `mode` that were waiting when the turn began and have not come in yet: they may
    /// still come in while the other mode waits.
    group: usize,
}

impl Holders {
    const fn new() -> Self {
        Holders { count: 0, mode: Products::Ieee, waiting: [0, 0], group: 0 }
    }

    /// Whether a waiting holder of `mode` may come in now.
    fn admit(&self, mode: Products) -> bool {
        let other_waits = self.waiting[mode.other().index()] > 0;
        if self.count > 0 {
            self.mode == mode && (!other_waits || self.group > 0)
        } else {
            !other_waits || self.mode != mode
        }
    }

    /// A waiting holder of `mode` comes in; true when it begins a turn.
    fn enter(&mut self, mode: Products) -> bool {
        self.waiting[mode.index()] -= 1;
        let begins = self.count == 0;
        if begins {
            self.mode = mode;
            self.group = self.waiting[mode.index()];
        } else {
            self.group = self.group.saturating_sub(1);
        }
        self.count += 1;
        begins
    }

    /// A holder leaves; true when it ends the turn.
    fn leave(&mut self) -> bool {
        self.count -= 1;
        self.count == 0
    }
}

/// The switch's holders, and what sets the switch.
struct ModeLock {
    holders: Mutex<Holders>,
    turn: Condvar,
    set: fn(Products),
}

impl ModeLock {
    const fn new(set: fn(Products)) -> Self {
        ModeLock { holders: Mutex::new(Holders::new()), turn: Condvar::new(), set }
    }

    fn holders(&self) -> MutexGuard<'_, Holders> {
        self.holders.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for `mode`'s turn and comes in; the holder that begins a turn sets the switch (so a
    /// switch left wrong by a failed reset is set right again).
    fn acquire(&self, mode: Products) {
        let mut holders = self.holders();
        holders.waiting[mode.index()] += 1;
        while !holders.admit(mode) {
            holders = self.turn.wait(holders).unwrap_or_else(PoisonError::into_inner);
        }
        if holders.enter(mode) {
            (self.set)(mode);
        }
    }

    /// Leaves; the last holder of a turn sets the switch back to IEEE and lets the waiters try.
    fn release(&self) {
        let mut holders = self.holders();
        if holders.leave() {
            (self.set)(Products::Ieee);
            self.turn.notify_all();
        }
    }
}

static SWITCH: ModeLock = ModeLock::new(set);

thread_local! {
    /// The mode this thread holds the switch in, and how deep.
    static HELD_HERE: Cell<Option<(Products, usize)>> = const { Cell::new(None) };
}

/// The switch held by this thread in one mode; dropping the outermost one lets the other mode in.
#[must_use = "the products are held in this mode only while this lives"]
pub struct ProductsHold {
    /// Held per thread (the depth is the thread's own).
    _this_thread: PhantomData<*const ()>,
}

/// Holds the switch in the mode of a network in `precision` on `device` (waiting while the other
/// mode is held); `None` off the CPU, or where this build has no switch.
#[must_use = "the products are held only while the returned hold lives"]
pub fn hold(device: Device, precision: Precision) -> Option<ProductsHold> {
    if !cfg!(impasto_cpp_layer) {
        return None;
    }
    Products::for_network(device, precision).map(hold_mode)
}

/// Holds IEEE float32 products on the CPU for work that needs them whatever network runs beside it
/// (the optimiser's dot products); `None` off the CPU, or where this build has no switch.
#[must_use = "the products are held only while the returned hold lives"]
pub fn hold_ieee(device: Device) -> Option<ProductsHold> {
    (cfg!(impasto_cpp_layer) && device == Device::Cpu).then(|| hold_mode(Products::Ieee))
}

/// Holds the switch in `mode`, waiting while the other mode is held; within a hold of the same mode
/// on this thread, only counts.
///
/// # Panics
/// When this thread holds the switch in the other mode.
#[must_use = "the products are held only while the returned hold lives"]
pub fn hold_mode(mode: Products) -> ProductsHold {
    match HELD_HERE.get() {
        Some((held, depth)) => {
            assert_eq!(held, mode, "a hold of the CPU products inside a hold of the other mode");
            HELD_HERE.set(Some((held, depth + 1)));
        }
        None => {
            SWITCH.acquire(mode);
            HELD_HERE.set(Some((mode, 1)));
        }
    }
    ProductsHold { _this_thread: PhantomData }
}

impl Drop for ProductsHold {
    fn drop(&mut self) {
        match HELD_HERE.get() {
            Some((held, depth)) if depth > 1 => HELD_HERE.set(Some((held, depth - 1))),
            _ => {
                HELD_HERE.set(None);
                SWITCH.release();
            }
        }
    }
}

#[cfg(impasto_cpp_layer)]
unsafe extern "C" {
    fn impasto_set_cpu_products_bf16(bf16: std::ffi::c_int) -> std::ffi::c_int;
    fn impasto_cpu_products_bf16() -> std::ffi::c_int;
}

/// Sets libtorch's switch. A refusal is logged once: bf16 refused leaves IEEE products (slower,
/// never wrong); IEEE refused may leave bf16 ones until the next turn begins.
fn set(mode: Products) {
    #[cfg(impasto_cpp_layer)]
    {
        // SAFETY: a plain C function without pointers; the C++ side catches every exception.
        if unsafe { impasto_set_cpu_products_bf16(std::ffi::c_int::from(mode == Products::Bf16)) } == 0 {
            return;
        }
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| tracing::error!(?mode, "libtorch refused to set the precision of its CPU matrix products"));
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
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn each_network_holds_its_own_mode_on_the_cpu_only() {
        let bf16 = if crate::device::bf16::cpu_has_bf16() { Products::Bf16 } else { Products::Ieee };
        assert_eq!(Products::for_network(Device::Cpu, Precision::Bf16), Some(bf16));
        assert_eq!(Products::for_network(Device::Cpu, Precision::F32), Some(Products::Ieee));
        assert_eq!(Products::for_network(Device::Cpu, Precision::Tf32), Some(Products::Ieee));
        assert_eq!(Products::for_network(Device::Cuda(0), Precision::Bf16), None);
    }

    #[test]
    fn the_optimiser_holds_ieee_products_on_the_cpu_only() {
        assert!(hold_ieee(Device::Cuda(0)).is_none());
        assert_eq!(hold_ieee(Device::Cpu).is_some(), cfg!(impasto_cpp_layer));
    }

    #[test]
    #[cfg(impasto_cpp_layer)]
    fn the_optimisers_hold_is_a_real_ieee_hold() {
        let held = hold_ieee(Device::Cpu);
        assert_eq!(HELD_HERE.get(), Some((Products::Ieee, 1)));
        drop(held);
        assert_eq!(HELD_HERE.get(), None);
    }

    #[test]
    fn a_mode_waits_while_the_other_is_held_and_late_holders_wait_behind_it() {
        let mut holders = Holders { count: 1, mode: Products::Bf16, waiting: [0, 0], group: 0 };
        assert!(holders.admit(Products::Bf16));
        assert!(!holders.admit(Products::Ieee));
        holders.waiting[Products::Ieee.index()] = 1;
        assert!(!holders.admit(Products::Bf16), "a waiting IEEE holder keeps late bf16 holders out");
        holders.group = 1;
        assert!(holders.admit(Products::Bf16), "but not those that waited when the turn began");
        holders.count = 0;
        holders.waiting[Products::Bf16.index()] = 1;
        assert!(holders.admit(Products::Ieee), "with both waiting, the mode not held last goes first");
        assert!(!holders.admit(Products::Bf16));
    }

    /// What the lock of the threaded test set the switch to, in order.
    static SET: Mutex<Vec<Products>> = Mutex::new(Vec::new());

    fn record(mode: Products) {
        SET.lock().unwrap().push(mode);
    }

    /// Waits until the lock's holders satisfy `ready` (other threads are on their way there).
    fn until(lock: &ModeLock, ready: impl Fn(&Holders) -> bool) {
        while !ready(&lock.holders()) {
            std::thread::yield_now();
        }
    }

    #[test]
    fn the_waiting_group_comes_in_together_and_the_other_mode_after_it() {
        static LOCK: ModeLock = ModeLock::new(record);
        let (entered, arrivals) = mpsc::channel();
        LOCK.acquire(Products::Ieee);
        let (bf16_leave, bf16_wait) = (0..2).map(|_| mpsc::channel::<()>()).unzip::<_, _, Vec<_>, Vec<_>>();
        let threads: Vec<_> = bf16_wait
            .into_iter()
            .map(|leave| {
                let entered = entered.clone();
                std::thread::spawn(move || {
                    LOCK.acquire(Products::Bf16);
                    entered.send(Products::Bf16).unwrap();
                    leave.recv().unwrap();
                    LOCK.release();
                })
            })
            .collect();
        until(&LOCK, |h| h.waiting[Products::Bf16.index()] == 2);
        let late_ieee = std::thread::spawn(move || {
            LOCK.acquire(Products::Ieee);
            entered.send(Products::Ieee).unwrap();
            LOCK.release();
        });
        until(&LOCK, |h| h.waiting[Products::Ieee.index()] == 1);
        assert!(arrivals.try_recv().is_err(), "nobody came in while IEEE was held");
        LOCK.release();
        // both bf16 holders come in although an IEEE holder waits; it comes in only after them
        let wait = Duration::from_secs(120);
        let first_two = [arrivals.recv_timeout(wait).unwrap(), arrivals.recv_timeout(wait).unwrap()];
        assert_eq!(first_two, [Products::Bf16, Products::Bf16]);
        assert!(arrivals.try_recv().is_err(), "the IEEE holder waits for the bf16 turn to end");
        bf16_leave.iter().for_each(|leave| leave.send(()).unwrap());
        assert_eq!(arrivals.recv_timeout(wait).unwrap(), Products::Ieee);
        threads.into_iter().chain([late_ieee]).for_each(|thread| thread.join().unwrap());
        use Products::{Bf16, Ieee};
        assert_eq!(*SET.lock().unwrap(), [Ieee, Ieee, Bf16, Ieee, Ieee, Ieee], "set at each turn's start and end");
    }

    #[test]
    fn a_thread_holds_again_in_its_mode_without_waiting() {
        let outer = hold_mode(Products::Ieee);
        let inner = hold_mode(Products::Ieee);
        drop(inner);
        assert_eq!(HELD_HERE.get(), Some((Products::Ieee, 1)));
        drop(outer);
        assert_eq!(HELD_HERE.get(), None);
    }

    #[test]
    fn a_nested_hold_of_the_other_mode_panics() {
        let _outer = hold_mode(Products::Ieee);
        let nested = std::panic::catch_unwind(|| drop(hold_mode(Products::Bf16)));
        assert!(nested.is_err());
    }

    #[cfg(impasto_cpp_layer)]
    #[test]
    fn a_bf16_hold_sets_the_switch_keeps_bf16_valued_grams_and_lets_go() {
        use tch::Kind;
        let features = crate::seeded::normal(&[64, 4096], 7).relu();
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
