//! Rows stored in bf16 read against f32 vectors on the CPU, for L-BFGS's curvature pairs kept in
//! half the bytes (`lbfgs_pairs = "bf16"`). Reading the pairs is bound by memory bandwidth, and
//! libtorch offers no fitting product: its bf16 matrix-vector product rounds the result to bf16, and
//! widening a chunk to f32 first writes and reads it again. So a small C++ kernel (`bf16_rows.cpp`,
//! built apart from the rest of the C++ layer, with OpenMP) widens the rows as they stream past,
//! eight at a time, on the OpenMP threads libtorch's own kernels run on: the dot products of the
//! rows with a vector (summed in f32 lanes per block of 32,768 columns and in f64 across blocks, in
//! a fixed order), and a vector plus a combination of the rows. The build script leaves the kernels
//! out where libtorch ships no GNU OpenMP runtime of its own or the compiler refuses them: then
//! [`available`] is false, `lbfgs_pairs = "auto"` keeps the pairs in f32, and asked-for bf16 pairs
//! are widened chunk by chunk.

use tch::{Device, Kind, Tensor};

#[cfg(impasto_row_kernels)]
unsafe extern "C" {
    fn impasto_bf16_rows_times_vector(
        rows: *const u16,
        row_count: i64,
        width: i64,
        vector: *const f32,
        products: *mut f64,
    ) -> std::ffi::c_int;
    fn impasto_add_bf16_rows(
        sum: *mut f32,
        coefficients: *const f32,
        rows: *const u16,
        row_count: i64,
        width: i64,
    ) -> std::ffi::c_int;
}

/// Whether this build reads bf16 rows on the CPU without widening them first.
pub const fn available() -> bool {
    cfg!(impasto_row_kernels)
}

/// Whether bf16 rows are read here against vectors like `vector`: f32 on the CPU, in a build that
/// has the kernel.
pub fn read_against(vector: &Tensor) -> bool {
    available() && vector.device() == Device::Cpu && vector.kind() == Kind::Float
}

/// Checks that `rows` is a `[R, n]` bf16 matrix and `vector` an `[n]` f32 one on the CPU.
fn check(rows: &Tensor, vector: &Tensor) {
    assert_eq!((rows.kind(), vector.kind()), (Kind::BFloat16, Kind::Float), "bf16 rows against an f32 vector");
    assert_eq!((rows.device(), vector.device()), (Device::Cpu, Device::Cpu), "bf16 rows are read on the CPU");
    assert_eq!(rows.dim(), 2, "rows [R, n]");
    assert_eq!(vector.size(), [rows.size()[1]], "a vector as long as the rows");
}

/// The dot product of each row of `rows` (`[R, n]` bf16) with `vector` (`[n]` f32): `[R]` f64.
pub fn times_vector(rows: &Tensor, vector: &Tensor) -> Tensor {
    check(rows, vector);
    let (rows, vector) = (rows.contiguous(), vector.contiguous());
    #[cfg(impasto_row_kernels)]
    {
        let products = Tensor::zeros([rows.size()[0]], (Kind::Double, Device::Cpu));
        let [row_count, width] = [rows.size()[0], rows.size()[1]];
        // SAFETY: both inputs are contiguous CPU tensors of the checked kinds and shapes, alive for
        // the call, and `products` is a fresh contiguous [R] f64 tensor; the C++ side writes only
        // products[0..R) and catches every exception.
        let status = unsafe {
            impasto_bf16_rows_times_vector(
                rows.data_ptr() as *const u16,
                row_count,
                width,
                vector.data_ptr() as *const f32,
                products.data_ptr() as *mut f64,
            )
        };
        assert_eq!(status, 0, "no memory for the partial sums of bf16 rows");
        products
    }
    #[cfg(not(impasto_row_kernels))]
    {
        rows.to_kind(Kind::Double).mv(&vector.to_kind(Kind::Double))
    }
}

