//! L-BFGS's passes over whole images on the CPU, each fused into one read (`pair_rows.cpp`, built
//! with `bf16_rows.cpp` on OpenMP): the new curvature pair's dot products, the pair stored rounded
//! to bf16 with the rounded pair's own products, and the proposal's gᵀd and ‖g‖₁. As libtorch
//! operations each product took a temporary image and a reduction over it, and at 720p with a memory
//! of one pair they made a proposal take 53 ms with bf16 pairs, 28 ms with f32 ones (BENCHMARKS.md).
//! Sums run in f32 lanes flushed to f64 every 256 columns and in f64 across blocks, in a fixed order.
//! The functions take rows `[B, n]` of f32 on the CPU and answer per item; where the build has no
//! kernels ([`applies_to`] false) L-BFGS keeps to libtorch's operations.

use tch::{Device, Kind, Tensor};

#[cfg(impasto_row_kernels)]
unsafe extern "C" {
    fn impasto_pair_dots(
        s: *const f32,
        y: *const f32,
        g: *const f32,
        width: i64,
        products: *mut f64,
    ) -> std::ffi::c_int;
    fn impasto_store_bf16_pair(
        s: *const f32,
        y: *const f32,
        width: i64,
        s_row: *mut u16,
        y_row: *mut u16,
        products: *mut f64,
    ) -> std::ffi::c_int;
    fn impasto_descent_dots(g: *const f32, d: *const f32, width: i64, products: *mut f64) -> std::ffi::c_int;
}

/// Whether the fused passes take rows like `rows`: f32 on the CPU, in a build that has L-BFGS's
/// kernels (these are built with the bf16 rows' ones, so exactly where those read such rows).
pub fn applies_to(rows: &Tensor) -> bool {
    super::bf16_rows::read_against(rows)
}

/// Checks that every tensor is an f32 `[B, n]` matrix on the CPU, of one shape, and gives them with
/// contiguous rows.
fn checked<const N: usize>(rows: [&Tensor; N]) -> [Tensor; N] {
    let shape = rows[0].size();
    assert_eq!(shape.len(), 2, "rows [B, n]");
    rows.map(|tensor| {
        assert_eq!((tensor.kind(), tensor.device()), (Kind::Float, Device::Cpu), "f32 rows on the CPU");
        assert_eq!(tensor.size(), shape, "rows of one shape");
        tensor.contiguous()
    })
}

/// `[B]` f64 tensors, one per product, from `products` of each of `batch` items.
fn per_item<const P: usize>(batch: i64, products: impl FnMut(i64) -> [f64; P]) -> [Tensor; P] {
    let items: Vec<[f64; P]> = (0..batch).map(products).collect();
    std::array::from_fn(|product| Tensor::from_slice(&items.iter().map(|item| item[product]).collect::<Vec<_>>()))
}

/// yᵀs, yᵀy, sᵀs and gᵀg per item of rows `[B, n]` (`[B]` f64 each).
pub fn pair_products(s: &Tensor, y: &Tensor, g: &Tensor) -> [Tensor; 4] {
    let [s, y, g] = checked([s, y, g]);
    per_item(s.size()[0], |item| {
        let [s, y, g] = [&s, &y, &g].map(|rows| rows.get(item));
        #[cfg(impasto_row_kernels)]
        {
            let mut products = [0.0f64; 4];
            // SAFETY: three contiguous [n] f32 CPU tensors alive for the call (rows of checked
            // contiguous matrices), and four f64 to write; the C++ side catches every exception.
            let status = unsafe {
                impasto_pair_dots(
                    s.data_ptr() as *const f32,
                    y.data_ptr() as *const f32,
                    g.data_ptr() as *const f32,
                    s.size()[0],
                    products.as_mut_ptr(),
                )
            };
            assert_eq!(status, 0, "no memory for the partial sums of a curvature pair");
            products
        }
        #[cfg(not(impasto_row_kernels))]
        {
            [(&y, &s), (&y, &y), (&s, &s), (&g, &g)].map(|(a, b)| double_dot(a, b))
        }
    })
}

