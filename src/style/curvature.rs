//! The memory of L-BFGS: its curvature pairs (s, y) per item of a batch, and the step they give, in
//! the compact form of Byrd, Nocedal & Schnabel (1994) instead of the two-loop recursion. Both give
//! the same product of the inverse-Hessian approximation H with the gradient. The two-loop
//! recursion takes some eleven small operations per pair, one after the other: at the default
//! memory of 100 pairs about 1,100 kernel launches per iteration on a GPU. Here the pairs lie as
//! rows of a few matrices (chunks of [`CHUNK_PAIRS`]), and an iteration reads them twice: the
//! products of every s and y with the gradient, then the step, a combination of them all. What
//! lies between is arithmetic on `[B, L, L]` matrices of dot products kept in f64: sᵢᵀyⱼ (whose
//! upper triangle is R) and yᵢᵀyⱼ. So H g = γg + S u − γY x, with x = R⁻¹Sᵀg and
//! u = R⁻ᵀ((D + γYᵀY)x − γYᵀg), D the diagonal of R. The newest pair's products with the older
//! ones need no read of their own: its y is the change of gradient since the last step, so sᵢᵀy
//! and yᵢᵀy are this read's sᵢᵀg and yᵢᵀg less the last step's, which are kept. On the CPU, bound by memory
//! bandwidth, that makes two reads of each s and y per iteration, as the two-loop recursion
//! takes, without its temporaries (BENCHMARKS.md). The differences round relative to g rather than
//! y; a 256-px run of 200 iterations saw at most 1.2·10⁻⁴ of the largest product, and steps still
//! match the recursion's to 10⁻⁴ when g is a thousand times longer than y (tested), to 5·10⁻⁴ at
//! ten thousand times, where L-BFGS starts refusing pairs as rounding noise.
//!
//! An item's refused pair is stored as zeros, as in the two-loop recursion, where it is a no-op: its
//! row and column of R are zero, so its diagonal is taken as 1 and its coefficients come out zero.
//! The pairs lie in a ring of slots: the newest takes the slot after the newest before it, and the
//! oldest goes when the memory is full. Chunks are added while the memory grows, so it takes no
//! more room than the pairs it holds (plus the unused rows of the last chunk).
//!
//! The dot products are float32 matrix products, which libtorch may take at lower precision when
//! asked to for a network: the caller holds IEEE products on the CPU (`device::products`), and
//! where TF32 is allowed for CUDA's matrix products this module takes matrix-vector products
//! instead, which TF32 leaves alone.
//!
//! The pairs may be stored in bf16 rather than in the gradients' kind (`lbfgs_pairs`): half the
//! bytes to hold and to read. The products are then those of the pairs as stored: on the CPU the
//! rows are widened as they are read (`device::bf16_rows`), elsewhere chunk by chunk, and a pair's
//! own sᵀy and yᵀy are taken again from its stored values, so R, D and YᵀY describe the very
//! pairs the step combines. Only the newest y's products with the older pairs come from the
//! gradients' change, whose rounding to bf16 they do not see: at 4096 values they were seen within
//! 1.2·10⁻⁴ of the largest product, and the steps within 1.1·10⁻⁴ of the rounded pairs' (the tests
//! hold 10⁻³).
//!
//! A new pair is written into its slot by whole-batch operations on a GPU (masks for the items
//! that refused it, and in bf16 the products of the rounded pair from widened copies), and so on
//! the CPU where the build has no kernels of its own. Where it has them, it goes item by item:
//! copied, or rounded to bf16 with the rounded pair's products in the same pass
//! (`device::pair_rows`), and the rows of an item that refused it are cleared.

use std::collections::VecDeque;

use tch::{Device, Kind, Tensor};

use super::optim::where_items;
use crate::device::{bf16_rows, pair_rows, tf32};

/// Pairs per chunk of the memory's storage: few enough that the last chunk wastes little room,
/// many enough that the memory is read in a handful of matrix products.
const CHUNK_PAIRS: usize = 8;

/// A pair shows curvature where yᵀs > this · ‖y‖‖s‖ (scale-free).
const CURVATURE_TEST: f64 = 1e-10;

/// `[B]` values shaped to broadcast over rows `[B, n]`.
fn per_row(values: &Tensor) -> Tensor {
    values.unsqueeze(1)
}

/// aᵀb of each row of `[B, n]` tensors: `[B]` in f64.
pub(super) fn row_dots(a: &Tensor, b: &Tensor) -> Tensor {
    (a * b).sum_dim_intlist(1, false, Kind::Double)
}

/// The newest pair's own products, stored with it; its products with the older pairs come with
/// the next gradient's.
struct Pending {
    /// yᵀs per item, `[B]` f64 (zero where refused).
    ys: Tensor,
    /// yᵀy per item, `[B]` f64 (zero where refused).
    yy: Tensor,
}

/// Up to `history` curvature pairs of a batch and the dot products among them.
pub(super) struct Curvature {
    history: usize,
    /// The kind the pairs are stored in: the gradients' own, or bf16.
    kind: Kind,
    /// `[B, 2k, n]` each, in `kind`: the s of the chunk's k slots, then their y.
    chunks: Vec<Tensor>,
    /// The slot of the oldest pair.
    start: usize,
    /// The serial number of each pair kept, oldest first.
    serials: VecDeque<u64>,
    /// sᵢᵀyⱼ of the pairs kept, oldest first, `[B, L, L]` f64, for i ≤ j (zero below).
    s_y: Tensor,
    /// yᵢᵀyⱼ, `[B, L, L]` f64.
    y_y: Tensor,
    pending: Option<Pending>,
    /// Sᵀg and Yᵀg of the pairs kept, oldest first (`[B, L]` f64 each), for the gradient of the
    /// last step: the newest y's products with them are the change in these.
    last_products: [Tensor; 2],
}

impl Curvature {
    /// An empty memory for `history` pairs of a batch of `batch` items on `device`, stored in `kind`
    /// (the gradients' kind, or bf16 for f32 gradients).
    pub fn new(history: usize, batch: i64, device: Device, kind: Kind) -> Self {
        let empty = Tensor::zeros([batch, 0, 0], (Kind::Double, device));
        Curvature {
            history: history.max(1),
            kind,
            chunks: Vec::new(),
            start: 0,
            serials: VecDeque::new(),
            s_y: empty.shallow_clone(),
            y_y: empty,
            pending: None,
            last_products: [(); 2].map(|_| Tensor::zeros([batch, 0], (Kind::Double, device))),
        }
    }

