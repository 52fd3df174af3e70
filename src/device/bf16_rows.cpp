// Rows stored in bf16 against float32 vectors on the CPU: their dot products with a vector, and a
// vector plus a combination of them. L-BFGS keeps its curvature pairs this way (half the bytes of
// float32), and reading them is bound by memory bandwidth, so the rows are widened to float32 as they
// stream past, never copied. libtorch has no such product on the CPU: a bf16 matrix-vector product
// there rounds its result to bf16, and widening a chunk first writes and reads it again in float32.
//
// Both walk the columns in blocks small enough that a block of the vector (or of the sum) stays in
// the L2 cache while the rows pass it, eight rows at a time: eight streams from memory at once keep
// more reads in flight than one. One row at a time read half as many bytes per second as the BLAS's
// float32 product, which reads several rows at once; four at a time was 5–20 % slower than eight.
// The blocks are split among the threads of OpenMP, the runtime libtorch ships and runs its own
// kernels on, so they do not fight its pool, and the calling thread's OpenMP thread count holds as
// for libtorch's kernels (`device::threads` limits it per thread; at::parallel_for, compiled in here,
// would reset it to the process's count at its first call on a thread). Products sum in float32
// lanes within a block and in double across blocks, in a fixed order: the result does not depend on
// the thread count. The loops are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 and FMA) and
// baseline x86-64, and the loader picks by the CPU's features at start.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Columns per block: 128 KiB of float32, well inside any L2 cache.
constexpr int64_t kBlock = 32768;
// Rows read at once: a chunk of L-BFGS's memory holds 8 s and 8 y. The kernels spell them out.
constexpr int64_t kRows = 8;
// Float32 lanes of each row's partial sums: a whole AVX-512 register, two AVX2 ones.
constexpr int64_t kLanes = 16;

inline float widen(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define IMPASTO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IMPASTO_CLONES
#endif

// Declares r0 … r7, the kRows rows of a group, one by one as restricted pointers, so that the
// compiler vectorises the loops over them.
#define IMPASTO_GROUP_ROWS(rows)                 \
  const uint16_t* __restrict r0 = (rows)[0]; \
  const uint16_t* __restrict r1 = (rows)[1]; \
  const uint16_t* __restrict r2 = (rows)[2]; \
  const uint16_t* __restrict r3 = (rows)[3]; \
  const uint16_t* __restrict r4 = (rows)[4]; \
  const uint16_t* __restrict r5 = (rows)[5]; \
  const uint16_t* __restrict r6 = (rows)[6]; \
  const uint16_t* __restrict r7 = (rows)[7]

// sums[r] += the dot product of `count` bf16 values of row r with `count` float32 ones, r < kRows.
IMPASTO_CLONES
void block_dots(const uint16_t* const* rows, const float* __restrict vector, int64_t count, double* sums) {
  IMPASTO_GROUP_ROWS(rows);
  float lanes[kRows][kLanes] = {};
  int64_t column = 0;
  for (; column + kLanes <= count; column += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      const int64_t at = column + lane;
      const float value = vector[at];
      lanes[0][lane] += widen(r0[at]) * value;
      lanes[1][lane] += widen(r1[at]) * value;
      lanes[2][lane] += widen(r2[at]) * value;
      lanes[3][lane] += widen(r3[at]) * value;
      lanes[4][lane] += widen(r4[at]) * value;
      lanes[5][lane] += widen(r5[at]) * value;
      lanes[6][lane] += widen(r6[at]) * value;
      lanes[7][lane] += widen(r7[at]) * value;
    }
  }
  for (int row = 0; row < kRows; ++row) {
    double sum = 0.0;
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      sum += lanes[row][lane];
    }
    for (int64_t tail = column; tail < count; ++tail) {
      sum += double(widen(rows[row][tail])) * vector[tail];
    }
    sums[row] += sum;
  }
}

// sum[0..count) += Σᵣ coefficients[r] · row r [0..count), r < kRows; spelt out as `block_dots`.
IMPASTO_CLONES
void block_adds(float* __restrict sum, const float* coefficients, const uint16_t* const* rows, int64_t count) {
  IMPASTO_GROUP_ROWS(rows);
  const float c0 = coefficients[0], c1 = coefficients[1], c2 = coefficients[2], c3 = coefficients[3];
  const float c4 = coefficients[4], c5 = coefficients[5], c6 = coefficients[6], c7 = coefficients[7];
  for (int64_t at = 0; at < count; ++at) {
    const float low = c0 * widen(r0[at]) + c1 * widen(r1[at]) + c2 * widen(r2[at]) + c3 * widen(r3[at]);
    const float high = c4 * widen(r4[at]) + c5 * widen(r5[at]) + c6 * widen(r6[at]) + c7 * widen(r7[at]);
    sum[at] += low + high;
  }
}

int64_t blocks_for(int64_t width) {
  return (width + kBlock - 1) / kBlock;
}

}  // namespace

// products[r] = Σⱼ rows[r·width + j] · vector[j] for r < row_count, rows in bf16 (raw bits),
// vector float32, products double. Returns 0, or -1 where the partial sums could not be allocated.
extern "C" int impasto_bf16_rows_times_vector(const uint16_t* rows, int64_t row_count, int64_t width,
                                              const float* vector, double* products) {
  try {
    const int64_t blocks = blocks_for(width);
    // rows padded to whole groups (repeating the last row), so every group reads eight
    const int64_t padded = (row_count + kRows - 1) / kRows * kRows;
    std::vector<double> partial(size_t(blocks * padded), 0.0);
#pragma omp parallel for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t begin = block * kBlock, count = std::min(kBlock, width - begin);
      for (int64_t group = 0; group < padded; group += kRows) {
        const uint16_t* row[kRows];
        for (int64_t r = 0; r < kRows; ++r) {
          row[r] = rows + std::min(group + r, row_count - 1) * width + begin;
        }
        block_dots(row, vector + begin, count, &partial[size_t(block * padded + group)]);
      }
    }
    for (int64_t row = 0; row < row_count; ++row) {
      double sum = 0.0;
      for (int64_t block = 0; block < blocks; ++block) {
        sum += partial[size_t(block * padded + row)];
      }
      products[row] = sum;
    }
    return 0;
  } catch (...) {
    return -1;
  }
}

// sum[j] += Σᵣ coefficients[r] · rows[r·width + j] for j < width, rows in bf16 (raw bits), sum and
// coefficients float32; rows whose coefficient is zero are skipped. Returns 0, or -1 where the list
// of rows could not be allocated.
extern "C" int impasto_add_bf16_rows(float* sum, const float* coefficients, const uint16_t* rows, int64_t row_count,
                                     int64_t width) {
  try {
    std::vector<int64_t> used;
    for (int64_t row = 0; row < row_count; ++row) {
      if (coefficients[row] != 0.0f) {
        used.push_back(row);
      }
    }
    if (used.empty()) {
      return 0;
    }
    const int64_t blocks = blocks_for(width);
#pragma omp parallel for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t begin = block * kBlock, count = std::min(kBlock, width - begin);
      for (size_t group = 0; group < used.size(); group += kRows) {
        // a group short of eight rows repeats its first with a zero coefficient
        const uint16_t* row[kRows];
        float c[kRows];
        for (size_t r = 0; r < size_t(kRows); ++r) {
          const bool real = group + r < used.size();
          row[r] = rows + used[real ? group + r : group] * width + begin;
          c[r] = real ? coefficients[used[group + r]] : 0.0f;
        }
        block_adds(sum + begin, c, row, count);
      }
    }
    return 0;
  } catch (...) {
    return -1;
  }
}
