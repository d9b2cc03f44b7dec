// L2 prefetches of weights ahead of the kernels that stream them (see prefetch.cu).
#ifndef PDSERVE_PREFETCH_CUH
#define PDSERVE_PREFETCH_CUH
#include "common.cuh"

#define PREFETCH_CHUNK (32 * 1024)  // bytes one bulk prefetch asks for

// L2 prefetches of [p, p + n), shrunk to whole 16-byte units, as bulk (TMA) requests of up to
// PREFETCH_CHUNK bytes spread over `parts` blocks' threads (this block is part `part`): a thread
// issues a few instructions and waits on none of them, so it is done in a microsecond or two.
// Prefetches are hints: they fill no register and change no memory.
__device__ __forceinline__ void prefetch_l2(const void* p, long long n, int part = 0,
                                            int parts = 1) {
  const unsigned long long a = ((unsigned long long)p + 15) & ~15ull;
  const unsigned long long b = ((unsigned long long)p + n) & ~15ull;
  if (n <= 0 || b <= a) return;
  const unsigned long long step = (unsigned long long)parts * blockDim.x * PREFETCH_CHUNK;
  for (unsigned long long c = a + ((unsigned long long)part * blockDim.x + threadIdx.x) *
                                      PREFETCH_CHUNK;
       c < b; c += step) {
    const unsigned size = (unsigned)min((unsigned long long)PREFETCH_CHUNK, b - c);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(c), "r"(size) : "memory");
  }
}

#endif  // PDSERVE_PREFETCH_CUH