    /// The kind the pairs are stored in.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Pairs kept.
    pub fn len(&self) -> usize {
        self.serials.len()
    }

    /// The serial number of the oldest pair kept.
    pub fn oldest_serial(&self) -> Option<u64> {
        self.serials.front().copied()
    }

    fn capacity(&self) -> usize {
        self.chunks.iter().map(chunk_pairs).sum()
    }

    /// The chunk holding `slot`, and the slot's row among the chunk's s.
    fn locate(&self, mut slot: usize) -> (&Tensor, usize) {
        for chunk in &self.chunks {
            let pairs = chunk_pairs(chunk);
            if slot < pairs {
                return (chunk, slot);
            }
            slot -= pairs;
        }
        unreachable!("slot beyond the memory's capacity")
    }

    /// Stores the pair (s, y) of rows `[B, n]` for the items where `accept` (`[B]` booleans) holds,
    /// zeros for the others, with its yᵀs and yᵀy per item (`[B]` f64, zero where refused; taken
    /// again from the stored values where the memory's kind rounds them, and the pair refused where
    /// those fail the curvature test); the oldest pair goes if the memory is full. Where an item
    /// takes the pair, y must be the change from the gradient of the last [`Curvature::direction`]
    /// to the next one's. Returns which items took it (`[B]` booleans).
    pub fn push(&mut self, s: &Tensor, y: &Tensor, accept: &Tensor, ys: Tensor, yy: Tensor, serial: u64) -> Tensor {
        self.push_storing(s, y, accept, (ys, yy), serial, Storing::for_pair(s))
    }

    /// [`Curvature::push`], writing the pair as `storing` says.
    fn push_storing(
        &mut self,
        s: &Tensor,
        y: &Tensor,
        accept: &Tensor,
        products: (Tensor, Tensor),
        serial: u64,
        storing: Storing,
    ) -> Tensor {
        assert!(self.pending.is_none(), "a pair was pushed before the last one's products were taken");
        if self.len() == self.history {
            self.drop_oldest();
        }
        if self.len() == self.capacity() {
            self.grow(s);
        }
        let rows = self.pair_at((self.start + self.len()) % self.capacity());
        let (ys, yy) = match storing {
            Storing::Kernels => self.store_by_kernels(s, y, accept, rows, products),
            Storing::Operations => self.store_by_operations(s, y, accept, rows, products),
        };
        self.serials.push_back(serial);
        let taken = yy.ne(0.0);
        self.pending = Some(Pending { ys, yy });
        taken
    }

    /// Writes the accepted items' pairs into `rows` (the slot's s and y, `[B, 1, n]` each) and
    /// clears the others' by whole-batch operations: masks, copies and, where the memory rounds the
    /// pair, products of the stored values. Gives the pair's yᵀs and yᵀy as stored.
    fn store_by_operations(
        &self,
        s: &Tensor,
        y: &Tensor,
        accept: &Tensor,
        [mut s_row, mut y_row]: [Tensor; 2],
        (ys, yy): (Tensor, Tensor),
    ) -> (Tensor, Tensor) {
        s_row.copy_(&where_items(s, accept).unsqueeze(1));
        y_row.copy_(&where_items(y, accept).unsqueeze(1));
        if self.kind == s.kind() {
            return (ys, yy);
        }
        let [rounded_s, rounded_y] = [&s_row, &y_row].map(|row| row.squeeze_dim(1).to_kind(s.kind()));
        let [ys, yy, ss] =
            [(&rounded_y, &rounded_s), (&rounded_y, &rounded_y), (&rounded_s, &rounded_s)].map(|(a, b)| row_dots(a, b));
        let (ys, yy, curved) = as_stored(ys, yy, &ss);
        // NaN-safe: a refused item's rows are filled, not multiplied, with zeros
        let refused = curved.logical_not().view([-1, 1, 1]);
        let _ = s_row.masked_fill_(&refused, 0.0);
        let _ = y_row.masked_fill_(&refused, 0.0);
        (ys, yy)
    }

    /// [`Curvature::store_by_operations`] item by item on the CPU: an accepted item's rows copied,
    /// or rounded to bf16 with their products in one pass (`device::pair_rows`), the others' rows
    /// cleared, with no temporary image.
    fn store_by_kernels(
        &self,
        s: &Tensor,
        y: &Tensor,
        accept: &Tensor,
        [s_row, y_row]: [Tensor; 2],
        (ys, yy): (Tensor, Tensor),
    ) -> (Tensor, Tensor) {
        let (s_rows, y_rows) = (s_row.squeeze_dim(1), y_row.squeeze_dim(1));
        let mut stored = Vec::<bool>::try_from(accept).expect("[B] booleans on the CPU");
        let (ys, yy) = if self.kind == s.kind() {
            for item in (0..stored.len()).filter(|&item| stored[item]) {
                s_rows.get(item as i64).copy_(&s.get(item as i64));
                y_rows.get(item as i64).copy_(&y.get(item as i64));
            }
            (ys, yy)
        } else {
            let [ys, yy, ss] = pair_rows::store_bf16(s, y, &stored, &s_rows, &y_rows);
            let (ys, yy, curved) = as_stored(ys, yy, &ss);
            stored = Vec::<bool>::try_from(&curved).expect("[B] booleans on the CPU");
            (ys, yy)
        };
        for item in (0..stored.len()).filter(|&item| !stored[item]) {
            let _ = s_rows.get(item as i64).fill_(0.0);
            let _ = y_rows.get(item as i64).fill_(0.0);
        }
        (ys, yy)
    }

    /// Forgets the oldest pair.
    pub fn drop_oldest(&mut self) {
        debug_assert!(self.pending.is_none(), "the newest pair's products are still to be taken");
        if self.serials.pop_front().is_none() {
            return;
        }
        let kept = self.len() as i64;
        self.s_y = self.s_y.narrow(1, 1, kept).narrow(2, 1, kept);
        self.y_y = self.y_y.narrow(1, 1, kept).narrow(2, 1, kept);
        self.last_products = self.last_products.each_ref().map(|products| products.narrow(1, 1, kept));
        self.start = if kept == 0 { 0 } else { (self.start + 1) % self.capacity() };
    }

