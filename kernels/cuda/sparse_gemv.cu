// sparse_gemv.cu - threshold-sparse GEMV for input-major weights (see sparse_gemv.h).
//
// Work split. The output is cut into tiles of TN = 32 * VEC columns (one warp covers one tile
// row with one 16-byte load per lane: 512 contiguous bytes) and K into `splits` chunks; block
// (tile, split) handles one chunk of rows for one tile. Split-K keeps enough rows in flight when
// few are active and lets narrow outputs (N = 1024) still fill every multiprocessor.
//
// Inside a block:
//   0. (Variants 11-13 only.) Before waiting for the previous kernel (programmatic dependent
//      launch), the block asks L2 to prefetch the first rows of its chunk, before x is known.
//   1. Compaction: the block reads its chunk of x (all of it at once), evaluates keep[i] and
//      compacts the active row indices (and their x) into shared memory with one warp ballot per
//      32 rows. Rows that are not kept never generate a weight load into registers, and the inner
//      loop has no data-dependent branch.
//   2. Streaming: warp w takes active rows w, w + 8, ...; each lane keeps two batches of four
//      independent 16-byte loads in registers and issues the next batch before it decodes the
//      current one, so four to eight loads are always in flight; it accumulates VEC columns in
//      fp32.
//   3. Reduction: warps add their columns in shared memory in a fixed order; then the splits of a
//      tile are added either by the last block to arrive (ticket counter in the workspace, which
//      that block resets by wrapping, so graph replays need no memset), or through distributed
//      shared memory when the splits of a tile form a thread-block cluster (sm_90).
// Both reductions sum splits in index order, so the result does not depend on scheduling.
#include "sparse_gemv.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>

#include "common.cuh"

namespace cg = cooperative_groups;

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Rows compacted per pass; a chunk longer than this is handled in several passes.
constexpr int kListRows = 2048;
// Fewer rows per block than this costs more in per-block overhead than it gains in parallelism.
constexpr int kMinRowsPerBlock = 32;
constexpr int kMaxSplits = 64;
// Unit of the optional L2 prefetch before the dependency wait (variants 11-13, see gemv_kernel),
// in bytes per multiprocessor, split among its resident blocks: 4.3 MB over 132 SMs, about a
// microsecond of DRAM time.
constexpr int kPrefetchBytesPerSM = 32 * 1024;
// Portable cluster size limit.
constexpr int kMaxClusterSplits = 8;
// Largest K for which each block of a globally balanced launch (variant 18) reads all of x.
constexpr int kGlobalMaxK = 8192;
constexpr int kGlobalSlots = kGlobalMaxK / kThreads * kWarps;
constexpr int kGroup = SPARSIFY_GEMV_INT8_GROUP;
constexpr int kMaxDevices = 64;
constexpr int kMaxSegs = SPARSIFY_GEMV_MAX_SEGMENTS;
// The widest tile of any path (int8, 16 columns per lane).
constexpr int kWidestTile = 32 * 16;
// Workspace layout: arrival counters in a fixed region at the start, partial sums after it. The
// region does not depend on the shape, so launches of different shapes sharing one workspace
// never read another launch's partial sums as counters. Beyond kMaxTiles tiles the grid is
// large without split-K, and none is used.
constexpr size_t kCounterBytes = 65536;
constexpr int kMaxTiles = static_cast<int>(kCounterBytes / 4);

enum WType { kF16 = SPARSIFY_GEMV_F16, kBF16 = SPARSIFY_GEMV_BF16, kI8 = SPARSIFY_GEMV_I8 };
enum Reduce { kTicket = 0, kCluster = 1 };

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr size_t round_up(size_t a, size_t b) { return (a + b - 1) / b * b; }

template <int W> struct Elem;
template <> struct Elem<kF16> { static constexpr int kBytes = 2; };
template <> struct Elem<kBF16> { static constexpr int kBytes = 2; };
template <> struct Elem<kI8> { static constexpr int kBytes = 1; };

// ---- weight loads ---------------------------------------------------------------------------

// 16-byte streaming load, predicated inside the asm: the weights are read once per token, so
// they stay out of L1, and the L2 256-byte prefetch hint asks for the lane group's segment in one
// burst. The predicate lives in the asm (not an `if` around the load) and the statements are
// volatile, so the compiler keeps all of a lane's loads ahead of their uses instead of pairing
// each conditional load with its use (which left one load in flight per lane), and slots past
// the end of the row list issue no memory traffic at all.
template <bool kHint>
__device__ __forceinline__ uint4 load16(const void *p, bool valid) {
  uint4 r = make_uint4(0u, 0u, 0u, 0u);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (kHint) {
    asm volatile(
        "{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n"
        " @q ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n}"
        : "+r"(r.x), "+r"(r.y), "+r"(r.z), "+r"(r.w)
        : "l"(p), "r"(static_cast<int>(valid)));
  } else {
    asm volatile(
        "{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n"
        " @q ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n}"
        : "+r"(r.x), "+r"(r.y), "+r"(r.z), "+r"(r.w)
        : "l"(p), "r"(static_cast<int>(valid)));
  }
#else
  if (valid) r = __ldg(reinterpret_cast<const uint4 *>(p));
#endif
  return r;
}

// Predicated 4-byte read-only load (int8 scales), kept in order with the weight loads.
__device__ __forceinline__ float load_f32(const float *p, bool valid) {
  float r = 0.0f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n @q ld.global.nc.f32 %0, [%1];\n}"
      : "+f"(r)
      : "l"(p), "r"(static_cast<int>(valid)));
#else
  if (valid) r = __ldg(p);
#endif
  return r;
}

// Hint to bring the 128-byte line holding p into L2; no register result, no wait, and no effect
// on the values any later load returns (L2 is the device's point of coherence).
__device__ __forceinline__ void prefetch_l2(const void *p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

// Four int8 in one word to float: put the offset-binary byte under the exponent of 2^23 and
// subtract 2^23 + 128 (exact). Byte permutes and adds run at full rate, unlike I2F conversion,
// which at int8 bandwidth would cost as much issue time as the memory stream allows.
__device__ __forceinline__ void i8x4_to_f32(unsigned word, float *f) {
  const unsigned u = word ^ 0x80808080u;
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    f[b] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540u | b)) - 8388736.0f;
  }
}

// Frag<W, VEC>: what one lane loads for one row (VEC consecutive weights) and how it decodes.
// The primary template is the 16-byte path (VEC = 16 / sizeof(weight)); VEC = 1 is scalar.
template <int W, int VEC> struct Frag {
  static_assert(VEC * Elem<W>::kBytes == 16, "vector fragments are 16 bytes");
  uint4 raw;
  template <bool kHint> __device__ __forceinline__ void load(const char *p, bool valid) {
    raw = load16<kHint>(p, valid);
  }
  __device__ __forceinline__ void decode(float *f) const {
    const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (W == kF16) {
        __half2 h;
        memcpy(&h, &w[i], 4);
        const float2 v = __half22float2(h);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
      } else if (W == kBF16) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
      } else {
        i8x4_to_f32(w[i], f + 4 * i);
      }
    }
  }
};

template <int W> struct Frag<W, 1> {
  unsigned raw;
  template <bool kHint> __device__ __forceinline__ void load(const char *p, bool valid) {
    raw = 0u;
    if (!valid) return;
    if (W == kI8) {
      raw = static_cast<unsigned>(__ldg(reinterpret_cast<const unsigned char *>(p)));
    } else {
      raw = static_cast<unsigned>(__ldg(reinterpret_cast<const unsigned short *>(p)));
    }
  }
  __device__ __forceinline__ void decode(float *f) const {
    if (W == kF16) {
      f[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(raw)));
    } else if (W == kBF16) {
      f[0] = __uint_as_float(raw << 16);
    } else {
      f[0] = static_cast<float>(static_cast<signed char>(raw));
    }
  }
};

