// boundary_cost.cu - what one dependency between all blocks of a grid costs on the GPU, two ways:
// as a kernel boundary (P launches of one kernel in a CUDA graph, each waiting for the previous
// grid through programmatic dependent launch, as the decode step launches its kernels), and as a
// software grid barrier inside one persistent kernel (P phases, every block resident). Each
// phase of either kind does the same work: every block reads the value that another block wrote
// in the phase before, adds one, and writes its own, so each phase depends on the last one across
// blocks, the way a GEMV depends on the kernel that wrote its input.
//
// Built and called by scripts/bench_boundary_cuda.py (ctypes); not part of the kernels library.

#include <cuda_runtime.h>

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void wait_previous_grid() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}

__device__ __forceinline__ void launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

__device__ __forceinline__ unsigned load_acquire(const unsigned *p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release(unsigned *p, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned add_acq_rel(unsigned *p, unsigned v) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;"
               : "=r"(old)
               : "l"(p), "r"(v)
               : "memory");
  return old;
}

// One phase's work: block b reads what block (b + 1) % nb wrote into `src` and writes into `dst`.
__device__ __forceinline__ void phase_work(const float *src, float *dst) {
  if (threadIdx.x == 0) {
    const int nb = static_cast<int>(gridDim.x);
    const int b = static_cast<int>(blockIdx.x);
    dst[b] = __ldcg(src + (b + 1) % nb) + 1.0f;
  }
}

__global__ void __launch_bounds__(kThreads) phase_kernel(const float *src, float *dst) {
  wait_previous_grid();
  phase_work(src, dst);
  launch_dependents();
}

// Sense-reversing grid barrier: the last block to arrive resets the count and moves the
// generation on; the others spin on the generation.
__device__ __forceinline__ void grid_barrier(unsigned *count, unsigned *generation) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned gen = load_acquire(generation);
    if (add_acq_rel(count, 1u) == gridDim.x - 1) {
      *count = 0;
      store_release(generation, gen + 1);
    } else {
      while (load_acquire(generation) == gen) {
      }
    }
  }
  __syncthreads();
}

// Counting grid barrier: every block adds one (a release reduction, no reply awaited) and
// waits until the count reaches gridDim.x times the number of barriers passed so far. One L2
// trip fewer than the generation flag; the count keeps growing (2^32 / gridDim.x barriers).
__device__ __forceinline__ void grid_barrier_count(unsigned *count, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(count) : "memory");
    while (load_acquire(count) < target) {
    }
  }
  __syncthreads();
}

// COUNT: the counting barrier; else the generation flag. bar[2] is the counting barrier's
// count, carried from one launch to the next in bar[3] (read at the start, advanced at the end
// by block 0 after the last barrier, when every block has read it).
template <bool COUNT>
__global__ void __launch_bounds__(kThreads) persistent_kernel(float *a, float *b, int phases,
                                                              unsigned *bar) {
  const unsigned base = COUNT ? bar[3] : 0u;
  for (int i = 0; i < phases; ++i) {
    phase_work(i % 2 ? b : a, i % 2 ? a : b);
    if constexpr (COUNT) {
      grid_barrier_count(bar + 2, base + gridDim.x * static_cast<unsigned>(i + 1));
    } else {
      grid_barrier(bar, bar + 1);
    }
  }
  if (COUNT && blockIdx.x == 0 && threadIdx.x == 0) {
    bar[3] = base + gridDim.x * static_cast<unsigned>(phases);
  }
}

}  // namespace

extern "C" {

// Resident blocks of the persistent kernel on this device (every multiprocessor full).
int boundary_resident_blocks() {
  int dev = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return -1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return -1;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, persistent_kernel<false>, kThreads,
                                                    0) !=
      cudaSuccess) {
    return -1;
  }
  return sms * per_sm;
}

// Times `reps` graph replays after one warm-up and writes the mean time per phase, in
// microseconds, to *us. mode 0: a graph of `phases` PDL launches of `blocks` blocks;
// mode 1: the same graph without the PDL attribute; mode 2: one persistent launch of `phases`
// phases with the generation-flag barrier; mode 3: the same with the counting barrier.
// a, b: float buffers of >= blocks; bar: four zeroed unsigned ints.
int boundary_time(int mode, int blocks, int phases, int reps, float *a, float *b, unsigned *bar,
                  float *us) {
  cudaStream_t s;
  if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess) return 1;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  int rc = 0;
  if (cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) != cudaSuccess) rc = 2;
  for (int i = 0; rc == 0 && (mode >= 2 ? i < 1 : i < phases); ++i) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(kThreads);
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = mode == 0 ? 1 : 0;
    cudaError_t e;
    if (mode == 2) {
      e = cudaLaunchKernelEx(&cfg, persistent_kernel<false>, a, b, phases, bar);
    } else if (mode == 3) {
      e = cudaLaunchKernelEx(&cfg, persistent_kernel<true>, a, b, phases, bar);
    } else {
      const float *src = i % 2 ? b : a;
      float *dst = i % 2 ? a : b;
      e = cudaLaunchKernelEx(&cfg, phase_kernel, src, dst);
    }
    if (e != cudaSuccess) rc = 3;
  }
  if (cudaStreamEndCapture(s, &graph) != cudaSuccess && rc == 0) rc = 4;
  if (rc == 0 && cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) rc = 5;
  cudaEvent_t t0, t1;
  cudaEventCreate(&t0);
  cudaEventCreate(&t1);
  if (rc == 0 && cudaGraphLaunch(exec, s) != cudaSuccess) rc = 6;  // warm-up
  if (rc == 0) {
    cudaEventRecord(t0, s);
    for (int r = 0; r < reps && rc == 0; ++r) {
      if (cudaGraphLaunch(exec, s) != cudaSuccess) rc = 7;
    }
    cudaEventRecord(t1, s);
    if (cudaEventSynchronize(t1) != cudaSuccess) rc = 8;
  }
  if (rc == 0) {
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, t0, t1);
    *us = 1000.0f * ms / (static_cast<float>(reps) * static_cast<float>(phases));
  }
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  if (exec) cudaGraphExecDestroy(exec);
  if (graph) cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
  if (rc == 0 && cudaGetLastError() != cudaSuccess) rc = 9;
  return rc;
}

}  // extern "C"
