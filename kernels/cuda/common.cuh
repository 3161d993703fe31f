// common.cuh - small helpers that sparse_gemv.cu and decode_ops.cu share (internal linkage in
// each; not part of either public header).
#ifndef SPARSIFY_COMMON_CUH
#define SPARSIFY_COMMON_CUH

#include <stdlib.h>

namespace {

// atomicInc with acquire-release semantics at device scope: one thread publishes its block's
// earlier writes (ordered before it by a barrier) and, as the last arrival, observes every other
// block's, without a full sequentially consistent fence in every thread.
__device__ __forceinline__ unsigned atomic_inc_acq_rel(unsigned *p, unsigned wrap) {
  unsigned old;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  asm volatile("atom.acq_rel.gpu.global.inc.u32 %0, [%1], %2;"
               : "=r"(old)
               : "l"(p), "r"(wrap)
               : "memory");
#else
  __threadfence();
  old = atomicInc(p, wrap);
  __threadfence();
#endif
  return old;
}

// An integer setting from the environment, read at each launch (0 when unset or empty): the
// benchmark and diagnostic switches the headers document.
inline int env_int(const char *name) {
  const char *v = getenv(name);
  return (v != nullptr && *v != '\0') ? atoi(v) : 0;
}

}  // namespace

#endif  // SPARSIFY_COMMON_CUH