// ---- kernel -----------------------------------------------------------------------------------

// One output segment: its own weights, threshold, factor, scales and output, sharing x and K
// with the other segments of the launch (q, k and v of one input; or gate and up).
struct Seg {
  const char *w;
  const float *scales;  // int8 only
  const float *factor;  // may be null
  const float *threshold;
  float *y;
  int n;
  int n_groups;  // int8 scale groups per row
  int tile0;     // first tile (blockIdx.x) of this segment
};

struct Params {
  Seg seg[kMaxSegs];
  int nseg;
  const float *x;
  const float *x_up;  // gated input: x[i] := act(x[i]) * x_up[i]; null for a plain input
  int act;            // SPARSIFY_GEMV_ACT_*
  const float *norm_w;  // normed input: x[i] := x[i] * rsqrt(mean(x^2) + eps) * norm_w[i]
  float norm_eps;
  int accumulate;     // y += result instead of y = result
  int k;
  int rows_per_block;
  float *partial;      // (splits, ld) float32, ticket reduction only
  unsigned *counters;  // (tiles,) arrival counters, ticket reduction only
  int ld;              // row stride of `partial` = tiles * TN
  int prefetch_rows;   // rows at the start of each block's chunk hinted into L2 before the wait
  int x_parts;         // >= 1 partial rows of x (and x_up), x_stride floats apart, added in order
  int x_stride;
  int y_parts;         // nonzero: split-K sums left unreduced, split s at y + s * y_stride
  int y_stride;
  int wait;            // 0 only under the timing diagnostic SPARSIFY_DIAG_NO_WAIT
};

// The activations of sparsify.model, in float32 as torch computes them (F.silu: x / (1 + e^-x);
// F.gelu(approximate="tanh")), so the kernel thresholds the same values the model would.
__device__ __forceinline__ float gated(float g, float u, int act) {
  if (act == SPARSIFY_GEMV_ACT_SILU) return g / (1.0f + expf(-g)) * u;
  const float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  const float inner = kBeta * (g + 0.044715f * g * g * g);
  return 0.5f * g * (1.0f + tanhf(inner)) * u;
}

// The input a row contributes and whether it is kept: x (plain), act(x) * second (gated, second
// = up) or x * nscale * second (normed, second = the norm weight, in add_rms_norm's order
// h[i] * s * w[i]); kept unless its score |x'| (times the factor, if any) is <= thr, so a NaN
// score is kept and NaN propagates as in a dense product.
template <bool NORM>
__device__ __forceinline__ float kept_input(const Params &p, const Seg &sg, float thr,
                                            float nscale, float x, float second, float factor,
                                            bool *keep) {
  if (NORM) {
    x = x * nscale * second;
  } else if (p.x_up != nullptr) {
    x = gated(x, second, p.act);
  }
  float score = fabsf(x);
  if (sg.factor != nullptr) score *= factor;
  *keep = !(score <= thr);
  return x;
}

// Normed input: rsqrt(mean(x^2) + eps) over all K inputs, the same value in every thread and
// every block: each block sums the whole x itself in one fixed order (thread-strided partial
// sums, lanes by butterfly, warps in index order), so the blocks agree bit for bit without
// talking to each other. For K = 4096 that is 16 KB of L2 reads per block, issued together with
// the block's own inputs, instead of a norm kernel (and its launch) before this one. `red`
// holds one float per warp; the barrier inside makes the call block-wide.
__device__ __forceinline__ float rms_scale(const float *x, int k, float eps, float *red) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  float ss = 0.0f;
#pragma unroll 16
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const float v = __ldg(x + i);
    ss = fmaf(v, v, ss);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (lane == 0) red[warp] = ss;
  __syncthreads();
  float total = red[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total += red[w];
  return rsqrtf(total * (1.0f / static_cast<float>(k)) + eps);
}

// Resident blocks per multiprocessor the register budget is held to: four for the 2-byte
// formats (64 registers; ptxas then keeps a few loop-invariant scalars in local memory, read in
// the compaction and the tail, never in the streaming loop), two for int8 (up to 128).
template <int W, int VEC> constexpr int kMinBlocks = (W == kI8 || VEC == 1) ? 2 : 4;

// Streaming helpers: one batch of UNROLL rows of the active list per warp. issue() puts every
// load of the batch in flight (predicated off past the end of the list); consume() decodes and
// accumulates them, skipping the slots past the end with a warp-uniform branch.
template <int W, int VEC, int UNROLL, bool HINT>
__device__ __forceinline__ void issue(Frag<W, VEC> (&frag)[UNROLL], float (&xs)[UNROLL],
                                      const int *idx, const float *xv, int j, int nact,
                                      const char *wcol, size_t row_bytes, const float *scales,
                                      int n_groups, int group) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const bool valid = j + u * kWarps < nact;
    const int jj = min(j + u * kWarps, nact - 1);  // keeps the shared-memory read in range
    const int r = idx[jj];
    frag[u].template load<HINT>(wcol + static_cast<size_t>(r) * row_bytes, valid);
    float s = xv[jj];
    if (W == kI8) s *= load_f32(scales + static_cast<size_t>(r) * n_groups + group, valid);
    xs[u] = s;
  }
}

template <int W, int VEC, int UNROLL>
__device__ __forceinline__ void consume(const Frag<W, VEC> (&frag)[UNROLL],
                                        const float (&xs)[UNROLL], int j, int nact,
                                        float (&acc)[VEC]) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    if (j + u * kWarps < nact) {
      float f[VEC];
      frag[u].decode(f);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = fmaf(f[i], xs[u], acc[i]);
    }
  }
}

// Halves of a cluster barrier (sm_90). arrive publishes this thread's earlier memory accesses
// to the cluster; wait returns once every thread of the cluster has arrived, with their
// accesses visible.
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// Balanced splits. The blocks of one cluster are consecutive K-splits of one tile, and each
// holds the compacted list of its chunk's kept rows (idx, xv; nact entries) in K order. In rank
// order the lists join into the cluster's kept rows in K order; block r takes entries
// [r T / C, (r + 1) T / C) of the joined list (T entries, C blocks) and copies them through
// distributed shared memory into `own` (kListRows indices, then kListRows values), so the
// blocks of a cluster stream within one row of each other where their own chunks' binomial
// counts differ by several percent, and the slowest of them no longer ends the launch late.
// Returns the share's length and points *out_idx, *out_xv at it. The barrier inside makes every
// list complete before any is read; its second half, cluster_wait() in the kernel after the
// streaming, keeps every list in place until the whole cluster has copied its share. The share
// fits `own` because the host launches this only when a chunk fits one list (T <= C kListRows).
__device__ __forceinline__ int balance(int nact, const int *idx, const float *xv, int *own,
                                       int *list_n, const int **out_idx, const float **out_xv) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) *list_n = nact;
  cluster.sync();
  const int c = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  // pre[b]: entries before list b; constant indices only (a run-time index would spill pre).
  int pre[kMaxClusterSplits + 1];
  pre[0] = 0;
