//! Seeded random tensors whose values depend on the seed alone. libtorch's generator is one for the
//! whole process: `manual_seed` followed by `randn` gives other values whenever another thread draws
//! in between, as tests running side by side do. These draws come from a counter-based generator
//! (SplitMix64) of their own, so a random network or a test's noise is the same on every run.

use tch::{Device, Kind, Tensor};

/// SplitMix64's output for counter `index` of stream `seed`.
fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0xD1B5_4A32_D192_ED03)
        .wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Normal draws take their uniforms from a stream apart from [`uniform`]'s of the same seed.
const NORMAL_STREAM: u64 = 0x6A09_E667_F3BC_C909;

/// A value in (0, 1) from the top 52 bits of draw `index` (exact: neither end is reached).
fn open_unit(seed: u64, index: u64) -> f64 {
    ((mix(seed, index) >> 12) as f64 + 0.5) * (-52f64).exp2()
}

/// The same in f32, from the top 23 bits (exact in f32: 1 − 2⁻²⁴ at most, 2⁻²⁴ at least).
fn open_unit_f32(seed: u64, index: u64) -> f32 {
    ((mix(seed, index) >> 41) as f32 + 0.5) * (-23f32).exp2()
}

/// How many values a tensor of `shape` holds.
fn element_count(shape: &[i64]) -> u64 {
    assert!(shape.iter().all(|&size| size >= 0), "a shape of sizes ≥ 0, not {shape:?}");
    shape.iter().map(|&size| size as u64).product()
}

/// Uniform values in (0, 1), f32, on the CPU.
pub fn uniform(shape: &[i64], seed: u64) -> Tensor {
    let values: Vec<f32> = (0..element_count(shape)).map(|index| open_unit_f32(seed, index)).collect();
    Tensor::from_slice(&values).reshape(shape)
}

/// Standard normal values (Box–Muller, in f64), f32, on the CPU.
pub fn normal(shape: &[i64], seed: u64) -> Tensor {
    let stream = seed ^ NORMAL_STREAM;
    let values: Vec<f32> = (0..element_count(shape))
        .map(|index| {
            let (radius, angle) = (open_unit(stream, 2 * index), open_unit(stream, 2 * index + 1));
            ((-2.0 * radius.ln()).sqrt() * (std::f64::consts::TAU * angle).cos()) as f32
        })
        .collect();
    Tensor::from_slice(&values).reshape(shape)
}

/// A sequence of seeded draws: each call draws from a stream of its own, given by the seed and how
/// many draws came before it, so a test's values do not depend on other threads or on tensor sizes.
pub struct Draws {
    seed: u64,
    drawn: u64,
}

impl Draws {
    /// A sequence whose draws all follow from `seed`.
    pub fn new(seed: u64) -> Draws {
        Draws { seed, drawn: 0 }
    }

    /// The seed of the next draw.
    fn next_seed(&mut self) -> u64 {
        self.drawn += 1;
        mix(self.seed, self.drawn - 1)
    }

    /// [`uniform`] values, made in f32, then in `kind` on `device`.
    pub fn uniform(&mut self, shape: &[i64], (kind, device): (Kind, Device)) -> Tensor {
        uniform(shape, self.next_seed()).to_kind(kind).to_device(device)
    }

    /// [`normal`] values, made in f32, then in `kind` on `device`.
    pub fn normal(&mut self, shape: &[i64], (kind, device): (Kind, Device)) -> Tensor {
        normal(shape, self.next_seed()).to_kind(kind).to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_values_and_another_seed_others() {
        assert!(normal(&[3, 4], 1).equal(&normal(&[3, 4], 1)));
        assert!(!normal(&[3, 4], 1).equal(&normal(&[3, 4], 2)));
        assert!(!uniform(&[3, 4], 1).equal(&uniform(&[3, 4], 2)));
    }

    #[test]
    fn each_draw_of_a_sequence_differs_and_the_sequence_repeats() {
        let options = (Kind::Float, Device::Cpu);
        let mut draws = Draws::new(5);
        let (first, second) = (draws.normal(&[8], options), draws.normal(&[8], options));
        assert!(!first.equal(&second));
        let mut again = Draws::new(5);
        assert!(again.normal(&[8], options).equal(&first));
        assert!(again.normal(&[8], options).equal(&second));
    }

    #[test]
    fn normal_draws_have_zero_mean_and_unit_spread() {
        let draws = normal(&[200_000], 7);
        let (mean, std) = (draws.mean(Kind::Double).double_value(&[]), draws.std(true).double_value(&[]));
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((std - 1.0).abs() < 0.01, "{std}");
    }

    #[test]
    fn uniform_draws_stay_inside_the_unit_interval_and_fill_it() {
        let draws = uniform(&[100_000], 3);
        let (low, high) = (draws.min().double_value(&[]), draws.max().double_value(&[]));
        assert!(low > 0.0 && high < 1.0, "{low} {high}");
        assert!(low < 0.001 && high > 0.999, "{low} {high}");
        let mean = draws.mean(Kind::Double).double_value(&[]);
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }
}
