// Whether a CUDA device runs bfloat16 convolutions natively, as libtorch itself decides it (cuDNN
// present and compute capability 8.0 or newer). Compiled against libtorch's headers like the TF32
// switches; needs no CUDA header: libtorch's CUDA hooks answer for the current device, and c10's
// device guard (through the registry libtorch_cuda fills) makes the asked device current meanwhile.

#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/DeviceGuard.h>

// 1 when bf16 convolutions are native on CUDA device `index`, 0 when not (or no CUDA backend is
// loaded), -1 when libtorch refused to say (no such device, among others).
extern "C" int impasto_cuda_bf16_native(int index) {
  try {
    c10::DeviceGuard on_device(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index)));
    return at::detail::getCUDAHooks().supportsBFloat16ConvolutionWithCuDNNv8() ? 1 : 0;
  } catch (...) {
    return -1;
  }
}