/// Stores rows `s` and `y` (`[B, n]` f32) rounded to bf16 into the bf16 rows `s_rows` and `y_rows`
/// (`[B, n]`, views into L-BFGS's memory, each item's row contiguous, the two apart) for the items
/// where `store` holds, and gives yᵀs, yᵀy and sᵀs of the rounded pair (zero for the others, whose
/// rows are left as they were). Writes through the views: the caller must hold no other reference
/// to those rows while it runs (L-BFGS's memory calls it on a slot it is filling).
pub(crate) fn store_bf16(s: &Tensor, y: &Tensor, store: &[bool], s_rows: &Tensor, y_rows: &Tensor) -> [Tensor; 3] {
    let [s, y] = checked([s, y]);
    assert_eq!(store.len() as i64, s.size()[0], "a choice per item");
    for rows in [s_rows, y_rows] {
        assert_eq!((rows.kind(), rows.device()), (Kind::BFloat16, Device::Cpu), "bf16 rows on the CPU");
        assert_eq!(rows.size(), s.size(), "rows as large as the pair's");
    }
    per_item(s.size()[0], |item| {
        if !store[item as usize] {
            return [0.0; 3];
        }
        let [s, y, s_row, y_row] = [&s, &y, s_rows, y_rows].map(|rows| rows.get(item));
        assert!(s_row.is_contiguous() && y_row.is_contiguous(), "each item's row is written in place");
        let (s_at, y_at) = (s_row.data_ptr() as usize, y_row.data_ptr() as usize);
        assert!(s_at.abs_diff(y_at) >= 2 * s.size()[0] as usize, "the s and y rows must not overlap");
        #[cfg(impasto_row_kernels)]
        {
            let mut products = [0.0f64; 3];
            // SAFETY: contiguous [n] f32 sources and contiguous [n] bf16 destinations that do not
            // overlap each other (checked above) nor the sources (f32 tensors, not bf16 ones),
            // alive for the call, and written by no one else meanwhile (the caller's contract);
            // three f64 to write; the C++ side catches every exception.
            let status = unsafe {
                impasto_store_bf16_pair(
                    s.data_ptr() as *const f32,
                    y.data_ptr() as *const f32,
                    s.size()[0],
                    s_row.data_ptr() as *mut u16,
                    y_row.data_ptr() as *mut u16,
                    products.as_mut_ptr(),
                )
            };
            assert_eq!(status, 0, "no memory for the partial sums of a curvature pair");
            products
        }
        #[cfg(not(impasto_row_kernels))]
        {
            let (mut s_row, mut y_row) = (s_row, y_row);
            s_row.copy_(&s);
            y_row.copy_(&y);
            let [s, y] = [&s_row, &y_row].map(|row| row.to_kind(Kind::Float));
            [(&y, &s), (&y, &y), (&s, &s)].map(|(a, b)| double_dot(a, b))
        }
    })
}

/// gᵀd and ‖g‖₁ per item of rows `[B, n]` (`[B]` f64 each).
pub fn descent_products(g: &Tensor, d: &Tensor) -> [Tensor; 2] {
    let [g, d] = checked([g, d]);
    per_item(g.size()[0], |item| {
        let [g, d] = [&g, &d].map(|rows| rows.get(item));
        #[cfg(impasto_row_kernels)]
        {
            let mut products = [0.0f64; 2];
            // SAFETY: two contiguous [n] f32 CPU tensors alive for the call, two f64 to write; the
            // C++ side catches every exception.
            let status = unsafe {
                impasto_descent_dots(
                    g.data_ptr() as *const f32,
                    d.data_ptr() as *const f32,
                    g.size()[0],
                    products.as_mut_ptr(),
                )
            };
            assert_eq!(status, 0, "no memory for the partial sums of a proposal");
            products
        }
        #[cfg(not(impasto_row_kernels))]
        {
            [double_dot(&g, &d), g.abs().sum(Kind::Double).double_value(&[])]
        }
    })
}