    /// Zeroes every pair of item `item`, as if it had refused them all.
    pub fn forget(&mut self, item: usize) {
        let item = item as i64;
        for tensor in self.chunks.iter().chain([&self.s_y, &self.y_y]).chain(&self.last_products) {
            let _ = tensor.narrow(0, item, 1).fill_(0.0);
        }
    }

    /// Adds a chunk, first turning the ring so that the oldest pair is in slot 0.
    fn grow(&mut self, like: &Tensor) {
        if self.start != 0 {
            self.turn_to_start();
        }
        let (batch, width) = (like.size()[0], like.size()[1]);
        let pairs = CHUNK_PAIRS.min(self.history - self.capacity()) as i64;
        self.chunks.push(Tensor::zeros([batch, 2 * pairs, width], (self.kind, like.device())));
    }

    /// Moves every pair of a full ring `start` slots back, in place (cycle by cycle, one pair held
    /// aside), so that the oldest lies in slot 0. Happens when a memory that dropped dead pairs
    /// grows again; it reads and writes the memory once, and holds one pair more.
    fn turn_to_start(&mut self) {
        let capacity = self.capacity();
        debug_assert_eq!(self.len(), capacity, "the ring grows only when full");
        let cycles = greatest_common_divisor(capacity, self.start);
        for first in 0..cycles {
            let aside = self.pair_at(first).map(|row| row.copy());
            let mut to = first;
            loop {
                let from = (to + self.start) % capacity;
                if from == first {
                    break;
                }
                let moved = self.pair_at(from);
                for (mut to_row, from_row) in self.pair_at(to).into_iter().zip(&moved) {
                    to_row.copy_(from_row);
                }
                to = from;
            }
            for (mut to_row, row) in self.pair_at(to).into_iter().zip(&aside) {
                to_row.copy_(row);
            }
        }
        self.start = 0;
    }

    /// Views `[B, 1, n]` of the s and the y in `slot`.
    fn pair_at(&self, slot: usize) -> [Tensor; 2] {
        let (chunk, row) = self.locate(slot);
        let pairs = chunk_pairs(chunk) as i64;
        [chunk.narrow(1, row as i64, 1), chunk.narrow(1, pairs + row as i64, 1)]
    }

    /// The step direction −H·g for gradients `grad` (rows `[B, n]`), with H₀ = γI per item (`gamma`
    /// `[B]` f64). The newest pair's products with the older ones come from the same read, less the
    /// products kept from the last call.
    pub fn direction(&mut self, grad: &Tensor, gamma: &Tensor) -> Tensor {
        let reading = Reading::for_memory(self.kind, grad);
        self.direction_reading(grad, gamma, reading)
    }

    /// [`Curvature::direction`], reading the memory as `reading` says.
    fn direction_reading(&mut self, grad: &Tensor, gamma: &Tensor, reading: Reading) -> Tensor {
        let steepest = grad * per_row(&-gamma).to_kind(grad.kind());
        if self.serials.is_empty() {
            self.pending = None;
            return steepest;
        }
        let (s_g, y_g) = self.dot_products(grad, reading);
        if let Some(pending) = self.pending.take() {
            self.extend(&s_g, &y_g, pending);
        }
        let (x, u) = self.coefficients(&s_g, &y_g, gamma);
        self.last_products = [s_g, y_g];
        // −H g = −γg − S u + γY x
        self.combine(steepest, &-u, &(x * per_row(gamma)), reading)
    }

    /// x = R⁻¹Sᵀg and u = R⁻ᵀ((D + γYᵀY)x − γYᵀg), each `[B, L]`, from Sᵀg and Yᵀg (`[B, L]`).
    fn coefficients(&self, s_g: &Tensor, y_g: &Tensor, gamma: &Tensor) -> (Tensor, Tensor) {
        let upper = self.s_y.triu(0);
        let diagonal = upper.diagonal(0, 1, 2);
        // a refused pair's row and column are zero: a unit diagonal makes its coefficients zero
        let r = &upper + diagonal.eq(0.0).to_kind(Kind::Double).diag_embed(0, 1, 2);
        let x = r.linalg_solve_triangular(&s_g.unsqueeze(2), true, true, false);
        let gamma = gamma.view([-1, 1, 1]);
        let inner = diagonal.unsqueeze(2) * &x + (self.y_y.matmul(&x) - y_g.unsqueeze(2)) * &gamma;
        let u = r.transpose(1, 2).linalg_solve_triangular(&inner, false, true, false);
        (x.squeeze_dim(2), u.squeeze_dim(2))
    }

    /// Sᵀg and Yᵀg of the pairs kept, oldest first, for gradients `grad` (rows `[B, n]`): two
    /// `[B, L]` f64 tensors, from one read of each chunk.
    fn dot_products(&self, grad: &Tensor, reading: Reading) -> (Tensor, Tensor) {
        let column = grad.unsqueeze(2);
        let per_chunk: Vec<(Tensor, i64)> = self
            .chunks
            .iter()
            .map(|chunk| {
                let products = match reading {
                    Reading::MatrixProducts => widened(chunk, grad.kind()).bmm(&column).squeeze_dim(2),
                    Reading::MatrixVectorProducts => matrix_vector_products(&widened(chunk, grad.kind()), grad),
                    Reading::Bf16Rows => {
                        per_item_stack(chunk, |item| bf16_rows::times_vector(&chunk.get(item), &grad.get(item)))
                    }
                };
                (products, chunk_pairs(chunk) as i64)
            })
            .collect();
        let part = |offset: fn(i64) -> i64| {
            let parts: Vec<Tensor> = per_chunk.iter().map(|(p, pairs)| p.narrow(1, offset(*pairs), *pairs)).collect();
            self.oldest_first(&Tensor::cat(&parts, 1)).to_kind(Kind::Double)
        };
        (part(|_| 0), part(|pairs| pairs))
    }