#pragma unroll
  for (int b = 0; b < kMaxClusterSplits; ++b) {
    pre[b + 1] = pre[b] + (b < c ? *cluster.map_shared_rank(list_n, b) : 0);
  }
  const int total = pre[kMaxClusterSplits];
  const int lo = rank * total / c;
  const int hi = (rank + 1) * total / c;
  float *own_xv = reinterpret_cast<float *>(own + kListRows);
#pragma unroll
  for (int q = 0; q < kListRows / kThreads; ++q) {
    const int j = lo + q * kThreads + static_cast<int>(threadIdx.x);
    if (j < hi) {
      // the last list starting at or before j holds it (empty lists start where the next does)
      int src = 0;
      int off = j;
#pragma unroll
      for (int b = 1; b < kMaxClusterSplits; ++b) {
        if (b < c && pre[b] <= j) {
          src = b;
          off = j - pre[b];
        }
      }
      own[j - lo] = cluster.map_shared_rank(idx, src)[off];
      own_xv[j - lo] = cluster.map_shared_rank(xv, src)[off];
    }
  }
  cluster_arrive();
  __syncthreads();
  *out_idx = own;
  *out_xv = own_xv;
  return hi - lo;
#else
  (void)idx, (void)xv, (void)own, (void)list_n, (void)out_idx, (void)out_xv;
  return nact;
#endif
}

// Hint to bring the 128-byte line holding p into L1 (and L2). Only for data that no kernel
// still running may write: issued after the dependency wait.
__device__ __forceinline__ void prefetch_l1(const void *p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
#endif
}

// Globally balanced compaction (variant 18). Every block of the launch evaluates keep[i] for
// all K inputs of its segment (the resident blocks of one multiprocessor read the same x, so
// after the first block the reads are L1 hits), counts them per round and warp, and from the
// exclusive prefix of those counts knows where each kept row falls in the segment's kept list
// of T rows, in K order. Split s stores entries [s T / S, (s + 1) T / S) of that list (S
// splits), so the splits of a tile stream within one row of each other where their own
// chunks' binomial counts differ by several percent; a second pass over only the rounds that
// hold its share writes them, with the keep bits of the first (so the two passes cannot
// disagree). `cnt` holds kGlobalSlots + 1 ints, `bits` kGlobalSlots words, `red` one float per
// warp.
// The host launches this only for K <= kGlobalMaxK and shares of at most kListRows rows.
template <bool NORM>
__device__ __forceinline__ int compact_global(const Params &p, const Seg &sg, float thr,
                                              int split, int splits, int *idx, float *xv,
                                              int *cnt, unsigned *bits, float *red) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int k = p.k;
  const float *second = NORM ? p.norm_w : p.x_up;  // at most one of them in a launch
  if (second != nullptr) {
    for (int i = tid * 32; i < k; i += kThreads * 32) prefetch_l1(second + i);
  }
  const float nscale = NORM ? rms_scale(p.x, k, p.norm_eps, red) : 1.0f;
  const int rounds = ceil_div(k, kThreads);
  constexpr int kR = 8;  // rounds whose inputs are loaded together
  // pass 1: kept rows per (round, warp)
  for (int r0 = 0; r0 < rounds; r0 += kR) {
    float xr[kR], ur[kR], fr[kR];
#pragma unroll
    for (int q = 0; q < kR; ++q) {
      const int i = (r0 + q) * kThreads + tid;
      const bool in = i < k;
      xr[q] = in ? __ldg(p.x + i) : 0.0f;
      ur[q] = (in && second != nullptr) ? __ldg(second + i) : 0.0f;
      fr[q] = (in && sg.factor != nullptr) ? __ldg(sg.factor + i) : 1.0f;
    }
#pragma unroll
    for (int q = 0; q < kR; ++q) {
      if (r0 + q >= rounds) break;
      bool keep = false;
      if ((r0 + q) * kThreads + tid < k) {
        kept_input<NORM>(p, sg, thr, nscale, xr[q], ur[q], fr[q], &keep);
      }
      const unsigned ballot = __ballot_sync(0xffffffffu, keep);
      if (lane == 0) {
        cnt[(r0 + q) * kWarps + warp] = __popc(ballot);
        bits[(r0 + q) * kWarps + warp] = ballot;
      }
    }
  }
  __syncthreads();
  // exclusive prefix over the slots in (round, warp) order, by warp 0; the total after them
  const int slots = rounds * kWarps;
  if (warp == 0) {
    constexpr int kPer = kGlobalSlots / 32;
    int v[kPer];
    int sum = 0;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int j = lane * kPer + e;
      v[e] = j < slots ? cnt[j] : 0;
      sum += v[e];
    }
    int incl = sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    int run = incl - sum;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int j = lane * kPer + e;
      if (j < slots) cnt[j] = run;
      run += v[e];
    }
    if (lane == 31) cnt[kGlobalSlots] = incl;
  }
  __syncthreads();
  const int total = cnt[kGlobalSlots];
  const int lo = static_cast<int>(static_cast<long long>(split) * total / splits);
  const int hi = static_cast<int>(static_cast<long long>(split + 1) * total / splits);
  // pass 2: the rounds that hold entries of [lo, hi) (block-uniform bounds)
  for (int r = 0; r < rounds; ++r) {
    const int first = cnt[r * kWarps];
    const int next = r + 1 < rounds ? cnt[(r + 1) * kWarps] : total;
    if (next <= lo) continue;
    if (first >= hi) break;
    const int i = r * kThreads + tid;
    const bool in = i < k;
    const float x0 = in ? __ldg(p.x + i) : 0.0f;
    const float u0 = (in && second != nullptr) ? __ldg(second + i) : 0.0f;
    const float f0 = (in && sg.factor != nullptr) ? __ldg(sg.factor + i) : 1.0f;
    bool unused;
    const float xi = kept_input<NORM>(p, sg, thr, nscale, x0, u0, f0, &unused);
    const unsigned ballot = bits[r * kWarps + warp];
    const bool keep = (ballot >> lane) & 1u;
    const int pos = cnt[r * kWarps + warp] + __popc(ballot & ((1u << lane) - 1u));
    if (keep && pos >= lo && pos < hi) {
      idx[pos - lo] = i;
      xv[pos - lo] = xi;
    }
  }
  __syncthreads();
  return hi - lo;
}

// Template switches: UNROLL loads in flight per lane; HINT the L2 256-byte prefetch hint on
// weight loads; RED the split-K reduction (kTicket / kCluster); LIGHT the ticket published and
// observed by one acquire-release atomic after a barrier (else a sequentially consistent fence in
// every thread around a relaxed atomic); PIPE two batches of UNROLL in registers, the next one's
// loads issued before the current one is decoded, so that decoding never leaves a lane with no
// load in flight; NORM a normed input; PARTS partial input rows;
// BAL the K-splits of a cluster re-cut by kept count (balance above); GBAL every split cut from
// the whole kept list (compact_global above).
template <int W, int VEC, int UNROLL, bool HINT, int RED, bool LIGHT, bool PIPE, bool NORM,
          bool PARTS, bool BAL, bool GBAL>
