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
struct alignas(8) float2 { float x, y; };
struct alignas(8) uint2 { unsigned x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

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
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }

// ---- runtime API: just enough for the host launchers in csrc ----
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes { int binaryVersion = 80, ptxVersion = 80; };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
namespace emu {
// The emulated device, set by the driver (sms=, cc=): the split heuristics and the GEMM's tile choice read them.
inline int sm_count = 4;
inline int cc = 86;
// Dynamic shared memory one block may opt into: sm80/sm87 163 KB, sm86/sm89 99 KB, sm90 227 KB.
inline int smem_optin() { return cc == 80 || cc == 87 ? 163 * 1024 : cc >= 90 ? 227 * 1024 : 99 * 1024; }
}  // namespace emu
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = emu::sm_count; break;
    case cudaDevAttrComputeCapabilityMajor: *v = emu::cc / 10; break;
    case cudaDevAttrComputeCapabilityMinor: *v = emu::cc % 10; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = emu::smem_optin(); break;
  }
  return cudaSuccess;
}
namespace emu {
// What each kernel opted into: a launch above the 48 KB default without it fails on hardware.
inline std::mutex optin_mu;
inline std::map<const void*, int> optin;
}  // namespace emu
template <class F> cudaError_t cudaFuncSetAttribute(F f, cudaFuncAttribute, int bytes) {
  if (bytes > emu::smem_optin()) {
    fprintf(stderr, "emu: %d B of dynamic shared memory exceeds the %d B an sm_%d block may use\n", bytes,
            emu::smem_optin(), emu::cc);
    std::abort();
  }
  std::lock_guard<std::mutex> lk(emu::optin_mu);
  emu::optin[reinterpret_cast<const void*>(f)] = bytes;
  return cudaSuccess;
}
template <class F> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) { *a = {}; return cudaSuccess; }
template <class F> cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int, size_t) { *n = 2; return cudaSuccess; }

namespace emu {

[[noreturn]] inline void fail(const char* what) { fprintf(stderr, "emu: %s\n", what); fflush(stderr); std::abort(); }

// What one lane contributes to a warp-collective instruction (shuffle, ldmatrix, mma): an address and registers.
struct LaneIn {
  const unsigned char* addr;
  uint32_t w[10];
  unsigned seq;  // which collective of this lane it belongs to (set by warp_exchange)
};
struct Warp {
  std::barrier<> bar{32};
  std::atomic<int> live{32};  // lanes that have not exited
  // Double-buffered by each lane's count of collectives: a lane can only start collective n + 2 (and overwrite
  // buffer n % 2) after every lane arrived at collective n + 1, i.e. after all have read collective n's inputs.
  LaneIn x[2][32];
  unsigned seq[32] = {};
  Warp() { for (auto& b : x) for (auto& e : b) e.seq = ~0u; }
};
struct Block {
  std::barrier<>* bar;
  Warp* warps;
  unsigned char* dyn;  // dynamic shared memory of this block
  size_t dyn_bytes;
};
struct Copy { void* dst; const void* src; int n, src_bytes; };

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
  // Static shared memory may not exceed 48 KB; with dynamic memory added, what the emulated device allows.
  if (static_bytes > 48 * 1024 || static_bytes + dyn_bytes_of_block() > size_t(smem_optin())) fail("too much shared memory per block");
  std::memset(p, 0xFF, n);
}

inline unsigned lane_id() { return tid.x % 32; }
inline Warp& warp() { return block->warps[tid.x / 32]; }

// Every lane publishes `mine` and waits for the whole warp; returns all 32 lanes' contributions. The .sync.aligned
// instructions require all 32 lanes to execute them together: a lane that has exited makes this fail.
inline const LaneIn* warp_exchange(const LaneIn& mine) {
  Warp& w = warp();
  const unsigned l = lane_id();
  if (w.live.load() != 32) fail("warp-collective instruction after some lanes of the warp exited");
  const unsigned seq = w.seq[l]++;
  LaneIn* buf = w.x[seq & 1];
  buf[l] = mine;
  buf[l].seq = seq;
  w.bar.arrive_and_wait();
  // A lane that exited instead of arriving released the barrier too, leaving an older entry behind.
  for (int i = 0; i < 32; ++i)
    if (buf[i].seq != seq) fail("warp-collective instruction that not every lane of the warp reached");
  return buf;
}

template <class T> T shfl_xor(T v, int o) {
  static_assert(sizeof(T) == 4, "4-byte shuffles only");
  LaneIn me{};
  std::memcpy(&me.w[0], &v, 4);
  const LaneIn* all = warp_exchange(me);
  T r;
  std::memcpy(&r, &all[lane_id() ^ unsigned(o & 31)].w[0], 4);
  return r;
}

inline bool in_smem(const void* p, int n) {
  auto* c = static_cast<const unsigned char*>(p);
  return block->dyn && c >= block->dyn && c + n <= block->dyn + block->dyn_bytes;
}

// cp.async: the copy is only recorded; its bytes land when a wait_group retires its group, so reading the
// destination before the wait (or a barrier missing after it) sees the NaN fill, not the data. `n` bytes are copied
// (cp-size), of which only the first `src_bytes` are read from the source and the rest are zero (src-size).
inline void cp_async(void* d, const void* s, int n, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(d) % n || reinterpret_cast<uintptr_t>(s) % n) fail("misaligned cp.async");
  if (src_bytes < 0 || src_bytes > n) fail("cp.async src-size outside [0, cp-size]");
  if (!in_smem(d, n)) fail("cp.async destination outside the block's dynamic shared memory");
  open_group.push_back({d, s, n, src_bytes});
}
inline void cp_commit() { groups.push_back(std::move(open_group)); open_group.clear(); }
inline void cp_wait(int pending) {
  while (int(groups.size()) > pending) {
    for (auto& c : groups.front()) {
      std::memset(c.dst, 0, c.n);
      if (c.src_bytes) std::memcpy(c.dst, c.src, c.src_bytes);
    }
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
              warps[t / 32].live.fetch_sub(1);
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
[[noreturn]] inline void __trap() { emu::fail("__trap() reached"); }
template <class T> T __ldcg(const T* p) { return *p; }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
