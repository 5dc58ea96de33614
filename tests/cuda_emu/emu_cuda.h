// CPU emulation of the CUDA device environment that csrc/ uses, for g++ (tests/test_cuda_emulation.py).
// Execution model: blocks of a launch run one after another; the threads of a block are std::threads running
// concurrently, so __syncthreads, warp shuffles and __syncwarp really synchronise them and a missing barrier shows
// up as a wrong or NaN result (shared memory starts as NaN bytes) or an ASan/UBSan report.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// CUDA's min/max are overloaded for mixed integer widths; std::min is not.
template <class A, class B> inline std::common_type_t<A, B> min(A a, B b) { return a < b ? a : b; }
template <class A, class B> inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

// ---- fp16 / bf16: storage types with round-to-nearest-even conversions ----
struct __half { unsigned short __x; };
struct __nv_bfloat16 { unsigned short __x; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.__x, 2); return float(f); }
inline __half __float2half_rn(float v) { _Float16 f = static_cast<_Float16>(v); __half h; std::memcpy(&h.__x, &f, 2); return h; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = uint32_t(b.__x) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u; std::memcpy(&u, &v, 4);
  if (std::isnan(v)) return __nv_bfloat16{static_cast<unsigned short>((u >> 16) | 0x40)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<unsigned short>(u >> 16)};
}
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// ---- runtime API: just enough for the host launchers in csrc ----
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes { int binaryVersion = 80, ptxVersion = 80; };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
namespace emu { inline int sm_count = 4; }  // set by the driver: the split heuristics read it
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = emu::sm_count; return cudaSuccess; }
namespace emu {
// What each kernel opted into: a launch above the 48 KB default without it fails on hardware.
inline std::mutex optin_mu;
inline std::map<const void*, int> optin;
}  // namespace emu
template <class F> cudaError_t cudaFuncSetAttribute(F f, cudaFuncAttribute, int bytes) {
  // sm_86/89 blocks may opt into at most 99 KB (sm_80: 163 KB); the build targets all of them.
  if (bytes > 99 * 1024) { fprintf(stderr, "emu: %d B of dynamic shared memory exceeds sm_86's 99 KB\n", bytes); std::abort(); }
  std::lock_guard<std::mutex> lk(emu::optin_mu);
  emu::optin[reinterpret_cast<const void*>(f)] = bytes;
  return cudaSuccess;
}
template <class F> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) { *a = {}; return cudaSuccess; }
template <class F> cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int, size_t) { *n = 2; return cudaSuccess; }

namespace emu {

[[noreturn]] inline void fail(const char* what) { fprintf(stderr, "emu: %s\n", what); fflush(stderr); std::abort(); }

struct Warp {
  std::barrier<> bar{32};
  uint32_t slot[32];
};
struct Block {
  std::barrier<>* bar;
  Warp* warps;
  unsigned char* dyn;  // dynamic shared memory of this block
  size_t dyn_bytes;
};
struct Copy { void* dst; const void* src; int n; };

inline thread_local uint3 tid, bid;
inline thread_local dim3 gdim, bdim;
inline thread_local Block* block = nullptr;
inline thread_local std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
inline thread_local std::vector<Copy> open_group;
inline std::atomic<uint64_t> block_epoch{0};

inline unsigned char* dynamic_smem() { return block->dyn; }
inline size_t dyn_bytes_of_block() { return block->dyn_bytes; }

// Static __shared__ arrays are function-local statics (one per kernel instantiation, shared by the block's threads
// because blocks run one at a time); the first thread to reach one in a block refills it with NaN bytes.
inline void shared_fresh(void* p, size_t n) {
  static std::mutex mu;
  static std::map<void*, uint64_t> seen;
  static uint64_t static_epoch = 0;
  static size_t static_bytes = 0;  // this block's static shared memory so far
  std::lock_guard<std::mutex> lk(mu);
  const uint64_t e = block_epoch.load();
  auto it = seen.find(p);
  if (it != seen.end() && it->second == e) return;
  seen[p] = e;
  if (static_epoch != e) static_epoch = e, static_bytes = 0;
  static_bytes += n;
  // Static shared memory may not exceed 48 KB; with dynamic memory added, 99 KB (sm_86/89).
  if (static_bytes > 48 * 1024 || static_bytes + dyn_bytes_of_block() > 99 * 1024) fail("too much shared memory per block");
  std::memset(p, 0xFF, n);
}

inline unsigned lane_id() { return tid.x % 32; }
inline Warp& warp() { return block->warps[tid.x / 32]; }

template <class T> T shfl_xor(T v, int o) {
  static_assert(sizeof(T) == 4, "4-byte shuffles only");
  Warp& w = warp();
  const unsigned l = lane_id();
  std::memcpy(&w.slot[l], &v, 4);
  w.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, &w.slot[l ^ unsigned(o & 31)], 4);
  w.bar.arrive_and_wait();  // nobody overwrites a slot before every lane has read it
  return r;
}

