// Weights brought into L2 ahead of the kernel that streams them. At small decode batches a
// layer alternates weight-streaming launches (which reach only 60-75% of the copy rate alone:
// each warp waits on DRAM's latency between its load groups) with latency-bound ones (norms,
// routing, attention) that leave the memory idle. A prefetch issued while the latter run keeps
// DRAM busy and lets the next streaming launch read from L2. With PDSERVE_EVICT_FIRST the
// streaming loads ask L2 to evict their lines first (weight_stream.cuh), so the prefetched lines
// outlive the experts streamed between the prefetch and their use.
//
// The launches are one small block each (bulk requests, a few per thread), so they finish in a
// microsecond or two and hold next to no SM resources: a first version, a thread per 128-byte
// line and a block on every SM, may have pushed the one-wave streaming kernels it overlapped
// into second waves; it made decode steps slower (benchmarks/RESULTS.md, session 7).
#include "common.cuh"

#define PREFETCH_CHUNK (32 * 1024)  // bytes one bulk prefetch asks for

// L2 prefetches of [p, p + n), shrunk to whole 16-byte units, as bulk (TMA) requests of up to
// PREFETCH_CHUNK bytes spread over the block's threads: a thread issues a few instructions and
// waits on none of them. Prefetches are hints: they fill no register and change no memory.
__device__ __forceinline__ void prefetch_l2(const void* p, long long n) {
  const unsigned long long a = ((unsigned long long)p + 15) & ~15ull;
  const unsigned long long b = ((unsigned long long)p + n) & ~15ull;
  if (n <= 0 || b <= a) return;
  const unsigned long long step = (unsigned long long)blockDim.x * PREFETCH_CHUNK;
  for (unsigned long long c = a + threadIdx.x * (unsigned long long)PREFETCH_CHUNK; c < b;
       c += step) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const unsigned size = b - c < PREFETCH_CHUNK ? (unsigned)(b - c) : PREFETCH_CHUNK;
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(c), "r"(size) : "memory");
#endif
  }
}

// Up to four byte ranges (n = 0: none). It lets the next kernel launch at once and waits for the
// one before only at the end (keeping the launch chain's order), so that inline, in the stream
// of the kernels it prefetches for, the next launch still hides behind the running one.
extern "C" __global__ void l2_prefetch(const char* p0, long long n0, const char* p1, long long n1,
                                       const char* p2, long long n2, const char* p3,
                                       long long n3) {
  pdl_launch_dependents();
  prefetch_l2(p0, n0);
  prefetch_l2(p1, n1);
  prefetch_l2(p2, n2);
  prefetch_l2(p3, n3);
  pdl_wait();
}

// The matrices of the experts a MoE layer's grouping touched (moe_group's slot_expert: -1 past
// the last): expert e's `bytes` bytes at base + e * stride. A block per slot. Reads slot_expert,
// so it waits for the kernels before it first (after letting the next one launch).
extern "C" __global__ void l2_prefetch_experts(const int* __restrict__ slot_expert,
                                               const char* base, long long stride,
                                               long long bytes) {
  pdl_launch_dependents();
  pdl_wait();
  const int e = slot_expert[blockIdx.x];
  if (e >= 0) prefetch_l2(base + e * stride, bytes);
}
