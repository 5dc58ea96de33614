// Properties of the current device that the launchers' heuristics read on every call (SM count for split counts,
// compute capability and shared-memory opt-in limit for the GEMM's tile), each queried once per device.
#include "kasa_common.cuh"

namespace kasa {
namespace {

constexpr int kMaxDevices = 64;  // devices beyond this are queried on every call

int cached_attribute(std::atomic<int> (&cache)[kMaxDevices], cudaDeviceAttr attr) {
  const int dev = current_device();
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  KASA_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, dev));
  if (cached && v > 0) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

}  // namespace

int current_device() {
  int dev = 0;
  KASA_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

int device_sm_count() {
  static std::atomic<int> cache[kMaxDevices];
  return cached_attribute(cache, cudaDevAttrMultiProcessorCount);
}

int device_capability() {
  static std::atomic<int> major[kMaxDevices], minor[kMaxDevices];
  // minor is 0 on many devices, so it is cached as minor + 1
  const int dev = current_device();
  int mi = dev >= 0 && dev < kMaxDevices ? minor[dev].load(std::memory_order_relaxed) : 0;
  if (mi == 0) {
    int v = 0;
    KASA_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMinor, dev));
    mi = v + 1;
    if (dev >= 0 && dev < kMaxDevices) minor[dev].store(mi, std::memory_order_relaxed);
  }
  return 10 * cached_attribute(major, cudaDevAttrComputeCapabilityMajor) + (mi - 1);
}

int device_smem_optin() {
  static std::atomic<int> cache[kMaxDevices];
  return cached_attribute(cache, cudaDevAttrMaxSharedMemoryPerBlockOptin);
}

}  // namespace kasa
