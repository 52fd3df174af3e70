// The precision of libtorch's oneDNN matrix products on float32 CPU tensors, which tch does not
// expose: IEEE float32, or bf16 inputs allowed with float32 accumulation (libtorch's "bf16" float32
// precision for oneDNN matrix products). libtorch takes the permission only where oneDNN supports
// bf16 on the CPU (AVX-512 BW/VL/DQ or AVX-NE-CONVERT, so also CPUs without bf16 instructions, where
// it would emulate them: the caller asks only on CPUs with them). Compiled against libtorch's headers
// like the TF32 switches. The setting is one value in libtorch's global context, read by every f32
// product on every thread without a lock; the caller serialises its changes and keeps them to the
// moments no product of the other mode runs.

#include <ATen/Context.h>

// Sets bf16 (1) or IEEE float32 (0) products. Returns 0 on success and -1 when libtorch refused.
extern "C" int impasto_set_cpu_products_bf16(int bf16) {
  try {
    at::globalContext().setFloat32Precision(
        at::Float32Backend::MKLDNN, at::Float32Op::MATMUL,
        bf16 != 0 ? at::Float32Precision::BF16 : at::Float32Precision::IEEE);
    return 0;
  } catch (...) {
    return -1;
  }
}

// 1 when the products are set to bf16, 0 when not, -1 when libtorch refused to say.
extern "C" int impasto_cpu_products_bf16() {
  try {
    auto precision = at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
    return precision == at::Float32Precision::BF16 ? 1 : 0;
  } catch (...) {
    return -1;
  }
}