    /// Adds the newest pair's row and column to sᵢᵀyⱼ and yᵢᵀyⱼ, from this gradient's Sᵀg and Yᵀg
    /// (`[B, L]`, oldest first): the older pairs' products with the newest y are their change since
    /// the last gradient, zero where an item refused the pair; its own are taken from `pending`,
    /// summed in f64.
    fn extend(&mut self, s_g: &Tensor, y_g: &Tensor, pending: Pending) {
        let older = self.len() as i64 - 1;
        let taken = per_row(&pending.yy.ne(0.0));
        let change =
            |now: &Tensor, last: &Tensor| (now.narrow(1, 0, older) - last).where_scalarother(&taken, 0.0).unsqueeze(2);
        let [s_g_last, y_g_last] = &self.last_products;
        let (s_dot_new_y, y_dot_new_y) = (change(s_g, s_g_last), change(y_g, y_g_last));
        let (own_ys, own_yy) = (pending.ys.view([-1, 1, 1]), pending.yy.view([-1, 1, 1]));
        let below = Tensor::zeros_like(&s_dot_new_y).transpose(1, 2);
        let s_y_top = Tensor::cat(&[&self.s_y, &s_dot_new_y], 2);
        self.s_y = Tensor::cat(&[s_y_top, Tensor::cat(&[below, own_ys], 2)], 1);
        let y_y_top = Tensor::cat(&[&self.y_y, &y_dot_new_y], 2);
        let y_y_bottom = Tensor::cat(&[y_dot_new_y.transpose(1, 2), own_yy], 2);
        self.y_y = Tensor::cat(&[y_y_top, y_y_bottom], 1);
    }

    /// `start` (rows `[B, n]`) plus Σ sᵢ·s_coefficientsᵢ + yᵢ·y_coefficientsᵢ (`[B, L]`, oldest
    /// first), in one product per chunk (per item, by matrix-vector products).
    fn combine(&self, start: Tensor, s_coefficients: &Tensor, y_coefficients: &Tensor, reading: Reading) -> Tensor {
        let kind = start.kind();
        let by_slot = |coefficients: &Tensor| self.by_slot(coefficients).to_kind(kind);
        let (s_by_slot, y_by_slot) = (by_slot(s_coefficients), by_slot(y_coefficients));
        let mut sum = start.unsqueeze(1);
        let mut offset = 0;
        for chunk in &self.chunks {
            let pairs = chunk_pairs(chunk) as i64;
            let coefficients =
                Tensor::cat(&[s_by_slot.narrow(1, offset, pairs), y_by_slot.narrow(1, offset, pairs)], 1).unsqueeze(1);
            match reading {
                Reading::MatrixProducts => {
                    let _ = sum.baddbmm_(&coefficients, &widened(chunk, kind));
                }
                Reading::MatrixVectorProducts => add_matrix_vector_products(&sum, &coefficients, &widened(chunk, kind)),
                Reading::Bf16Rows => (0..chunk.size()[0]).for_each(|item| {
                    let mut row = sum.get(item).get(0);
                    bf16_rows::add_combination(&mut row, &coefficients.get(item).get(0), &chunk.get(item))
                }),
            }
            offset += pairs;
        }
        sum.squeeze_dim(1)
    }

    /// Per-slot values `[B, capacity]` (in slot order, ring rotated) as the pairs kept, oldest first.
    fn oldest_first(&self, by_slot: &Tensor) -> Tensor {
        by_slot.roll([-(self.start as i64)], [1]).narrow(1, 0, self.len() as i64)
    }

    /// Values of the pairs kept, oldest first (`[B, L]`), laid out by slot (`[B, capacity]`, zero in
    /// the free slots).
    fn by_slot(&self, oldest_first: &Tensor) -> Tensor {
        let free = (self.capacity() - self.len()) as i64;
        let padding = Tensor::zeros([oldest_first.size()[0], free], (oldest_first.kind(), oldest_first.device()));
        Tensor::cat(&[oldest_first, &padding], 1).roll([self.start as i64], [1])
    }
}

/// `[B]` booleans: where a pair with products yᵀs, yᵀy and sᵀs (`[B]` f64) shows curvature
/// (yᵀs > [`CURVATURE_TEST`]·‖y‖‖s‖, y ≠ 0). A pair that passed the test unrounded can fail it as
/// stored: rounding can take yᵀs of a pair nearly orthogonal to zero or below, or overflow a value.
/// NaN-safe: a NaN or infinite product fails.
pub(super) fn curvature_holds(ys: &Tensor, yy: &Tensor, ss: &Tensor) -> Tensor {
    ys.gt_tensor(&((yy * ss).sqrt() * CURVATURE_TEST)).logical_and(&yy.gt(0.0)).logical_and(&yy.isfinite())
}

/// The stored pair's yᵀs and yᵀy from the products of its stored values (`[B]` f64 each), zero
/// where it fails the curvature test, and which items it passed (`[B]` booleans).
fn as_stored(ys: Tensor, yy: Tensor, ss: &Tensor) -> (Tensor, Tensor, Tensor) {
    let curved = curvature_holds(&ys, &yy, ss);
    (ys.where_scalarother(&curved, 0.0), yy.where_scalarother(&curved, 0.0), curved)
}

/// How a new pair is written into the memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Storing {
    /// Item by item, by the CPU's fused passes (`device::pair_rows`): for f32 gradients on the CPU
    /// where the build has them.
    Kernels,
    /// By libtorch's operations on the whole batch: on a GPU, where no host decision may wait for
    /// the device, and without the kernels.
    Operations,
}

impl Storing {
    fn for_pair(s: &Tensor) -> Storing {
        if pair_rows::applies_to(s) { Storing::Kernels } else { Storing::Operations }
    }
}

/// Pairs a chunk `[B, 2k, n]` holds: k.
fn chunk_pairs(chunk: &Tensor) -> usize {
    (chunk.size()[1] / 2) as usize
}

/// The greatest common divisor of `a` and `b` (`a` when `b` is 0).
fn greatest_common_divisor(a: usize, b: usize) -> usize {
    if b == 0 { a } else { greatest_common_divisor(b, a % b) }
}

/// How an iteration reads the memory's chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    /// Batched matrix products, one per chunk (on CUDA: one launch each).
    MatrixProducts,
    /// Matrix-vector products, one per item and chunk.
    MatrixVectorProducts,
    /// bf16 rows widened as they stream past, on the CPU (`device::bf16_rows`).
    Bf16Rows,
}

impl Reading {
    /// How to read a memory stored in `kind` for gradients `grad`. Not by matrix products where
    /// TF32 is allowed for CUDA's matrix products (it would round the dot products), nor on the CPU,
    /// where the BLAS takes matrix products with a column or two far slower than matrix-vector
    /// products (a 16 × 786,432 chunk times two vectors: 5.4 ms as a matrix product, 1.4 ms per
    /// matrix-vector product). Elsewhere than the CPU's bf16 rows, chunks stored in another kind than
    /// the gradients' are widened to it as they are read.
    fn for_memory(kind: Kind, grad: &Tensor) -> Reading {
        match grad.device() {
            Device::Cpu if kind == Kind::BFloat16 && bf16_rows::read_against(grad) => Reading::Bf16Rows,
            Device::Cuda(_) if !tf32::current().is_ok_and(|allowed| allowed.matmuls) => Reading::MatrixProducts,
            _ => Reading::MatrixVectorProducts,
        }
    }
}

