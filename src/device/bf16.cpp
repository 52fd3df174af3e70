// Whether the current CUDA device runs bfloat16 convolutions natively, as libtorch itself decides it
// (cuDNN present and compute capability 8.0 or newer). Compiled against libtorch's headers like the
// TF32 switches; needs no CUDA header, since it asks libtorch's CUDA hooks.

#include <ATen/detail/CUDAHooksInterface.h>

// 1 when bf16 convolutions are native on the current CUDA device, 0 when not (or no CUDA backend is
// loaded), -1 when libtorch refused to say.
extern "C" int impasto_cuda_bf16_native() {
  try {
    return at::detail::getCUDAHooks().supportsBFloat16ConvolutionWithCuDNNv8() ? 1 : 0;
  } catch (...) {
    return -1;
  }
}