__global__ void __launch_bounds__(kThreads, kMinBlocks<W, VEC>) gemv_kernel(const Params p) {
  constexpr int TN = 32 * VEC;
  constexpr int kBytes = Elem<W>::kBytes;
  // Shared memory: the active-row list during streaming, reused for the warp partial sums.
  __shared__ union __align__(16) Smem {
    struct {
      int idx[kListRows];
      float xv[kListRows];
    } list;
    float red[kWarps][TN];
  } sm;
  __shared__ int warp_count[2][kWarps];
  __shared__ float warp_ss[kWarps];
  // Partial input rows (PARTS): the pass's summed x, then up, staged for the compaction.
  __shared__ float stage[PARTS ? 2 * kListRows : 1];
  // Balanced splits (BAL): this block's share of its cluster's combined list. The stage buffer
  // is free once the compaction has read it, so partial-row launches reuse it.
  __shared__ __align__(16) int bal_own[(BAL && !PARTS) ? 2 * kListRows : 1];
  __shared__ int list_n;  // this block's compacted count, read by the rest of its cluster
  __shared__ int gcount[GBAL ? kGlobalSlots + 1 : 1];  // GBAL: kept counts, then their prefix
  __shared__ unsigned gbits[GBAL ? kGlobalSlots : 1];   // GBAL: keep bits per (round, warp)
  __shared__ float csum[TN];  // this block's column sums (cluster reduction reads it remotely)
  __shared__ unsigned ticket;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int tile = blockIdx.x;  // global tile: counters and partial sums are indexed by it
  const int split = blockIdx.y;
  const int splits = gridDim.y;
  const int k_begin = split * p.rows_per_block;
  const int k_end = min(p.k, k_begin + p.rows_per_block);
  // This block's segment, chosen with constant indices only (a run-time index into the
  // parameter array would copy it to local memory).
  Seg sg = p.seg[0];
#pragma unroll
  for (int i = 1; i < kMaxSegs; ++i) {
    if (i < p.nseg && tile >= p.seg[i].tile0) sg = p.seg[i];
  }
  const int ltile = tile - sg.tile0;  // tile within the segment

  const int col = ltile * TN + lane * VEC;
  // VEC > 1 is only launched when N % VEC == 0, so a lane's columns are all in or all out.
  const bool col_ok = col < sg.n;
  const char *wcol = sg.w + static_cast<size_t>(col) * kBytes;
  const size_t row_bytes = static_cast<size_t>(sg.n) * kBytes;
  const int group = col / kGroup;

  // Speculative L2 prefetch (variants 11-13) of the first rows of this block's chunk, before the
  // dependency wait:
  // the weights are not written by the kernels this one waits for, and a prefetch changes no
  // value any load sees, so it is safe to issue while the previous kernel is still draining (its
  // tail and this kernel's x read and compaction leave the memory system idle otherwise). Rows
  // that the compaction then drops were fetched for nothing; the count is capped per block.
  if (col_ok && p.prefetch_rows > 0) {
    const int pf_end = min(k_end, k_begin + p.prefetch_rows);
    for (int r = k_begin + warp; r < pf_end; r += kWarps) {
      prefetch_l2(wcol + static_cast<size_t>(r) * row_bytes);
      if (W == kI8 && (col % kGroup) == 0) {
        prefetch_l2(sg.scales + static_cast<size_t>(r) * sg.n_groups + group);
      }
    }
  }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Programmatic dependent launch (a no-op when launched without it): wait until the previous
  // kernel in the stream has finished and its writes are visible before reading or writing any
  // global memory the kernels before may write (x, threshold, workspace counters, y); then let
  // the next kernel start launching, so its launch latency hides behind this kernel's streaming
  // and reduction tail. The next kernel's blocks only run once every block of this grid has
  // started, so they cannot starve it.
  if (p.wait) asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
  const float thr = __ldg(sg.threshold);
  // Normed input: the RMS scale of the whole x, computed in the first pass below (its loads
  // then share one L2 round trip with the pass's own inputs).
  float nscale = 1.0f;

  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;

  for (int c0 = k_begin; c0 < k_end; c0 += kListRows) {
    const int c1 = min(k_end, c0 + kListRows);
    int nact = 0;
    if constexpr (GBAL) {
      nact = compact_global<NORM>(p, sg, thr, split, splits, sm.list.idx, sm.list.xv,
                                  gcount, gbits, warp_ss);
    } else {
      // 1. compaction of the active rows of [c0, c1). Every input this pass needs (x, up,
      // factor: at most kRounds per thread) is loaded before the first ballot, so the pass waits
      // for one L2 round trip instead of one per round of kThreads rows.
      constexpr int kRounds = kListRows / kThreads;
      if constexpr (PARTS) {
        // The input arrives as x_parts partial rows (a producer's unreduced split-K sums): add
        // them in row order into shared memory first. Each thread keeps kU elements times kP rows
        // of loads in flight, so a few rows cost one L2 round trip, as a single row does.
        constexpr int kU = 4;
        constexpr int kP = 4;
        const int n = c1 - c0;
        const int total = p.x_up != nullptr ? 2 * n : n;
        for (int e0 = tid; e0 < total; e0 += kU * kThreads) {
          float a[kU];
          const float *src[kU];
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            const int e = min(e0 + u * kThreads, total - 1);
            src[u] = e < n ? p.x + c0 + e : p.x_up + c0 + (e - n);
            a[u] = 0.0f;
          }
          for (int p0 = 0; p0 < p.x_parts; p0 += kP) {
            float v[kU][kP];
#pragma unroll
            for (int u = 0; u < kU; ++u) {
#pragma unroll
              for (int q = 0; q < kP; ++q) {
                const bool ok = e0 + u * kThreads < total && p0 + q < p.x_parts;
                v[u][q] = ok ? __ldg(src[u] + static_cast<size_t>(p0 + q) * p.x_stride) : 0.0f;
              }
            }
#pragma unroll
            for (int u = 0; u < kU; ++u) {
#pragma unroll
              for (int q = 0; q < kP; ++q) a[u] += v[u][q];
            }
          }
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            if (e0 + u * kThreads < total) stage[e0 + u * kThreads] = a[u];
          }
        }
        __syncthreads();
      }
      float xr[kRounds];
      float ur[kRounds];
      float fr[kRounds];
#pragma unroll
      for (int q = 0; q < kRounds; ++q) {
        const int i = c0 + q * kThreads + tid;
        const bool in = i < c1;
        // up (gated input) or the norm weight (normed input): a launch has at most one of them
        const float *second = NORM ? p.norm_w : p.x_up;
        if constexpr (PARTS) {
          xr[q] = in ? stage[i - c0] : 0.0f;
          ur[q] = (in && second != nullptr) ? stage[(c1 - c0) + (i - c0)] : 0.0f;
        } else {
          xr[q] = in ? __ldg(p.x + i) : 0.0f;
          ur[q] = (in && second != nullptr) ? __ldg(second + i) : 0.0f;
        }
        fr[q] = (in && sg.factor != nullptr) ? __ldg(sg.factor + i) : 1.0f;
      }
      if (NORM && c0 == k_begin) nscale = rms_scale(p.x, p.k, p.norm_eps, warp_ss);
#pragma unroll
      for (int q = 0; q < kRounds; ++q) {
        const int base = c0 + q * kThreads;
        if (base >= c1) break;  // block-uniform
        const int i = base + tid;
        float xi = xr[q];
        bool keep = false;
        if (i < c1) xi = kept_input<NORM>(p, sg, thr, nscale, xi, ur[q], fr[q], &keep);
        const unsigned ballot = __ballot_sync(0xffffffffu, keep);
        const int buf = q & 1;  // double buffer: one barrier per round suffices
        if (lane == 0) warp_count[buf][warp] = __popc(ballot);
        __syncthreads();
        int offset = nact;
        int total = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          const int cnt = warp_count[buf][w];
          offset += (w < warp) ? cnt : 0;
          total += cnt;
        }
        if (keep) {
          const int pos = offset + __popc(ballot & ((1u << lane) - 1u));
          sm.list.idx[pos] = i;
          sm.list.xv[pos] = xi;
        }
        nact += total;
      }
      __syncthreads();
    }
    const int *lidx = sm.list.idx;
    const float *lxv = sm.list.xv;
    if constexpr (BAL) nact = balance(nact, sm.list.idx, sm.list.xv,
                                      PARTS ? reinterpret_cast<int *>(stage) : bal_own,
                                      &list_n, &lidx, &lxv);

    // 2. streaming over the active rows
    if (col_ok && nact > 0) {
      constexpr int kStep = kWarps * UNROLL;
      Frag<W, VEC> fa[UNROLL];
      float xa[UNROLL];
      if constexpr (PIPE) {
        Frag<W, VEC> fb[UNROLL];
        float xb[UNROLL];
        int j = warp;
        issue<W, VEC, UNROLL, HINT>(fa, xa, lidx, lxv, j, nact, wcol, row_bytes,
                                    sg.scales, sg.n_groups, group);
        while (true) {
          issue<W, VEC, UNROLL, HINT>(fb, xb, lidx, lxv, j + kStep, nact, wcol,
                                      row_bytes, sg.scales, sg.n_groups, group);
          consume<W, VEC, UNROLL>(fa, xa, j, nact, acc);
          j += kStep;
          if (j >= nact) break;
          issue<W, VEC, UNROLL, HINT>(fa, xa, lidx, lxv, j + kStep, nact, wcol,
                                      row_bytes, sg.scales, sg.n_groups, group);
          consume<W, VEC, UNROLL>(fb, xb, j, nact, acc);
          j += kStep;
          if (j >= nact) break;
        }
      } else {
        for (int j = warp; j < nact; j += kStep) {
          // All UNROLL loads are issued before any is used (see load16).
          issue<W, VEC, UNROLL, HINT>(fa, xa, lidx, lxv, j, nact, wcol,
                                      row_bytes, sg.scales, sg.n_groups, group);
          consume<W, VEC, UNROLL>(fa, xa, j, nact, acc);
        }
      }
    }
    __syncthreads();  // the list is overwritten by the next pass or by the warp sums
  }
  // Balanced splits: the rest of the cluster may still read this block's list, which the warp
  // sums below overwrite (and which must outlive the block).
  if constexpr (BAL) cluster_wait();

  // 3a. warps -> block: column sums in a fixed warp order
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      *reinterpret_cast<float4 *>(&sm.red[warp][lane * VEC + i]) =
          make_float4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) sm.red[warp][lane * VEC + i] = acc[i];
  }
  __syncthreads();
  for (int cc = tid; cc < TN; cc += kThreads) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += sm.red[w][cc];
    const int n = ltile * TN + cc;
    if (p.y_parts) {  // left for the consumer to add (no accumulate with partial outputs)
      if (n < sg.n) __stcg(sg.y + static_cast<size_t>(split) * p.y_stride + n, s);
    } else if (splits == 1) {
      if (n < sg.n) sg.y[n] = p.accumulate ? sg.y[n] + s : s;
    } else if (RED == kTicket) {
      __stcg(p.partial + static_cast<size_t>(split) * p.ld + tile * TN + cc, s);
    } else {
      csum[cc] = s;
    }
  }
  if (splits == 1 || p.y_parts) return;

  if (RED == kTicket) {
    // 3b. splits -> y by the last block of this tile to arrive. atomicInc wraps to 0 after
    // splits - 1: the last arrival leaves the counter reset.
    if constexpr (LIGHT) {
      // The barrier orders every thread's partial stores before thread 0's release; its
      // acquire, then the barrier, orders the other blocks' partials before the reads below.
      __syncthreads();
      if (tid == 0) {
        ticket = atomic_inc_acq_rel(p.counters + tile, static_cast<unsigned>(splits - 1));
      }
      __syncthreads();
      if (ticket != static_cast<unsigned>(splits - 1)) return;
    } else {
      __threadfence();  // this block's partials are visible device-wide before its ticket
      __syncthreads();
      if (tid == 0) {
        ticket = atomicInc(p.counters + tile, static_cast<unsigned>(splits - 1));
      }
      __syncthreads();
      if (ticket != static_cast<unsigned>(splits - 1)) return;
      __threadfence();  // order the partial reads after observing every other block's ticket
    }

    // Each thread sums 4 columns over a strided subset of the splits with independent 16-byte
    // loads, so the tail costs about one L2 round trip instead of one per split.
    constexpr int TN4 = TN / 4;
    constexpr int G = (kThreads / TN4 < kWarps) ? kThreads / TN4 : kWarps;
    const int q = tid % TN4;
    const int g = tid / TN4;  // sm.red is free: every read of it above precedes the barrier
    if (g < G) {
      const float4 *src = reinterpret_cast<const float4 *>(p.partial + tile * TN) + q;
      float4 s4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
      for (int sp = g; sp < splits; sp += G) {
        const float4 v = __ldcg(src + static_cast<size_t>(sp) * (p.ld / 4));
        s4.x += v.x;
        s4.y += v.y;
        s4.z += v.z;
        s4.w += v.w;
      }
      float *dst = &sm.red[g][4 * q];
      dst[0] = s4.x;
      dst[1] = s4.y;
      dst[2] = s4.z;
      dst[3] = s4.w;
    }
    __syncthreads();
    for (int cc = tid; cc < TN; cc += kThreads) {
      float s = 0.0f;
#pragma unroll
      for (int gg = 0; gg < G; ++gg) s += sm.red[gg][cc];
      const int n = ltile * TN + cc;
      if (n < sg.n) sg.y[n] = p.accumulate ? sg.y[n] + s : s;
    }
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // 3b'. splits -> y through distributed shared memory: the cluster is the `splits` blocks of
    // this tile; block r adds columns [r * chunk, (r + 1) * chunk) over all blocks in rank order.
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    const int rank = static_cast<int>(cluster.block_rank());
    const int chunk = ceil_div(TN, splits);
    const int hi = min(TN, (rank + 1) * chunk);
    for (int cc = rank * chunk + tid; cc < hi; cc += kThreads) {
      float s = 0.0f;
      for (int b = 0; b < splits; ++b) s += cluster.map_shared_rank(csum, b)[cc];
      const int n = ltile * TN + cc;
      if (n < sg.n) sg.y[n] = p.accumulate ? sg.y[n] + s : s;
    }
    cluster.sync();  // no block may exit while another still reads its shared memory
#endif
  }
}

