// CUDA caching-allocator statistics (what torch.cuda.max_memory_allocated and
// torch.cuda.reset_peak_memory_stats read), for the GPU benchmark's peak memory.
//
// Compiled into the kernel library; the real functions need the CUDA host headers, which build.rs
// finds with NCCL's and then defines VOLTTRAIN_CUDA. Otherwise every function reports
// "not available" (-1). No C++ exception crosses the C ABI.

#include <cstdint>

#ifdef VOLTTRAIN_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

extern "C" {

// Whether the statistics are compiled in.
int vt_cuda_stats_compiled() {
#ifdef VOLTTRAIN_CUDA
  return 1;
#else
  return 0;
#endif
}

// Peak bytes allocated on `device` since the process start or the last reset; -1 when not
// available (no CUDA support compiled in, or the allocator failed).
int64_t vt_cuda_peak_allocated(int device) {
#ifdef VOLTTRAIN_CUDA
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
        static_cast<c10::DeviceIndex>(device));
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
        .peak;
  } catch (...) {
    return -1;
  }
#else
  (void)device;
  return -1;
#endif
}

// Resets the peak statistics of `device`; 0 on success, -1 when not available.
int vt_cuda_reset_peak(int device) {
#ifdef VOLTTRAIN_CUDA
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
#else
  (void)device;
  return -1;
#endif
}

}  // extern "C"