/// aᵀb of two `[n]` f32 vectors, summed in f64.
#[cfg(not(impasto_row_kernels))]
fn double_dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b).sum(Kind::Double).double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeded::Draws;

    /// Asserts that `products` (`[B]`) are aᵀb per row of `[B, n]` rows `a` and `b`, to 10⁻⁶ of the
    /// sum of the terms' magnitudes (the bound of a sum's rounding, whatever the terms' signs).
    fn assert_dots(products: &Tensor, a: &Tensor, b: &Tensor, what: &str) {
        let terms = a.to_kind(Kind::Double) * b.to_kind(Kind::Double);
        let exact = terms.sum_dim_intlist(1, false, Kind::Double);
        let magnitude = terms.abs().sum_dim_intlist(1, false, Kind::Double);
        let error = ((products - exact).abs() / magnitude.clamp_min(1e-300)).max().double_value(&[]);
        assert!(error < 1e-6, "{what}: error {error} of the terms' magnitude");
    }

    /// Widths: within one run of lanes, runs and a tail, a block, blocks and a ragged last one.
    const WIDTHS: [i64; 6] = [5, 300, 4_097, 32_768, 70_001, 300_000];

    #[test]
    fn pair_products_match_f64_ones() {
        let mut draws = Draws::new(21);
        for width in WIDTHS {
            let [s, y, g] = [(); 3].map(|_| draws.normal(&[2, width], (Kind::Float, Device::Cpu)));
            let products = pair_products(&s, &y, &g);
            let operands = [(&y, &s), (&y, &y), (&s, &s), (&g, &g)];
            for ((products, (a, b)), name) in products.iter().zip(operands).zip(["ys", "yy", "ss", "gg"]) {
                assert_dots(products, a, b, &format!("{name} at {width}"));
            }
        }
    }

    #[test]
    fn a_stored_pair_is_libtorchs_rounding_and_its_products_are_the_rounded_ones() {
        let mut draws = Draws::new(22);
        for width in WIDTHS {
            let [s, y] = [(); 2].map(|_| draws.normal(&[3, width], (Kind::Float, Device::Cpu)) * 1e3);
            // the rounding's edge cases: NaN, infinities, ties to even (up and down), a value that
            // rounds up to infinity, a negative zero
            let specials =
                [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, f32::MAX, -0.0];
            let count = specials.len().min(width as usize);
            s.get(2).narrow(0, 0, count as i64).copy_(&Tensor::from_slice(&specials[..count]));
            let chunk = Tensor::full([3, 2, width], 7.0, (Kind::BFloat16, Device::Cpu));
            let (s_rows, y_rows) = (chunk.select(1, 0), chunk.select(1, 1));
            let products = store_bf16(&s, &y, &[true, false, true], &s_rows, &y_rows);
            for item in [0, 2] {
                for (stored, wanted) in [(&s_rows, &s), (&y_rows, &y)] {
                    let (stored, rounded) = (stored.get(item), wanted.get(item).to_kind(Kind::BFloat16));
                    // bit for bit, but for NaN's payload (libtorch's own conversions differ in it)
                    let bits = |row: &Tensor| row.view_dtype(Kind::Int16);
                    let same = bits(&stored)
                        .eq_tensor(&bits(&rounded))
                        .logical_or(&stored.isnan().logical_and(&rounded.isnan()));
                    assert!(same.all().int64_value(&[]) == 1, "item {item} at {width}: not libtorch's rounding");
                }
            }
            assert!(s_rows.get(1).eq(7.0).all().int64_value(&[]) == 1, "an item not stored keeps its rows");
            let [s0, y0] = [&s_rows, &y_rows].map(|rows| rows.narrow(0, 0, 1).to_kind(Kind::Float));
            let operands = [(&y0, &s0), (&y0, &y0), (&s0, &s0)];
            for ((products, (a, b)), name) in products.iter().zip(operands).zip(["ys", "yy", "ss"]) {
                assert_dots(&products.narrow(0, 0, 1), a, b, &format!("rounded {name} at {width}"));
                assert_eq!(products.double_value(&[1]), 0.0, "an item not stored has no products");
            }
            assert!(products[0].double_value(&[2]).is_nan(), "a NaN in a pair shows in its products");
        }
    }

    #[test]
    fn descent_products_match_f64_ones() {
        let mut draws = Draws::new(23);
        for width in WIDTHS {
            let [g, d] = [(); 2].map(|_| draws.normal(&[2, width], (Kind::Float, Device::Cpu)));
            let [g_d, l1] = descent_products(&g, &d);
            assert_dots(&g_d, &g, &d, &format!("gᵀd at {width}"));
            assert_dots(&l1, &g.abs(), &g.ones_like(), &format!("‖g‖₁ at {width}"));
        }
    }

    #[test]
    #[cfg(impasto_row_kernels)]
    fn the_products_do_not_depend_on_the_thread_count() {
        let mut draws = Draws::new(24);
        let [s, y, g] = [(); 3].map(|_| draws.normal(&[1, 200_000], (Kind::Float, Device::Cpu)));
        let on = |threads: usize| {
            crate::device::threads::with_threads(threads, || {
                let chunk = Tensor::zeros([1, 2, 200_000], (Kind::BFloat16, Device::Cpu));
                let mut products = Vec::from(pair_products(&s, &y, &g));
                products.extend(store_bf16(&s, &y, &[true], &chunk.select(1, 0), &chunk.select(1, 1)));
                products.extend(descent_products(&g, &s));
                // the kernels left the thread's count as they found it
                assert_eq!(tch::get_num_threads(), threads as i32);
                Tensor::stack(&products, 0)
            })
        };
        let (alone, shared) = (on(1), on(2));
        assert!(alone.equal(&shared), "{alone:?} against {shared:?}");
    }
}