/// `sum` (`[n]` f32, contiguous) += Σᵣ `coefficients`ᵣ · row r of `rows` (`[R, n]` bf16), in place;
/// rows whose coefficient is zero are skipped.
pub fn add_combination(sum: &mut Tensor, coefficients: &Tensor, rows: &Tensor) {
    check(rows, sum);
    assert!(sum.is_contiguous(), "the sum is written in place, so it must be contiguous");
    assert_eq!(coefficients.size(), [rows.size()[0]], "a coefficient per row");
    let coefficients = coefficients.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let rows = rows.contiguous();
    #[cfg(impasto_row_kernels)]
    {
        let [row_count, width] = [rows.size()[0], rows.size()[1]];
        // SAFETY: `sum` is a contiguous [n] f32 CPU tensor that this call alone writes (borrowed
        // mutably), the rows and coefficients contiguous tensors of the checked kinds and shapes,
        // alive for the call; the C++ side catches every exception.
        let status = unsafe {
            impasto_add_bf16_rows(
                sum.data_ptr() as *mut f32,
                coefficients.data_ptr() as *const f32,
                rows.data_ptr() as *const u16,
                row_count,
                width,
            )
        };
        assert_eq!(status, 0, "no memory for the list of bf16 rows to combine");
    }
    #[cfg(not(impasto_row_kernels))]
    {
        let _ = sum.addmv_(&rows.to_kind(Kind::Float).tr(), &coefficients);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeded::Draws;

    /// Random `[R, n]` rows rounded to bf16 and an `[n]` f32 vector.
    fn operands(draws: &mut Draws, row_count: i64, width: i64) -> (Tensor, Tensor) {
        let rows = draws.normal(&[row_count, width], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        (rows, draws.normal(&[width], (Kind::Float, Device::Cpu)))
    }

    #[test]
    fn dot_products_match_f64_ones_of_the_widened_rows() {
        let mut draws = Draws::new(3);
        // rows: within one group of eight, a group and a ragged one, three groups; widths: within
        // one run of 16 lanes, lanes and a tail, a block of 32,768 columns, blocks and a ragged last one
        for (row_count, width) in [(5, 1), (5, 15), (5, 17), (19, 32_768), (19, 40_000), (16, 70_001), (3, 300_000)] {
            let (rows, vector) = operands(&mut draws, row_count, width);
            let expected = rows.to_kind(Kind::Double).mv(&vector.to_kind(Kind::Double));
            let products = times_vector(&rows, &vector);
            assert_eq!(products.kind(), Kind::Double);
            let error = (&products - &expected).abs().max().double_value(&[]);
            // f32 lanes of about 2,048 unit terms each, then f64: seen 1.5·10⁻⁴ at 300,000 columns
            let bound = 2e-6 * (width as f64).sqrt();
            assert!(error < bound, "{row_count} × {width}: error {error} against {bound}");
        }
    }

    #[test]
    #[cfg(impasto_row_kernels)]
    fn the_products_do_not_depend_on_the_thread_count() {
        let mut draws = Draws::new(4);
        let (rows, vector) = operands(&mut draws, 3, 200_000);
        // (this thread's count only: the process's is left to the other tests)
        let on = |threads: usize| {
            crate::device::threads::with_threads(threads, || {
                let products = times_vector(&rows, &vector);
                // the kernel left the thread's count as it found it
                assert_eq!(tch::get_num_threads(), threads as i32);
                products
            })
        };
        let (alone, shared) = (on(1), on(2));
        assert!(alone.equal(&shared), "{alone:?} against {shared:?}");
    }

    #[test]
    #[cfg(impasto_row_kernels)]
    fn a_combination_adds_the_widened_rows_and_skips_zero_coefficients() {
        let mut draws = Draws::new(5);
        // eleven rows with a zero among them: a whole group of eight and one of two padded to eight;
        // widths within one block, and blocks with a ragged last one
        for width in [7, 32_768, 70_001] {
            let (rows, start) = operands(&mut draws, 11, width);
            let coefficients = Tensor::from_slice(&[0.5f64, 0.0, -2.0, 1e-3, 1.0, -1.0, 0.25, 3.0, -0.5, 2.0, 0.75]);
            // the zero coefficient's row holds NaN: skipped, it leaves no trace
            let _ = rows.get(1).fill_(f64::NAN);
            let mut sum = start.copy();
            add_combination(&mut sum, &coefficients, &rows);
            let mut expected = start.to_kind(Kind::Double);
            for row in (0..11).filter(|&row| row != 1) {
                expected += rows.get(row).to_kind(Kind::Double) * coefficients.double_value(&[row]);
            }
            let error = (sum.to_kind(Kind::Double) - expected).abs().max().double_value(&[]);
            assert!(error < 1e-5, "width {width}: error {error}");
        }
    }

    #[test]
    #[should_panic(expected = "bf16 rows against an f32 vector")]
    fn rows_of_another_kind_are_refused() {
        let rows = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
        let _ = times_vector(&rows, &Tensor::zeros([4], (Kind::Float, Device::Cpu)));
    }
}
