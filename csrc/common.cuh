// Helpers shared by the pdserve kernels. Header-free on purpose: every .cu file compiles under
// NVRTC (cupy.RawModule, which gets this file inlined by pdserve/backends/cupy_kernels.py) and
// under `nvcc -arch=sm_90a -c` without any CUDA include path.
//
// bfloat16 travels as its raw 16 bits (bf16_t); all arithmetic is float32.
#ifndef PDSERVE_COMMON_CUH
#define PDSERVE_COMMON_CUH

typedef unsigned short bf16_t;
typedef unsigned int u32;
struct alignas(16) u32x4 {  // 16 bytes, for wide loads (CUDA's uint4 needs its headers)
  u32 x, y, z, w;
};

#define NEG_INF (__int_as_float(0xff800000))

// Programmatic dependent launch (sm_90). Inside CUDA graphs Kernels.launch lets a kernel start
// before the previous one in its stream has finished, so every kernel calls this first: it waits
// until the previous kernel has finished and its writes are visible (at once when launched the
// usual way), then lets the next kernel launch, whose blocks are scheduled and wait in turn while
// this one runs, hiding its launch latency. Nothing may be read or written before it.
// Its two halves are apart for kernels that touch no memory before waiting (csrc/prefetch.cu).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_start() {
  pdl_wait();
  pdl_launch_dependents();
}

__device__ __forceinline__ float bf2f(bf16_t v) { return __uint_as_float(((u32)v) << 16); }

// round to nearest even, as torch and ml_dtypes do
__device__ __forceinline__ bf16_t f2bf(float f) {
  bf16_t r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}

// the two bf16 halves of a 32-bit word: low half is the element at the lower address
__device__ __forceinline__ float lo_bf(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_bf(u32 w) { return __uint_as_float(w & 0xffff0000u); }

// The interleaved RoPE pair (a, b) rotated by `angle` in float32, stored as bf16 at dst[0..1]:
// every RoPE path (rope_kv.cu, the qkv GEMV's epilogue) rounds through this, so they agree bit
// for bit.
__device__ __forceinline__ void store_rotated(bf16_t* dst, float a, float b, float angle) {
  float s, c;
  sincosf(angle, &s, &c);
  dst[0] = f2bf(a * c - b * s);
  dst[1] = f2bf(b * c + a * s);
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
// `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

// This lane's share of dot(a[0:n], b[0:n]) over a warp, float32 accumulation; warp_sum it.
// 16-byte loads when both rows allow them.
__device__ __forceinline__ float lane_dot(const bf16_t* __restrict__ a,
                                          const bf16_t* __restrict__ b, int n, int lane) {
  float s = 0.0f;
  if ((n & 7) == 0 && ((((unsigned long long)a) | ((unsigned long long)b)) & 15) == 0) {
    const u32x4* a4 = (const u32x4*)a;
    const u32x4* b4 = (const u32x4*)b;
    for (int i = lane; i < (n >> 3); i += 32) {
      const u32x4 x = a4[i], y = b4[i];
      s += lo_bf(x.x) * lo_bf(y.x) + hi_bf(x.x) * hi_bf(y.x);
      s += lo_bf(x.y) * lo_bf(y.y) + hi_bf(x.y) * hi_bf(y.y);
      s += lo_bf(x.z) * lo_bf(y.z) + hi_bf(x.z) * hi_bf(y.z);
      s += lo_bf(x.w) * lo_bf(y.w) + hi_bf(x.w) * hi_bf(y.w);
    }
  } else {
    for (int i = lane; i < n; i += 32) s += bf2f(a[i]) * bf2f(b[i]);
  }
  return s;
}

#endif  // PDSERVE_COMMON_CUH
