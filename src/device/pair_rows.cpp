// L-BFGS's per-iteration passes over whole images on the CPU, each fused into one read: the new
// curvature pair's dot products (yᵀs, yᵀy, sᵀs and the old gradient's gᵀg, which its tests need),
// the pair stored rounded to bf16 together with the rounded pair's own products, and the proposal's
// gᵀd and ‖g‖₁. As separate libtorch operations these took a temporary image per product and a
// reduction over it; with a memory of a few pairs they cost more than reading the pairs themselves.
//
// Like bf16_rows.cpp (built with it, on OpenMP): the columns go in blocks split among the threads;
// within a block the terms sum in float32 lanes, flushed to double every few columns, and the
// blocks' sums add in double in a fixed order, so the results do not depend on the thread count. The
// rounding to bf16 is libtorch's (to nearest, ties to even), bit for bit but for a NaN's payload.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Columns per block: three float32 streams of 128 KiB, inside any L2 cache.
constexpr int64_t kBlock = 32768;
// Float32 lanes of the partial sums: a whole AVX-512 register, two AVX2 ones.
constexpr int64_t kLanes = 16;
// Columns summed in float32 before the lanes flush to double: sixteen terms per lane.
constexpr int64_t kRun = 256;

#if defined(__x86_64__) && defined(__GNUC__)
#define IMPASTO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IMPASTO_CLONES
#endif

inline float widen(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

// `value` rounded to bf16 (raw bits) as c10::BFloat16 rounds it.
inline uint16_t round_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint32_t rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16;
  return value != value ? uint16_t(0x7FC0) : uint16_t(rounded);
}

// Float32 lanes of `Sums` running sums, flushed into double lanes.
template <int Sums>
struct Lanes {
  float run[Sums][kLanes] = {};
  double total[Sums][kLanes] = {};

  void flush() {
    for (int sum = 0; sum < Sums; ++sum) {
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        total[sum][lane] += run[sum][lane];
        run[sum][lane] = 0.0f;
      }
    }
  }

  // sums[k] += lanes of sum k, in order, plus the tail's terms `tail[k]`.
  void add_to(double* sums, const double* tail) {
    flush();
    for (int sum = 0; sum < Sums; ++sum) {
      double value = tail[sum];
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        value += total[sum][lane];
      }
      sums[sum] += value;
    }
  }
};

// sums[0..4) += yᵀs, yᵀy, sᵀs, gᵀg over `count` columns.
IMPASTO_CLONES
void block_pair_dots(const float* __restrict s, const float* __restrict y, const float* __restrict g, int64_t count,
                     double* sums) {
  Lanes<4> lanes;
  int64_t column = 0;
  for (; column + kRun <= count; column += kRun) {
#pragma GCC unroll 1
    for (int64_t run = column; run < column + kRun; run += kLanes) {
#pragma omp simd
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        const float sv = s[run + lane], yv = y[run + lane], gv = g[run + lane];
        lanes.run[0][lane] += yv * sv;
        lanes.run[1][lane] += yv * yv;
        lanes.run[2][lane] += sv * sv;
        lanes.run[3][lane] += gv * gv;
      }
    }
    lanes.flush();
  }
  double tail[4] = {};
  for (; column < count; ++column) {
    const double sv = s[column], yv = y[column], gv = g[column];
    tail[0] += yv * sv;
    tail[1] += yv * yv;
    tail[2] += sv * sv;
    tail[3] += gv * gv;
  }
  lanes.add_to(sums, tail);
}