// ---- host side --------------------------------------------------------------------------------

cudaError_t device_sms(int *sms) {
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices) {
    *sms = cache[dev].load(std::memory_order_relaxed);
    if (*sms > 0) return cudaSuccess;
  }
  err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(*sms, std::memory_order_relaxed);
  return cudaSuccess;
}

cudaError_t device_major(int dev, int *major) {
  static std::atomic<int> cache[kMaxDevices];
  if (dev >= 0 && dev < kMaxDevices) {
    *major = cache[dev].load(std::memory_order_relaxed);
    if (*major > 0) return cudaSuccess;
  }
  cudaError_t err = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(*major, std::memory_order_relaxed);
  return cudaSuccess;
}

struct Args {
  sparsify_gemv_segment seg[kMaxSegs];
  int nseg;
  const float *x;
  const float *x_up;
  int act;
  const float *norm_w;
  float norm_eps;
  int accumulate;
  int k;
  void *workspace;
  size_t workspace_bytes;
  int blocks_per_sm;
  cudaStream_t stream;
  bool pdl;  // launch with programmatic dependent launch (compute capability 9.0+)
  int waves;  // grid size in waves of resident blocks (1 = every block starts at once)
  int prefetch_q;  // L2 prefetch before the wait, in quarters of kPrefetchBytesPerSM
  int x_parts;     // partial input rows (>= 1) and their stride in floats
  int x_stride;
  int y_parts;     // 0, or the split count, for partial outputs y + split * y_stride
  int y_stride;
  int *plan;       // non-null: store the launch's split count here and launch nothing
  bool any_fit;    // balanced splits even if their clusters are not all resident at once
  bool bare_cluster;  // launch in the clusters of balanced splits without balancing (timing)
};