/// `chunk` in `kind`: itself where it is stored so, else a widened copy.
fn widened(chunk: &Tensor, kind: Kind) -> Tensor {
    if chunk.kind() == kind { chunk.shallow_clone() } else { chunk.to_kind(kind) }
}

/// `[B, …]`: `per_item` of each item of `chunk` `[B, …]`, stacked.
fn per_item_stack(chunk: &Tensor, per_item: impl Fn(i64) -> Tensor) -> Tensor {
    let items: Vec<Tensor> = (0..chunk.size()[0]).map(per_item).collect();
    Tensor::stack(&items, 0)
}

/// `chunk` `[B, 2k, n]` times `vector` (`[B, n]`) by matrix-vector products: `[B, 2k]`.
fn matrix_vector_products(chunk: &Tensor, vector: &Tensor) -> Tensor {
    per_item_stack(chunk, |item| chunk.get(item).mv(&vector.get(item)))
}

/// `sum` `[B, 1, n]` += `coefficients` `[B, 1, 2k]` · `chunk` `[B, 2k, n]`, by matrix-vector products.
fn add_matrix_vector_products(sum: &Tensor, coefficients: &Tensor, chunk: &Tensor) {
    for item in 0..chunk.size()[0] {
        let mut row = sum.get(item).get(0);
        let _ = row.addmv_(&chunk.get(item).tr(), &coefficients.get(item).get(0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two-loop recursion over explicit pairs `(s, y)` of rows `[B, n]` (oldest first; a zero
    /// pair is skipped per item): the reference the compact form must match.
    fn two_loop(pairs: &[(Tensor, Tensor)], grad: &Tensor, gamma: &Tensor) -> Tensor {
        let rho = |s: &Tensor, y: &Tensor| {
            let ys = row_dots(y, s);
            ys.reciprocal().where_scalarother(&ys.ne(0.0), 0.0)
        };
        let mut q = -grad;
        let mut alphas = Vec::new();
        for (s, y) in pairs.iter().rev() {
            let alpha = row_dots(s, &q) * rho(s, y);
            q -= y * per_row(&alpha);
            alphas.push(alpha);
        }
        let mut r = q * per_row(gamma);
        for ((s, y), alpha) in pairs.iter().zip(alphas.into_iter().rev()) {
            let beta = row_dots(y, &r) * rho(s, y);
            r += s * per_row(&(alpha - beta));
        }
        r
    }

    /// A pair for a random convex quadratic's curvature (yᵀs > 0), rows `[B, n]` in f64.
    fn random_pair(draws: &mut crate::seeded::Draws, batch: i64, width: i64, hessian: &Tensor) -> (Tensor, Tensor) {
        let s = draws.normal(&[batch, width], (Kind::Double, Device::Cpu));
        let y = &s * hessian;
        (s, y)
    }

    /// A memory beside the pairs it should hold, kept explicitly (in f64) for the two-loop recursion,
    /// and the gradient, which changes by each pair's y.
    struct Checked {
        memory: Curvature,
        kept: VecDeque<(Tensor, Tensor)>,
        history: usize,
        grad: Tensor,
        /// How pairs are written: `None` as [`Curvature::push`] chooses.
        storing: Option<Storing>,
    }

    impl Checked {
        /// An empty memory, and a first gradient `grad` (rows `[B, n]`).
        fn new(history: usize, grad: Tensor) -> Self {
            let kind = grad.kind();
            Checked::stored_in(kind, history, grad)
        }

        /// [`Checked::new`] with the pairs stored in `kind`.
        fn stored_in(kind: Kind, history: usize, grad: Tensor) -> Self {
            let memory = Curvature::new(history, grad.size()[0], Device::Cpu, kind);
            Checked { memory, kept: VecDeque::new(), history, grad, storing: None }
        }

        /// Moves the gradient by y (rows `[B, n]`) and pushes (s, y) into both, as zeros for the
        /// items `refusing` it; the oldest goes from both when the memory is full.
        fn push(&mut self, s: &Tensor, y: &Tensor, refusing: &[i64], serial: u64) {
            self.grad = &self.grad + y;
            let taken = Tensor::ones([s.size()[0]], (Kind::Bool, Device::Cpu));
            for &item in refusing {
                let _ = taken.get(item).fill_(0i64);
            }
            let storing = self.storing.unwrap_or(Storing::for_pair(s));
            let products =
                (row_dots(y, s).where_scalarother(&taken, 0.0), row_dots(y, y).where_scalarother(&taken, 0.0));
            let _ = self.memory.push_storing(s, y, &taken, products, serial, storing);
            let (s, y) = (where_rows(s, &taken), where_rows(y, &taken));
            if self.kept.len() == self.history {
                self.kept.pop_front();
            }
            // the reference holds the pairs as the memory stores them
            let stored = |row: &Tensor| row.to_kind(self.memory.kind).to_kind(Kind::Double);
            self.kept.push_back((stored(&s), stored(&y)));
        }

        fn drop_oldest(&mut self) {
            self.memory.drop_oldest();
            self.kept.pop_front();
        }

        fn forget(&mut self, item: usize) {
            self.memory.forget(item);
            for (s, y) in &self.kept {
                let _ = s.narrow(0, item as i64, 1).fill_(0.0);
                let _ = y.narrow(0, item as i64, 1).fill_(0.0);
            }
        }

        /// The memory's direction for the gradient (read as `reading` says; `None`: as `direction`
        /// chooses) and the two-loop recursion's over the pairs kept, both in f64.
        fn directions(&mut self, gamma: &Tensor, reading: Option<Reading>) -> (Tensor, Tensor) {
            let grad = &self.grad;
            let compact = match reading {
                Some(reading) => self.memory.direction_reading(grad, gamma, reading),
                None => self.memory.direction(grad, gamma),
            };
            let reference = two_loop(self.kept.make_contiguous(), &grad.to_kind(Kind::Double), gamma);
            self.check_products();
            (compact.to_kind(Kind::Double), reference)
        }

        /// ‖compact − reference‖ / ‖reference‖ of [`Checked::directions`] as `direction` chooses to
        /// read, with H₀ = γI (one item).
        fn relative_error(&mut self, gamma: f64) -> f64 {
            let (compact, reference) = self.directions(&Tensor::from_slice(&[gamma]), None);
            (&compact - &reference).norm().double_value(&[]) / reference.norm().double_value(&[])
        }

        /// The memory's sᵢᵀyⱼ (i ≤ j) and yᵢᵀyⱼ are those of the pairs kept, as stored (zero
        /// where refused or forgotten), up to rounding: in bf16 also the newest y's rounding,
        /// which its products with the older pairs do not see (seen: 1.2·10⁻⁴ of the largest
        /// product at 4096 values).
        fn check_products(&self) {
            let tolerance = if self.memory.kind == Kind::BFloat16 { 1e-3 } else { 1e-4 };
            let (s, y): (Vec<Tensor>, Vec<Tensor>) =
                self.kept.iter().map(|(s, y)| (s.shallow_clone(), y.shallow_clone())).unzip();
            let (s, y) = (Tensor::stack(&s, 1), Tensor::stack(&y, 1));
            let s_y = s.bmm(&y.transpose(1, 2)).triu(0);
            let y_y = y.bmm(&y.transpose(1, 2));
            for (name, kept, expected) in [("sᵢᵀyⱼ", &self.memory.s_y, s_y), ("yᵢᵀyⱼ", &self.memory.y_y, y_y)]
            {
                let scale = expected.abs().max().double_value(&[]).max(1.0);
                let error = (kept - &expected).abs().max().double_value(&[]);
                assert!(error <= tolerance * scale, "{name}: {error} against {scale}");
            }
        }
    }

    /// `[B]` booleans, all true: every item accepts the pair.
    fn all(batch: i64) -> Tensor {
        Tensor::ones([batch], (Kind::Bool, Device::Cpu))
    }

    /// Rows `[B, n]` where `taken` `[B]` holds, zeros elsewhere.
    fn where_rows(rows: &Tensor, taken: &Tensor) -> Tensor {
        rows.where_scalarother(&per_row(taken), 0.0)
    }

    /// Pushes `pushes` random pairs into a memory of `history` for `batch` items (item 0 refuses
    /// every fourth; `forget` lists (push, item) to forget before a push), takes a direction after
    /// each push, and checks every one against the two-loop recursion over the pairs kept.
    fn matches_two_loop(history: usize, pushes: usize, batch: i64, forget: &[(usize, usize)], reading: Reading) {
        let mut draws = crate::seeded::Draws::new(7);
        let width = 37;
        let hessian = draws.uniform(&[batch, width], (Kind::Double, Device::Cpu)) + 0.1;
        let mut checked = Checked::new(history, draws.normal(&[batch, width], (Kind::Double, Device::Cpu)));
        for serial in 0..pushes {
            for &(_, item) in forget.iter().filter(|(at, _)| *at == serial) {
                checked.forget(item);
            }
            let (s, y) = random_pair(&mut draws, batch, width, &hessian);
            // item 0 refuses every fourth pair
            let refusing: &[i64] = if serial % 4 == 3 { &[0] } else { &[] };
            checked.push(&s, &y, refusing, serial as u64);
            let gamma = draws.uniform(&[batch], (Kind::Double, Device::Cpu)) + 0.5;
            let (compact, reference) = checked.directions(&gamma, Some(reading));
            let error = (&compact - &reference).abs().max().double_value(&[]);
            let scale = reference.abs().max().double_value(&[]);
            assert!(error <= 1e-9 * scale, "push {serial}: {error} against {scale}");
            assert_eq!(checked.memory.len(), checked.kept.len());
        }
    }

    #[test]
    fn the_compact_form_is_the_two_loop_recursion() {
        // 20 pairs in chunks of 8, 8 and 4; the ring turns over after the 20th
        matches_two_loop(20, 45, 2, &[], Reading::MatrixProducts);
    }

    #[test]
    fn a_memory_smaller_than_a_chunk_turns_over() {
        matches_two_loop(3, 10, 1, &[], Reading::MatrixProducts);
    }

    #[test]
    fn forgotten_items_and_refused_pairs_are_no_ops() {
        matches_two_loop(12, 30, 3, &[(5, 1), (17, 2), (18, 1)], Reading::MatrixProducts);
    }

    #[test]
    fn matrix_vector_products_give_the_same_steps() {
        matches_two_loop(20, 45, 2, &[], Reading::MatrixVectorProducts);
        matches_two_loop(10, 14, 2, &[(6, 0)], Reading::MatrixVectorProducts);
    }

    #[test]
    fn a_memory_emptied_and_filled_again_matches_the_two_loop_recursion() {
        // history 20: emptied at the 12th push, while two chunks (16 slots) hold 11 pairs; the
        // ring starts again at slot 0 and grows a third chunk later
        let mut draws = crate::seeded::Draws::new(5);
        let hessian = draws.uniform(&[2, 11], (Kind::Double, Device::Cpu)) + 0.1;
        let mut checked = Checked::new(20, draws.normal(&[2, 11], (Kind::Double, Device::Cpu)));
        for serial in 0..40u64 {
            if serial == 11 {
                while checked.memory.len() > 0 {
                    checked.drop_oldest();
                }
                assert!(checked.kept.is_empty());
                assert_eq!(checked.memory.start, 0);
            }
            let (s, y) = random_pair(&mut draws, 2, 11, &hessian);
            checked.push(&s, &y, &[], serial);
            let gamma = Tensor::from_slice(&[0.7f64, 2.0]);
            let (compact, reference) = checked.directions(&gamma, None);
            assert!(compact.allclose(&reference, 1e-9, 1e-12, false), "push {serial}");
        }
        assert_eq!(checked.memory.capacity(), 20);
    }

    #[test]
    fn turning_the_ring_puts_the_oldest_pair_in_slot_0() {
        // full rings of 8 and 16 slots started at 5, 6, 8 and 9 (one, two, eight and one cycles)
        for (history, start) in [(16usize, 5usize), (24, 6), (24, 8), (24, 9)] {
            let mut memory = Curvature::new(history, 1, Device::Cpu, Kind::Double);
            let pair = |serial: u64| {
                let s = Tensor::full([1, 3], serial as f64, (Kind::Double, Device::Cpu));
                (s.shallow_clone(), -s)
            };
            let push = |memory: &mut Curvature, serial: u64| {
                let (s, y) = pair(serial);
                let _ = memory.push(&s, &y, &all(1), row_dots(&y, &s), row_dots(&y, &y), serial);
                let _ = memory.direction(&s, &Tensor::ones([1], (Kind::Double, Device::Cpu)));
            };
            // fill `history - 8` slots, drop `start` of them, fill the ring: it starts at `start`
            let filled = (history - CHUNK_PAIRS) as u64;
            (0..filled).for_each(|serial| push(&mut memory, serial));
            (0..start).for_each(|_| memory.drop_oldest());
            let next = filled + (memory.capacity() - memory.len()) as u64;
            (filled..next).for_each(|serial| push(&mut memory, serial));
            assert_eq!((memory.start, memory.len(), memory.capacity()), (start, history - CHUNK_PAIRS, history - 8));
            memory.turn_to_start();
            for slot in 0..memory.len() {
                let [s, _] = memory.pair_at(slot);
                assert_eq!(
                    s.double_value(&[0, 0, 0]),
                    (start + slot) as f64,
                    "ring {history} from {start}: slot {slot}"
                );
            }
        }
    }

    #[test]
    fn in_float32_the_steps_agree_with_the_two_loop_recursion_to_its_rounding() {
        // the matrix-vector products in IEEE float32, whatever another test holds meanwhile
        let _ieee = crate::device::products::hold_ieee(Device::Cpu);
        // 4096-wide f32 pairs of a quadratic whose curvatures span 10⁻³…1, every pair after the
        // first nearly along the one before (cosine about 0.99); the reference runs in f64 on the
        // same f32 values
        let mut draws = crate::seeded::Draws::new(9);
        let options = (Kind::Float, Device::Cpu);
        let hessian = (draws.uniform(&[1, 4096], options) * -3.0 * 10f64.ln()).exp();
        let mut checked = Checked::new(10, draws.normal(&[1, 4096], options));
        let mut previous = draws.normal(&[1, 4096], options);
        for serial in 0..25u64 {
            let s = &previous + draws.normal(&[1, 4096], options) * 0.15;
            let y = &s * &hessian;
            previous = s.shallow_clone();
            checked.push(&s, &y, &[], serial);
            let error = checked.relative_error(0.3);
            assert!(error < 1e-4, "push {serial}: relative error {error}");
        }
    }

    #[test]
    fn in_float32_a_gradient_that_barely_changes_still_gives_the_steps() {
        // the newest y's products with the older pairs are differences of products with gradients
        // a thousand times longer than y: their rounding must not spoil the step
        let _ieee = crate::device::products::hold_ieee(Device::Cpu);
        let mut draws = crate::seeded::Draws::new(11);
        let options = (Kind::Float, Device::Cpu);
        let hessian = (draws.uniform(&[1, 4096], options) * -2.0 * 10f64.ln()).exp();
        let mut checked = Checked::new(10, draws.normal(&[1, 4096], options) * 300.0);
        for serial in 0..25u64 {
            let s = draws.normal(&[1, 4096], options);
            let y = &s * &hessian;
            checked.push(&s, &y, &[], serial);
            let error = checked.relative_error(0.3);
            assert!(error < 1e-4, "push {serial}: relative error {error}");
        }
    }

    #[test]
    fn a_ring_that_wraps_while_growing_is_turned_to_slot_0() {
        // history 20: at the 11th push the 6 oldest of 10 pairs go (as dead pairs do), so the ring
        // starts at slot 6 and wraps past the 16 slots of two chunks before a third chunk is added
        let mut draws = crate::seeded::Draws::new(3);
        let hessian = draws.uniform(&[1, 9], (Kind::Double, Device::Cpu)) + 0.1;
        let mut checked = Checked::new(20, draws.normal(&[1, 9], (Kind::Double, Device::Cpu)));
        for serial in 0..25u64 {
            if serial == 10 {
                for _ in 0..6 {
                    checked.drop_oldest();
                }
            }
            let (s, y) = random_pair(&mut draws, 1, 9, &hessian);
            checked.push(&s, &y, &[], serial);
            let gamma = Tensor::from_slice(&[1.3f64]);
            let (compact, reference) = checked.directions(&gamma, None);
            assert!(compact.allclose(&reference, 1e-9, 1e-12, false), "push {serial}");
        }
        assert_eq!((checked.memory.len(), checked.memory.oldest_serial()), (19, Some(6)));
        assert_eq!(checked.memory.capacity(), 20);
    }

    /// Pushes 25 pairs of a 4096-wide f32 quadratic (curvatures 10⁻³…1) into a memory of 10 pairs
    /// stored in `kind`, written as `storing` says (`None`: as `push` chooses) and read as
    /// `reading` says; each step must be the two-loop recursion's over the pairs as stored, up to
    /// f32 rounding and, in bf16, the newest y's rounding, which its products with the older pairs
    /// do not see (seen: 1.1·10⁻⁴; a pair misplaced gives errors of order 1). A forgotten item and
    /// refused pairs ride along.
    fn pairs_match_two_loop(kind: Kind, storing: Option<Storing>, reading: Option<Reading>) {
        let _ieee = crate::device::products::hold_ieee(Device::Cpu);
        let mut draws = crate::seeded::Draws::new(13);
        let options = (Kind::Float, Device::Cpu);
        let hessian = (draws.uniform(&[2, 4096], options) * -3.0 * 10f64.ln()).exp();
        let mut checked = Checked::stored_in(kind, 10, draws.normal(&[2, 4096], options));
        checked.storing = storing;
        let bound = if kind == Kind::BFloat16 { 1e-3 } else { 1e-4 };
        for serial in 0..25u64 {
            if serial == 12 {
                checked.forget(1);
            }
            let s = draws.normal(&[2, 4096], options);
            let y = &s * &hessian;
            let refusing: &[i64] = if serial % 4 == 3 { &[0] } else { &[] };
            checked.push(&s, &y, refusing, serial);
            let gamma = Tensor::from_slice(&[0.3f64, 1.7]);
            let (compact, reference) = checked.directions(&gamma, reading);
            let error = (&compact - &reference).norm().double_value(&[]) / reference.norm().double_value(&[]);
            assert!(error < bound, "push {serial}: relative error {error}");
        }
        assert_eq!(checked.memory.chunks[0].kind(), kind);
    }

    /// [`pairs_match_two_loop`] in bf16.
    fn bf16_pairs_match_two_loop(storing: Option<Storing>, reading: Option<Reading>) {
        pairs_match_two_loop(Kind::BFloat16, storing, reading);
    }

    #[test]
    fn f32_pairs_written_item_by_item_or_by_masks_give_the_same_steps() {
        assert_eq!(Storing::for_pair(&Tensor::zeros([1, 4], (Kind::Float, Device::Cpu))), expected_storing());
        pairs_match_two_loop(Kind::Float, Some(Storing::Operations), None);
        pairs_match_two_loop(Kind::Float, Some(Storing::Kernels), None);
    }

    /// How the CPU writes f32 pairs in this build.
    fn expected_storing() -> Storing {
        if bf16_rows::available() { Storing::Kernels } else { Storing::Operations }
    }

    #[test]
    fn pairs_stored_in_bf16_give_the_steps_of_the_rounded_pairs() {
        // on the CPU: widened as they stream past where this build can, else chunk by chunk
        let f32_grad = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
        let expected = if bf16_rows::available() { Reading::Bf16Rows } else { Reading::MatrixVectorProducts };
        assert_eq!(Reading::for_memory(Kind::BFloat16, &f32_grad), expected);
        assert_eq!(Reading::for_memory(Kind::Float, &f32_grad), Reading::MatrixVectorProducts);
        assert_eq!(Storing::for_pair(&f32_grad), expected_storing());
        bf16_pairs_match_two_loop(None, None);
    }

    #[test]
    fn pairs_stored_in_bf16_read_by_widened_chunks_give_the_same_steps() {
        // the path a GPU takes: each chunk widened to f32, then matrix products
        bf16_pairs_match_two_loop(Some(Storing::Operations), Some(Reading::MatrixProducts));
        bf16_pairs_match_two_loop(Some(Storing::Operations), Some(Reading::MatrixVectorProducts));
    }

    /// Both ways of writing a pair.
    const STORINGS: [Storing; 2] = [Storing::Kernels, Storing::Operations];

    /// Pushes (s, y) accepted by every item, written as `storing` says.
    fn push_by(memory: &mut Curvature, s: &Tensor, y: &Tensor, storing: Storing) -> Tensor {
        let products = (row_dots(y, s), row_dots(y, y));
        memory.push_storing(s, y, &all(s.size()[0]), products, 0, storing)
    }

    #[test]
    fn an_item_refusing_a_pair_leaves_zeros_where_an_older_pair_lay() {
        for (kind, storing) in [Kind::Float, Kind::BFloat16].into_iter().flat_map(|kind| STORINGS.map(|s| (kind, s))) {
            // a memory of one pair: the second pair takes the first one's slot
            let mut memory = Curvature::new(1, 2, Device::Cpu, kind);
            let s = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
            let _ = push_by(&mut memory, &s, &(&s * 2.0), storing);
            let _ = memory.direction(&s, &Tensor::ones([2], (Kind::Double, Device::Cpu)));
            let accept = Tensor::from_slice(&[false, true]);
            let (ys, yy) = (Tensor::from_slice(&[0.0, 75.0]), Tensor::from_slice(&[0.0, 225.0]));
            let taken = memory.push_storing(&s, &(&s * 3.0), &accept, (ys, yy), 1, storing);
            assert_eq!(Vec::<bool>::try_from(&taken).unwrap(), [false, true], "{kind:?} by {storing:?}");
            let [s_row, y_row] = memory.pair_at(0);
            let stored = Tensor::cat(&[s_row, y_row], 1).to_kind(Kind::Float);
            let expected = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 0.0, 3.0, 4.0, 9.0, 12.0]).view([2, 2, 2]);
            assert!(stored.equal(&expected), "{kind:?} by {storing:?}: {stored:?}");
        }
    }

    #[test]
    fn a_pair_whose_curvature_rounds_away_in_bf16_is_refused() {
        for storing in STORINGS {
            a_pair_rounded_away_is_refused(storing);
        }
    }

    fn a_pair_rounded_away_is_refused(storing: Storing) {
        let options = (Kind::Float, Device::Cpu);
        let mut memory = Curvature::new(4, 2, Device::Cpu, Kind::BFloat16);
        // item 0: yᵀs = 2⁻⁹ in f32, but 1 + 2⁻⁹ rounds to 1 in bf16, so the stored yᵀs is 0;
        // item 1: a plain pair, kept
        let s = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 0.5]).view([2, 2]);
        let y = Tensor::from_slice(&[1.0f32 + 1.0 / 512.0, -1.0, 2.0, 1.0]).view([2, 2]);
        let taken = push_by(&mut memory, &s, &y, storing);
        assert_eq!(Vec::<bool>::try_from(&taken).unwrap(), [false, true], "by {storing:?}");
        let gradient = Tensor::ones([2, 2], options);
        let _ = memory.direction(&gradient, &Tensor::ones([2], (Kind::Double, Device::Cpu)));
        let [s_row, y_row] = memory.pair_at(0);
        assert_eq!(
            (
                s_row.get(0).abs().sum(Kind::Double).double_value(&[]),
                y_row.get(0).abs().sum(Kind::Double).double_value(&[])
            ),
            (0.0, 0.0)
        );
        assert_eq!((memory.s_y.double_value(&[0, 0, 0]), memory.y_y.double_value(&[0, 0, 0])), (0.0, 0.0));
        assert_eq!((memory.s_y.double_value(&[1, 0, 0]), memory.y_y.double_value(&[1, 0, 0])), (2.5, 5.0));
    }

    #[test]
    fn a_bf16_pair_keeps_the_products_of_its_rounded_values() {
        let options = (Kind::Float, Device::Cpu);
        for storing in STORINGS {
            let mut memory = Curvature::new(4, 1, Device::Cpu, Kind::BFloat16);
            // 1 + 2⁻¹⁰ rounds to 1 in bf16: the stored yᵀs is 3·1·1, not 3·(1 + 2⁻¹⁰)
            let s = Tensor::ones([1, 3], options);
            let y = Tensor::full([1, 3], 1.0 + 1.0 / 1024.0, options);
            let _ = push_by(&mut memory, &s, &y, storing);
            let _ = memory.direction(&s, &Tensor::ones([1], (Kind::Double, Device::Cpu)));
            assert_eq!(memory.s_y.double_value(&[0, 0, 0]), 3.0, "by {storing:?}");
            assert_eq!(memory.y_y.double_value(&[0, 0, 0]), 3.0, "by {storing:?}");
        }
    }
}