// Stores `count` columns of s and y rounded to bf16; sums[0..3) += the rounded yᵀs, yᵀy, sᵀs.
IMPASTO_CLONES
void block_store_bf16(const float* __restrict s, const float* __restrict y, uint16_t* __restrict s_row,
                      uint16_t* __restrict y_row, int64_t count, double* sums) {
  Lanes<3> lanes;
  int64_t column = 0;
  for (; column + kRun <= count; column += kRun) {
#pragma GCC unroll 1
    for (int64_t run = column; run < column + kRun; run += kLanes) {
#pragma omp simd
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        const uint16_t s_bits = round_to_bf16(s[run + lane]), y_bits = round_to_bf16(y[run + lane]);
        s_row[run + lane] = s_bits;
        y_row[run + lane] = y_bits;
        const float sv = widen(s_bits), yv = widen(y_bits);
        lanes.run[0][lane] += yv * sv;
        lanes.run[1][lane] += yv * yv;
        lanes.run[2][lane] += sv * sv;
      }
    }
    lanes.flush();
  }
  double tail[3] = {};
  for (; column < count; ++column) {
    s_row[column] = round_to_bf16(s[column]);
    y_row[column] = round_to_bf16(y[column]);
    const double sv = widen(s_row[column]), yv = widen(y_row[column]);
    tail[0] += yv * sv;
    tail[1] += yv * yv;
    tail[2] += sv * sv;
  }
  lanes.add_to(sums, tail);
}

// sums[0..2) += gᵀd and Σ|g| over `count` columns.
IMPASTO_CLONES
void block_descent_dots(const float* __restrict g, const float* __restrict d, int64_t count, double* sums) {
  Lanes<2> lanes;
  int64_t column = 0;
  for (; column + kRun <= count; column += kRun) {
#pragma GCC unroll 1
    for (int64_t run = column; run < column + kRun; run += kLanes) {
#pragma omp simd
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        const float gv = g[run + lane];
        lanes.run[0][lane] += gv * d[run + lane];
        lanes.run[1][lane] += std::fabs(gv);
      }
    }
    lanes.flush();
  }
  double tail[2] = {};
  for (; column < count; ++column) {
    tail[0] += double(g[column]) * d[column];
    tail[1] += std::fabs(double(g[column]));
  }
  lanes.add_to(sums, tail);
}

// Runs `block(begin, count, partial sums of that block)` over the blocks of `width` columns on
// OpenMP's threads, then adds the blocks' `Sums` partial sums into `sums` in block order.
template <int Sums, class Block>
int over_blocks(int64_t width, double* sums, const Block& block) {
  try {
    const int64_t blocks = (width + kBlock - 1) / kBlock;
    std::vector<double> partial(size_t(blocks * Sums), 0.0);
#pragma omp parallel for schedule(static)
    for (int64_t index = 0; index < blocks; ++index) {
      const int64_t begin = index * kBlock;
      block(begin, std::min(kBlock, width - begin), &partial[size_t(index * Sums)]);
    }
    for (int sum = 0; sum < Sums; ++sum) {
      double value = 0.0;
      for (int64_t index = 0; index < blocks; ++index) {
        value += partial[size_t(index * Sums + sum)];
      }
      sums[sum] = value;
    }
    return 0;
  } catch (...) {
    return -1;
  }
}

}  // namespace

// products[0..4) = yᵀs, yᵀy, sᵀs, gᵀg of float32 vectors of `width` values. Returns 0, or -1 where
// the partial sums could not be allocated.
extern "C" int impasto_pair_dots(const float* s, const float* y, const float* g, int64_t width, double* products) {
  return over_blocks<4>(width, products, [=](int64_t begin, int64_t count, double* sums) {
    block_pair_dots(s + begin, y + begin, g + begin, count, sums);
  });
}

// Writes float32 s and y of `width` values rounded to bf16 (raw bits) into s_row and y_row, and
// products[0..3) = yᵀs, yᵀy, sᵀs of the rounded values. Returns 0, or -1 as above.
extern "C" int impasto_store_bf16_pair(const float* s, const float* y, int64_t width, uint16_t* s_row, uint16_t* y_row,
                                       double* products) {
  return over_blocks<3>(width, products, [=](int64_t begin, int64_t count, double* sums) {
    block_store_bf16(s + begin, y + begin, s_row + begin, y_row + begin, count, sums);
  });
}

// products[0..2) = gᵀd and Σ|g| of float32 vectors of `width` values. Returns 0, or -1 as above.
extern "C" int impasto_descent_dots(const float* g, const float* d, int64_t width, double* products) {
  return over_blocks<2>(width, products, [=](int64_t begin, int64_t count, double* sums) {
    block_descent_dots(g + begin, d + begin, count, sums);
  });
}