// Blocks per cluster for balanced splits: the largest divisor of `splits` up to the portable
// cluster size, as the cluster must tile the grid's split dimension; 1 = no balancing.
int balance_cluster(int splits) {
  for (int c = kMaxClusterSplits; c >= 2; --c) {
    if (splits % c == 0) return c;
  }
  return 1;
}

template <int W, int VEC, int UNROLL, bool HINT, int RED, bool LIGHT = true, bool PIPE = false,
          bool NORM = false, bool PARTS = false, bool BAL = false, bool GBAL = false>
cudaError_t launch(const Args &a) {
  constexpr int TN = 32 * VEC;
  constexpr int kBytes = Elem<W>::kBytes;
  static_assert(!BAL || RED == kTicket, "balanced splits reduce by ticket");
  static_assert(!(BAL && GBAL) && !(GBAL && PARTS), "one balancing, on a reduced input");
  auto kernel = gemv_kernel<W, VEC, UNROLL, HINT, RED, LIGHT, PIPE, NORM, PARTS, BAL, GBAL>;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  int sms = 0;
  err = device_sms(&sms);
  if (err != cudaSuccess) return err;
  // Resident blocks per multiprocessor for this kernel, cached per device.
  static std::atomic<int> occ_cache[kMaxDevices];
  int occ = (dev < kMaxDevices) ? occ_cache[dev].load(std::memory_order_relaxed) : 0;
  if (occ <= 0) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kThreads, 0);
    if (err != cudaSuccess) return err;
    if (occ <= 0) occ = 1;
    if (dev < kMaxDevices) occ_cache[dev].store(occ, std::memory_order_relaxed);
  }
  // SPARSIFY_GEMV_BLOCKS_PER_SM=N (benchmarks only) caps every launch that sets no cap itself.
  const int cap = a.blocks_per_sm > 0 ? a.blocks_per_sm : env_int("SPARSIFY_GEMV_BLOCKS_PER_SM");
  const int per_sm = (cap > 0 && cap < occ) ? cap : occ;

  Params p;
  int tiles = 0;
  for (int i = 0; i < kMaxSegs; ++i) {
    Seg &d = p.seg[i];
    const sparsify_gemv_segment &s = a.seg[i < a.nseg ? i : 0];
    d.w = static_cast<const char *>(s.w);
    d.scales = s.scales;
    d.factor = s.factor;
    d.threshold = s.threshold;
    d.y = s.y;
    d.n = s.n;
    d.n_groups = ceil_div(s.n, kGroup);
    d.tile0 = tiles;
    // Unused slots repeat segment 0 with a first tile past the grid, so no block selects them.
    if (i < a.nseg) tiles += ceil_div(s.n, TN);
  }
  for (int i = a.nseg; i < kMaxSegs; ++i) p.seg[i].tile0 = tiles;

  // Split K so that tiles * splits fills one wave of resident blocks: every block starts at
  // once, and none waits for a second wave that would stretch the tail.
  const int max_splits = (RED == kCluster) ? kMaxClusterSplits : kMaxSplits;
  int splits = (sms * per_sm * a.waves) / tiles;
  splits = splits < 1 ? 1 : (splits > max_splits ? max_splits : splits);
  if (tiles > kMaxTiles) splits = 1;
  const int by_rows = ceil_div(a.k, kMinRowsPerBlock);
  if (splits > by_rows) splits = by_rows;
  const int rows = static_cast<int>(round_up(ceil_div(a.k, splits), 32));
  splits = ceil_div(a.k, rows);
  if (a.plan != nullptr) {
    *a.plan = splits;
    return cudaSuccess;
  }
  // Partial outputs have one row per split: the caller sized them from sparsify_gemv_group_splits.
  if (a.y_parts != 0 && a.y_parts != splits) return cudaErrorInvalidValue;
  // Balanced splits need clusters of two or more splits, each chunk in one pass of the list, and
  // every cluster resident at once (the grid is one wave); otherwise the same launch without.
  int cluster = 1;
  if constexpr (BAL) {
    cluster = rows <= kListRows ? balance_cluster(splits) : 1;
    if (cluster > 1) {
      static std::atomic<int> fit_cache[kMaxDevices][kMaxClusterSplits + 1];
      int fit = (dev < kMaxDevices) ? fit_cache[dev][cluster].load(std::memory_order_relaxed) : 0;
      if (fit <= 0) {
        cudaLaunchConfig_t q = {};
        q.gridDim = dim3(tiles, splits);
        q.blockDim = dim3(kThreads);
        cudaLaunchAttribute ca;
        ca.id = cudaLaunchAttributeClusterDimension;
        ca.val.clusterDim.x = 1;
        ca.val.clusterDim.y = cluster;
        ca.val.clusterDim.z = 1;
        q.attrs = &ca;
        q.numAttrs = 1;
        err = cudaOccupancyMaxActiveClusters(&fit, kernel, &q);
        if (err != cudaSuccess) return err;
        fit = fit < 1 ? 1 : fit;
        if (dev < kMaxDevices) fit_cache[dev][cluster].store(fit, std::memory_order_relaxed);
      }
      if (!a.any_fit &&
          static_cast<long long>(fit) * cluster < static_cast<long long>(tiles) * splits) {
        cluster = 1;
      }
    }
    if (cluster == 1) return launch<W, VEC, UNROLL, HINT, RED, LIGHT, PIPE, NORM, PARTS, false>(a);
  } else if (RED == kTicket && a.bare_cluster) {
    cluster = rows <= kListRows ? balance_cluster(splits) : 1;
  }
  // Globally balanced splits: every block reads all of x, so only for K up to kGlobalMaxK; a
  // share must fit one list.
  if constexpr (GBAL) {
    if (splits < 2 || rows > kListRows || a.k > kGlobalMaxK) {
      return launch<W, VEC, UNROLL, HINT, RED, LIGHT, PIPE, NORM, PARTS, false, false>(a);
    }
  }

  p.nseg = a.nseg;
  p.x = a.x;
  p.x_up = a.x_up;
  p.act = a.act;
  p.norm_w = a.norm_w;
  p.norm_eps = a.norm_eps;
  p.accumulate = a.accumulate;
  p.k = a.k;
  p.x_parts = a.x_parts > 1 ? a.x_parts : 1;
  p.x_stride = a.x_stride;
  p.y_parts = a.y_parts;
  p.y_stride = a.y_stride;
  p.wait = 1;
  if (const int bits = env_int("SPARSIFY_DIAG_NO_WAIT")) {  // timing diagnostic, sparse_gemv.h
    // Timing diagnostic: launches that read another kernel's per-tile products skip the wait.
    const bool parts_in = a.x_parts > 1;
    const bool plain_acc = a.accumulate && a.x_parts <= 1 && a.x_up == nullptr &&
                           a.norm_w == nullptr;
    if (((bits & 1) && parts_in) || ((bits & 2) && plain_acc)) p.wait = 0;
  }
  p.rows_per_block = rows;
  // Rows per block so that the resident blocks of one SM prefetch the budget together.
  p.prefetch_rows = static_cast<int>(static_cast<long long>(kPrefetchBytesPerSM) * a.prefetch_q /
                                     (4LL * per_sm * TN * kBytes));
  p.ld = tiles * TN;
  p.counters = static_cast<unsigned *>(a.workspace);
  p.partial = reinterpret_cast<float *>(static_cast<char *>(a.workspace) + kCounterBytes);
  if (RED == kTicket && splits > 1 && a.y_parts == 0) {
    const size_t need = kCounterBytes + static_cast<size_t>(splits) * p.ld * 4;
    if (a.workspace == nullptr || a.workspace_bytes < need) return cudaErrorInvalidValue;
  }

  const dim3 grid(tiles, splits);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = a.stream;
  cudaLaunchAttribute attr[2];
  int n_attr = 0;
  if ((RED == kCluster && splits > 1) || cluster > 1) {
    attr[n_attr].id = cudaLaunchAttributeClusterDimension;
    attr[n_attr].val.clusterDim.x = 1;
    attr[n_attr].val.clusterDim.y = cluster > 1 ? cluster : splits;
    attr[n_attr].val.clusterDim.z = 1;
    ++n_attr;
  }
  if (a.pdl) {
    attr[n_attr].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n_attr].val.programmaticStreamSerializationAllowed = 1;
    ++n_attr;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n_attr;
  err = cudaLaunchKernelEx(&cfg, kernel, p);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

