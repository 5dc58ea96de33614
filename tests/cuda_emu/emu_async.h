// Stands in for csrc/kasa_common.cuh's inline-asm cp.async helpers (build.py splices it in their place).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) { ::emu::cp_async(smem_dst, gmem_src, 16); }
__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src) { ::emu::cp_async(smem_dst, gmem_src, 4); }
__device__ __forceinline__ void cp_async_commit() { ::emu::cp_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { ::emu::cp_wait(N); }
