// TF32 switches of libtorch's global context, which tch does not expose: whether cuDNN convolutions
// and cuBLAS matrix products on float32 tensors may use TF32 tensor cores. Compiled against the
// headers of the libtorch that the program links, like tch's own C++ layer, so the calls are checked
// by the compiler and the linker rather than looked up by name at run time.

#include <ATen/Context.h>

// Allows (1) or forbids (0) TF32 for cuDNN convolutions and cuBLAS matrix products.
// Returns 0 on success and -1 when libtorch refused.
extern "C" int impasto_set_tf32(int allowed) {
  try {
    at::globalContext().setAllowTF32CuDNN(allowed != 0);
    at::globalContext().setAllowTF32CuBLAS(allowed != 0);
    return 0;
  } catch (...) {
    return -1;
  }
}

// Whether TF32 is allowed: bit 0 for cuDNN convolutions, bit 1 for cuBLAS matrix products;
// -1 when libtorch refused to say.
extern "C" int impasto_tf32_allowed() {
  try {
    int conv = at::globalContext().allowTF32CuDNN(at::Float32Op::CONV) ? 1 : 0;
    int matmul = at::globalContext().allowTF32CuBLAS() ? 2 : 0;
    return conv | matmul;
  } catch (...) {
    return -1;
  }
}