bool aligned(const void *p, size_t b) { return reinterpret_cast<uintptr_t>(p) % b == 0; }

template <int W>
cudaError_t dispatch(const Args &a, int variant) {
  if (a.k < 0 || a.nseg < 1 || a.nseg > kMaxSegs) return cudaErrorInvalidValue;
  // K = 0 reads no input and no weights: empty arrays may come as null pointers.
  if ((a.x == nullptr && a.k > 0) || !aligned(a.x, 4) || !aligned(a.x_up, 4) ||
      !aligned(a.norm_w, 4) || !aligned(a.workspace, 16)) {
    return cudaErrorInvalidValue;
  }
  if (a.x_up != nullptr && a.norm_w != nullptr) return cudaErrorInvalidValue;
  if (a.norm_w != nullptr && !(a.norm_eps >= 0.0f)) return cudaErrorInvalidValue;
  // Partial input rows: not with a normed input (its scale sums all of x), rows at least K apart.
  if (a.x_parts < 0 || a.y_parts < 0) return cudaErrorInvalidValue;
  if (a.x_parts > 1 && (a.norm_w != nullptr || a.x_stride < a.k)) return cudaErrorInvalidValue;
  // Partial outputs are plain stores of the split sums: nothing to accumulate into.
  if (a.y_parts > 0 && a.accumulate) return cudaErrorInvalidValue;
  if (a.x_up != nullptr && a.act != SPARSIFY_GEMV_ACT_SILU &&
      a.act != SPARSIFY_GEMV_ACT_GELU_TANH) {
    return cudaErrorInvalidValue;
  }
  constexpr int VEC = 16 / Elem<W>::kBytes;
  bool vec = true;
  int n_total = 0;
  for (int i = 0; i < a.nseg; ++i) {
    const sparsify_gemv_segment &s = a.seg[i];
    if (s.n < 0) return cudaErrorInvalidValue;
    if (s.n == 0) continue;  // nothing to write, nothing read
    if (s.w == nullptr && a.k > 0) return cudaErrorInvalidValue;
    if (a.plan == nullptr && (s.threshold == nullptr || s.y == nullptr)) {
      return cudaErrorInvalidValue;
    }
    if (a.y_parts > 1 && a.y_stride < s.n) return cudaErrorInvalidValue;
    if (W == kI8 && s.scales == nullptr && a.k > 0 && a.plan == nullptr) {
      return cudaErrorInvalidValue;
    }
    if (!aligned(s.y, 4) || !aligned(s.threshold, 4) || !aligned(s.factor, 4) ||
        !aligned(s.scales, 4) || !aligned(s.w, Elem<W>::kBytes)) {
      return cudaErrorInvalidValue;
    }
    vec = vec && aligned(s.w, 16) && (static_cast<size_t>(s.n) * Elem<W>::kBytes) % 16 == 0;
    n_total += s.n;
  }
  if (n_total == 0 || a.k == 0) {
    if (a.plan != nullptr) {
      *a.plan = 1;  // y = 0 (or y += 0): one row
      return cudaSuccess;
    }
    if (n_total == 0) return cudaSuccess;
    if (a.y_parts > 1) return cudaErrorInvalidValue;
  }
  // Empty segments take no tiles: drop them so that every segment in the launch has one.
  Args b = a;
  b.nseg = 0;
  for (int i = 0; i < a.nseg; ++i) {
    if (a.seg[i].n > 0) b.seg[b.nseg++] = a.seg[i];
  }
  if (a.k == 0) {
    if (a.accumulate) return cudaSuccess;  // y += 0
    for (int i = 0; i < b.nseg; ++i) {
      cudaError_t e = cudaMemsetAsync(b.seg[i].y, 0, static_cast<size_t>(b.seg[i].n) * 4,
                                      a.stream);
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  }

  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  int major = 0;
  err = device_major(dev, &major);
  if (err != cudaSuccess) return err;
  b.pdl = major >= 9 && variant != 2 && variant != 15;
  b.any_fit = variant == 16;
  b.bare_cluster = variant == 17;
  b.waves = 1;
  b.prefetch_q = 0;

  // A normed input runs its own instantiation of the default launch (the norm's extra live
  // values would otherwise push every launch's registers into local memory), for any variant;
  // only the prefetch of variants 11 and 12, a launch parameter, carries over to it.
  // Variant 14 (balanced splits) carries over to both, too.
  // Variant 18 (globally balanced splits) carries over to normed inputs.
  const bool bal = (variant == 14 || variant == 15 || variant == 16) && major >= 9;
  if (b.norm_w != nullptr) {
    if (!vec) return launch<W, 1, 8, false, kTicket, true, false, true>(b);
    if (variant == 11 || variant == 12) b.prefetch_q = variant == 11 ? 4 : 8;
    if (bal) return launch<W, VEC, 4, true, kTicket, true, true, true, false, true>(b);
    if (variant == 18) {
      return launch<W, VEC, 4, true, kTicket, true, true, true, false, false, true>(b);
    }
    return launch<W, VEC, 4, true, kTicket, true, true, true>(b);
  }
  // Partial input rows likewise (the staging buffer in shared memory is theirs alone).
  if (b.x_parts > 1) {
    if (!vec) return launch<W, 1, 8, false, kTicket, true, false, false, true>(b);
    if (bal) return launch<W, VEC, 4, true, kTicket, true, true, false, true, true>(b);
    return launch<W, VEC, 4, true, kTicket, true, true, false, true>(b);
  }
  if (!vec) return launch<W, 1, 8, false, kTicket>(b);
  // Default: two batches of four 16-byte loads per lane, the next batch in flight while the
  // current one is decoded (run H4: 0.3-1.4 us faster than eight loads issued and then decoded,
  // most for int8, whose decode is three instructions per byte), and no L2 prefetch before the
  // wait (it gained ~1 us at 0% on the large shapes but lost as much at 90%, and the whole
  // decode step ran 1.1% faster without it: kernels/cuda/NOTES.md, run H4).
  switch (variant) {
    case 0:
    case 2: return launch<W, VEC, 4, true, kTicket, true, true>(b);
    case 1: return launch<W, VEC, 4, true, kTicket>(b);
    case 3:
      if (major < 9) return cudaErrorNotSupported;
      return launch<W, VEC, 4, true, kCluster, true, true>(b);
    case 6:
    case 7:
      b.waves = variant == 6 ? 2 : 4;
      return launch<W, VEC, 4, true, kTicket, true, true>(b);
    case 8: return launch<W, VEC, 8, true, kTicket>(b);
    case 9: return launch<W, VEC, 4, true, kTicket, false, true>(b);
    case 10: return launch<W, VEC, 8, true, kTicket, false>(b);
    case 11:
    case 12:
      b.prefetch_q = variant == 11 ? 4 : 8;
      return launch<W, VEC, 4, true, kTicket, true, true>(b);
    case 13:
      b.prefetch_q = 4;
      return launch<W, VEC, 8, true, kTicket>(b);
    case 14:
    case 15:
    case 16:
      if (major < 9) return cudaErrorNotSupported;
      return launch<W, VEC, 4, true, kTicket, true, true, false, false, true>(b);
    case 17:
      if (major < 9) return cudaErrorNotSupported;
      return launch<W, VEC, 4, true, kTicket, true, true>(b);
    case 18: return launch<W, VEC, 4, true, kTicket, true, true, false, false, false, true>(b);
    default: return cudaErrorInvalidValue;
  }
}

// SPARSIFY_GEMV_VARIANT=N (benchmarks only) makes every default launch (variant 0, including
// the plain and grouped entry points) run variant N instead, so a whole decode step can be timed
// with another launch configuration without changing the engine.
int default_variant() { return env_int("SPARSIFY_GEMV_VARIANT"); }

cudaError_t dispatch_any(int wtype, const Args &a, int variant) {
  if (variant == 0) variant = default_variant();
  switch (wtype) {
    case SPARSIFY_GEMV_F16: return dispatch<kF16>(a, variant);
    case SPARSIFY_GEMV_BF16: return dispatch<kBF16>(a, variant);
    case SPARSIFY_GEMV_I8: return dispatch<kI8>(a, variant);
    default: return cudaErrorInvalidValue;
  }
}

Args group_args(const sparsify_gemv_segment *segs, int nseg, const sparsify_gemv_input *in,
                int k) {
  Args a = {};
  for (int i = 0; i < nseg; ++i) a.seg[i] = segs[i];
  a.nseg = nseg;
  a.x = in->x;
  a.x_up = in->x_up;
  a.act = in->act;
  a.norm_w = in->norm_w;
  a.norm_eps = in->norm_eps;
  a.accumulate = in->accumulate != 0;
  a.x_parts = in->x_parts;
  a.x_stride = in->x_stride;
  a.y_parts = in->y_parts;
  a.y_stride = in->y_stride;
  a.k = k;
  return a;
}

}  // namespace

