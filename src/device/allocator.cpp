// Peak statistics of libtorch's CUDA caching allocator, which tch does not expose: the most memory
// the tensors ever held on a device (allocated) and the most the allocator kept from the driver
// (reserved), and a reset of both. Reached through c10's device-generic allocator interface, so no
// CUDA header is needed to compile it and a CPU-only process simply gets "unavailable".

#include <c10/core/CachingDeviceAllocator.h>

#include <cstdint>

namespace {

// The CUDA allocator when libtorch's CUDA backend is loaded and has started, else nullptr.
c10::DeviceAllocator* cuda_allocator() {
  auto* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
  return allocator != nullptr && allocator->initialized() ? allocator : nullptr;
}

constexpr auto kAggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);

}  // namespace

// Writes the peak allocated and reserved bytes of CUDA device `device`; returns 0, or -1 when there
// is no CUDA allocator (no CUDA backend, not started) or libtorch refused.
extern "C" int impasto_cuda_allocator_peaks(int device, int64_t* allocated, int64_t* reserved) {
  try {
    auto* allocator = cuda_allocator();
    if (allocator == nullptr) {
      return -1;
    }
    auto stats = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    *allocated = stats.allocated_bytes[kAggregate].peak;
    *reserved = stats.reserved_bytes[kAggregate].peak;
    return 0;
  } catch (...) {
    return -1;
  }
}

// Starts the peaks of CUDA device `device` again from what is held now; 0, or -1 as above.
extern "C" int impasto_cuda_allocator_reset_peaks(int device) {
  try {
    auto* allocator = cuda_allocator();
    if (allocator == nullptr) {
      return -1;
    }
    allocator->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}