inline bool in_smem(const void* p, int n) {
  auto* c = static_cast<const unsigned char*>(p);
  return block->dyn && c >= block->dyn && c + n <= block->dyn + block->dyn_bytes;
}

// cp.async: the copy is only recorded; its bytes land when a wait_group retires its group, so reading the
// destination before the wait (or a barrier missing after it) sees the NaN fill, not the data.
inline void cp_async(void* d, const void* s, int n) {
  if (reinterpret_cast<uintptr_t>(d) % n || reinterpret_cast<uintptr_t>(s) % n) fail("misaligned cp.async");
  if (!in_smem(d, n)) fail("cp.async destination outside the block's dynamic shared memory");
  open_group.push_back({d, s, n});
}
inline void cp_commit() { groups.push_back(std::move(open_group)); open_group.clear(); }
inline void cp_wait(int pending) {
  while (int(groups.size()) > pending) {
    for (auto& c : groups.front()) std::memcpy(c.dst, c.src, c.n);
    groups.erase(groups.begin());
  }
}

template <class... P> struct Launch {
  void (*kernel)(P...);
  dim3 grid, blk;
  size_t smem;
  template <class... A> void operator()(A&&... args) const {
    const unsigned nt = blk.x * blk.y * blk.z;
    if (nt == 0 || nt > 1024 || nt % 32) fail("block size must be a multiple of 32 in [32, 1024]");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) fail("bad grid");
    if (smem > 48 * 1024) {
      std::lock_guard<std::mutex> lk(optin_mu);
      auto it = optin.find(reinterpret_cast<const void*>(kernel));
      if (it == optin.end() || size_t(it->second) < smem) fail("launch above 48 KB of dynamic shared memory without opting in");
    }
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          block_epoch.fetch_add(1);
          struct Free { void operator()(unsigned char* p) const { std::free(p); } };
          std::unique_ptr<unsigned char, Free> dyn;
          if (smem) {
            // Exactly the launched size (ASan sees any access past it), NaN bytes until written.
            void* raw = nullptr;
            if (posix_memalign(&raw, 128, smem)) fail("out of memory");
            dyn.reset(static_cast<unsigned char*>(raw));
            std::memset(dyn.get(), 0xFF, smem);
          }
          std::barrier<> bar(nt);
          std::unique_ptr<Warp[]> warps(new Warp[nt / 32]);
          Block b{&bar, warps.get(), dyn.get(), smem};
          std::vector<std::thread> th;
          th.reserve(nt);
          for (unsigned t = 0; t < nt; ++t)
            th.emplace_back([&, t] {
              tid = uint3{t % blk.x, (t / blk.x) % blk.y, t / (blk.x * blk.y)};
              bid = uint3{bx, by, bz};
              gdim = grid;
              bdim = blk;
              block = &b;
              groups.clear();
              open_group.clear();
              kernel(args...);
              if (!open_group.empty()) fail("cp.async issued but never committed");
              for (auto& g : groups)
                if (!g.empty()) fail("cp.async committed but never waited for");
              // An exited thread no longer holds back the barriers of those still running (as on sm_70+).
              warps[t / 32].bar.arrive_and_drop();
              bar.arrive_and_drop();
            });
          for (auto& t : th) t.join();
        }
  }
};
template <class... P> Launch<P...> launch(void (*k)(P...), dim3 g, dim3 b, size_t smem = 0, cudaStream_t = nullptr) {
  return Launch<P...>{k, g, b, smem};
}

}  // namespace emu

#define threadIdx (::emu::tid)
#define blockIdx (::emu::bid)
#define gridDim (::emu::gdim)
#define blockDim (::emu::bdim)

inline void __syncthreads() { emu::block->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp().bar.arrive_and_wait(); }
template <class T> T __shfl_xor_sync(unsigned, T v, int o) { return emu::shfl_xor(v, o); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class T> T __ldcg(const T* p) { return *p; }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