extern "C" {

size_t sparsify_gemv_workspace_bytes(int k, int n) {
  if (k <= 0 || n <= 0) return kCounterBytes;
  // Partial rows are N rounded up to a tile, at most the widest tile.
  const int splits_max = ceil_div(k, kMinRowsPerBlock) < kMaxSplits
                             ? ceil_div(k, kMinRowsPerBlock) : kMaxSplits;
  return kCounterBytes +
         static_cast<size_t>(splits_max) * round_up(static_cast<size_t>(n), kWidestTile) * 4;
}

size_t sparsify_gemv_group_workspace_bytes(int k, const int *n, int nseg) {
  // Each segment starts on a fresh tile, so its width counts rounded up to the widest tile.
  size_t total = 0;
  for (int i = 0; i < nseg; ++i) {
    if (n[i] > 0) total += round_up(static_cast<size_t>(n[i]), kWidestTile);
  }
  if (total > static_cast<size_t>(INT32_MAX)) total = INT32_MAX;
  return sparsify_gemv_workspace_bytes(k, static_cast<int>(total));
}

cudaError_t sparsify_gemv_tuned(int wtype, const void *w, const float *scales, const float *x,
                                const float *factor, const float *threshold, float *y, int k,
                                int n, void *workspace, size_t workspace_bytes, int variant,
                                int blocks_per_sm, cudaStream_t stream) {
  Args a = {};
  a.seg[0] = sparsify_gemv_segment{w, scales, factor, threshold, y, n};
  a.nseg = 1;
  a.x = x;
  a.k = k;
  a.workspace = workspace;
  a.workspace_bytes = workspace_bytes;
  a.blocks_per_sm = blocks_per_sm;
  a.stream = stream;
  return dispatch_any(wtype, a, variant);
}

cudaError_t sparsify_gemv_group_ex(int wtype, const sparsify_gemv_segment *segs, int nseg,
                                   const sparsify_gemv_input *in, int k, void *workspace,
                                   size_t workspace_bytes, cudaStream_t stream) {
  if (segs == nullptr || in == nullptr || nseg < 1 || nseg > kMaxSegs) {
    return cudaErrorInvalidValue;
  }
  Args a = group_args(segs, nseg, in, k);
  a.workspace = workspace;
  a.workspace_bytes = workspace_bytes;
  a.stream = stream;
  return dispatch_any(wtype, a, 0);
}

cudaError_t sparsify_gemv_group_splits(int wtype, const sparsify_gemv_segment *segs, int nseg,
                                       const sparsify_gemv_input *in, int k, int *splits) {
  if (segs == nullptr || in == nullptr || splits == nullptr || nseg < 1 || nseg > kMaxSegs) {
    return cudaErrorInvalidValue;
  }
  Args a = group_args(segs, nseg, in, k);
  a.y_parts = 0;  // the count asked for: not checked against itself
  a.plan = splits;
  return dispatch_any(wtype, a, 0);
}

cudaError_t sparsify_gemv_group(int wtype, const sparsify_gemv_segment *segs, int nseg,
                                const float *x, const float *x_up, int act, int k,
                                void *workspace, size_t workspace_bytes, cudaStream_t stream) {
  sparsify_gemv_input in = {};
  in.x = x;
  in.x_up = x_up;
  in.act = act;
  return sparsify_gemv_group_ex(wtype, segs, nseg, &in, k, workspace, workspace_bytes, stream);
}

cudaError_t sparsify_gemv_f16(const void *w, const float *x, const float *factor,
                              const float *threshold, float *y, int k, int n, void *workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
  return sparsify_gemv_tuned(SPARSIFY_GEMV_F16, w, nullptr, x, factor, threshold, y, k, n,
                             workspace, workspace_bytes, 0, 0, stream);
}

cudaError_t sparsify_gemv_bf16(const void *w, const float *x, const float *factor,
                               const float *threshold, float *y, int k, int n, void *workspace,
                               size_t workspace_bytes, cudaStream_t stream) {
  return sparsify_gemv_tuned(SPARSIFY_GEMV_BF16, w, nullptr, x, factor, threshold, y, k, n,
                             workspace, workspace_bytes, 0, 0, stream);
}

cudaError_t sparsify_gemv_i8(const int8_t *w, const float *scales, const float *x,
                             const float *factor, const float *threshold, float *y, int k, int n,
                             void *workspace, size_t workspace_bytes, cudaStream_t stream) {
  return sparsify_gemv_tuned(SPARSIFY_GEMV_I8, w, scales, x, factor, threshold, y, k, n,
                             workspace, workspace_bytes, 0, 0, stream);
}

const char *sparsify_gemv_error_string(cudaError_t err) { return cudaGetErrorString(err); }

}  // extern "C"
