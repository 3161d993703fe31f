// decode_ops.cu - residual add + RMS norm, and decode attention, for one token (decode_ops.h).
//
// Both kernels are latency-bound, not bandwidth-bound: at batch 1 they move kilobytes to a few
// megabytes, so what matters is the number of launches and how many loads each thread keeps in
// flight. Attention therefore runs one 1024-thread block per query head with several keys per
// warp and several values per thread loaded before any is used. At short contexts that block
// sees every visible key and needs no cross-block reduction; past a few hundred keys its loops
// are rounds of L2/DRAM round trips on one multiprocessor per head, so the visible keys are cut
// into up to `splits` ranges, one block each, whose partial softmax sums the last block of the
// head to arrive combines (split-KV, as in flash-decoding).
#include "decode_ops.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>

#include "common.cuh"

namespace {

constexpr int kNormThreads = 1024;
constexpr int kAttnThreads = 1024;
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kMaxHeadDim = 512;
constexpr int kKeysPerWarp = 4;     // keys whose dot products one warp has in flight
constexpr int kValuesPerThread = 4;  // value rows one thread has in flight
// Partial sums of the value phase: (groups, dv) with groups * dv / 4 = kAttnThreads.
constexpr int kPartFloats = 4 * kAttnThreads;
constexpr int kMaxDevices = 64;
constexpr int kMaxAttnSplits = 64;
constexpr int kMinSplitKeys = 256;  // a split takes at least this many keys (decode_ops.h)

__device__ __forceinline__ void wait_previous_grid(bool wait = true) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Programmatic dependent launch (a no-op without it): the previous kernel's writes are
  // visible after the wait; the next kernel may then begin its launch early. `wait` is false
  // only under the timing diagnostic SPARSIFY_DIAG_NO_WAIT (results are then wrong).
  if (wait) asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// L2 prefetch of `bytes` bytes from `p` (a hint: no value any load sees changes). One bulk
// prefetch when the range is 16-byte aligned on compute capability 9.0+, else one per line.
__device__ __forceinline__ void prefetch_l2_range(const char *p, unsigned bytes, bool bulk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (bulk) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
    return;
  }
#endif
  for (unsigned o = 0; o < bytes; o += 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p + o));
  }
}

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

// Block-wide sum (or max) in a fixed order, the same value in every thread. `red` holds one
// float per warp; the leading barrier lets consecutive calls reuse it.
template <bool kMax, int kBlockThreads>
__device__ float block_reduce(float v, float *red) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  constexpr int warps = kBlockThreads / 32;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < warps; ++w) r = kMax ? fmaxf(r, red[w]) : r + red[w];
  return r;
}

__global__ void __launch_bounds__(kNormThreads)
    add_rms_norm_kernel(float *__restrict__ h, const float *__restrict__ r,
                        const float *__restrict__ post_w, const float *__restrict__ w,
                        float *__restrict__ x, int d, float eps) {
  __shared__ float red[32];
  wait_previous_grid();
  const float inv_d = 1.0f / static_cast<float>(d);
  float rs = 1.0f;
  if (r != nullptr && post_w != nullptr) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += kNormThreads) ss += r[i] * r[i];
    rs = rsqrtf(block_reduce<false, kNormThreads>(ss, red) * inv_d + eps);
  }
  // Each element is read, updated and normed by the same thread: no barrier between the passes.
  float ss = 0.0f;
  for (int i = threadIdx.x; i < d; i += kNormThreads) {
    float v = h[i];
    if (r != nullptr) v += (post_w != nullptr) ? r[i] * rs * post_w[i] : r[i];
    h[i] = v;
    ss += v * v;
  }
  const float s = rsqrtf(block_reduce<false, kNormThreads>(ss, red) * inv_d + eps);
  for (int i = threadIdx.x; i < d; i += kNormThreads) x[i] = h[i] * s * w[i];
}

struct AttnParams {
  const float *qkv;
  void *kc;  // float, or __half with SPARSIFY_ATTN_CACHE_F16 (the kernel's C)
  void *vc;
  const long long *pos;
  const float *cos_t;
  const float *sin_t;
  const int *perm;
  const float *q_norm;
  const float *k_norm;
  float *out;
  int parts, stride;  // qkv is `parts` partial rows `stride` floats apart, added here
  int n_head, n_head_kv, dk, dv, max_len, window;
  float scale, eps;
  // The projection that reads out (sparsify_next_rows): rows it keeps are prefetched into L2.
  const char *next_w;  // NULL: no prefetch
  const float *next_scales;
  const float *next_factor;
  const float *next_threshold;
  unsigned next_row_bytes, next_scale_bytes;
  int next_scale_row;  // floats per scale row
  bool next_bulk;      // every prefetched range is 16-byte aligned
  bool prefetch_cache;  // L2 prefetch of the visible cache rows before the wait
  bool wait;           // false only under SPARSIFY_DIAG_NO_WAIT
  // Split-KV: the grid is splits * n_head blocks, block b takes head b % n_head and key range
  // b / n_head of the launch's nsplit = max(1, min(splits, floor(visible / min_keys))) ranges.
  int splits, min_keys;
  int score_cap;        // floats of the score buffer (>= the longest range a block can get)
  float *work;          // (n_head, splits, dv + 2) partial sums, maxima, denominators
  unsigned *counters;   // (n_head,) arrival tickets, zero between launches
};

// Before the wait for the previous kernel (SPARSIFY_ATTN_PREFETCH_CACHE): start fetching into
// L2 the cache rows this block will read, positions a .. b - 1 (a <= b <= pos: earlier steps
// wrote them); the rep query heads of a group take a share each.
template <typename C>
__device__ __forceinline__ void prefetch_cache_range(const AttnParams &p, int a, int b, int h,
                                                     int g, int rep, int dk, int dv) {
  const int share = (b - a + rep - 1) / rep;
  const int r0 = a + (h % rep) * share;
  const int r1 = min(b, r0 + share);
  if (r1 <= r0) return;
  // 16 KB pieces, one per thread: 16-byte aligned for float rows, since dk and dv are
  // multiples of 4; for half rows when they are multiples of 8 (else one prefetch per line)
  constexpr unsigned kPiece = 16384;
  const bool bulk = sizeof(C) == 4 || (dk % 8 == 0 && dv % 8 == 0);
  const char *ranges[2] = {
      reinterpret_cast<const char *>(static_cast<const C *>(p.kc) +
                                     (static_cast<size_t>(g) * p.max_len + r0) * dk),
      reinterpret_cast<const char *>(static_cast<const C *>(p.vc) +
                                     (static_cast<size_t>(g) * p.max_len + r0) * dv)};
  const size_t bytes[2] = {static_cast<size_t>(r1 - r0) * dk * sizeof(C),
                           static_cast<size_t>(r1 - r0) * dv * sizeof(C)};
  for (int c = 0; c < 2; ++c) {
    for (size_t o = static_cast<size_t>(threadIdx.x) * kPiece; o < bytes[c];
         o += static_cast<size_t>(kAttnThreads) * kPiece) {
      const size_t left = bytes[c] - o;
      prefetch_l2_range(ranges[c] + o, static_cast<unsigned>(left < kPiece ? left : kPiece),
                        bulk);
    }
  }
}

// The same for a block that reads every visible key, t0 .. pos - 1.
template <typename C>
__device__ __forceinline__ void prefetch_cache_rows(const AttnParams &p, int pos, int h, int g,
                                                    int rep, int dk, int dv) {
  if (pos <= 0) return;  // pos < max_len: checked by the caller
  const int t0 = p.window > 0 ? max(0, pos - p.window + 1) : 0;
  prefetch_cache_range<C>(p, t0, pos, h, g, rep, dk, dv);
}

// Four consecutive elements of a cache row (4 * c .. 4 * c + 3): one 16-byte load of a float
// row, one 8-byte load of a half row. load_row4_raw gives the loaded word (Row4<C>::Raw) and
// row4_floats its floats, for loops that issue a batch of loads before converting any.
template <typename C> struct Row4;
template <> struct Row4<float> { using Raw = float4; };
template <> struct Row4<__half> { using Raw = uint2; };

__device__ __forceinline__ float4 load_row4_raw(const float *row, int c) {
  return reinterpret_cast<const float4 *>(row)[c];
}

__device__ __forceinline__ uint2 load_row4_raw(const __half *row, int c) {
  return reinterpret_cast<const uint2 *>(row)[c];
}

__device__ __forceinline__ float4 row4_floats(float4 r) { return r; }

__device__ __forceinline__ float4 row4_floats(uint2 u) {
  const float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&u.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2 *>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}

template <typename C>
__device__ __forceinline__ float4 load_row4(const C *row, int c) {
  return row4_floats(load_row4_raw(row, c));
}

// A half cache element as stored: rounded to nearest.
__device__ __forceinline__ void to_cache(__half *dst, float v) { *dst = __float2half_rn(v); }

// Shared floats of the half copies of the new key and value that a kernel with a half cache
// reads at position pos (the values the cache holds there), 16-byte aligned.
template <typename C>
__host__ __device__ constexpr int new_row_floats(int dk, int dv) {
  return sizeof(C) == 4 ? 0 : ((dk + dv) / 2 + 3) & ~3;
}

// Head h's result o for feature i (of dv), written to out (the head's row); with `next`, the row
// of the projection that reads it is prefetched if that projection will keep it.
__device__ __forceinline__ void write_head_output(const AttnParams &p, float *out, int h, int dv,
                                                  int i, float o) {
  out[i] = o;
  if (p.next_w != nullptr) {
    // The next projection keeps input row r = h * dv + i unless score <= t (its own criterion,
    // NaN kept): start fetching that row while this launch and the next one's start drain, so
    // its first loads find the row in L2.
    const size_t r = static_cast<size_t>(h) * dv + i;
    const float f = p.next_factor != nullptr ? p.next_factor[r] : 1.0f;
    if (!(fabsf(o) * f <= *p.next_threshold)) {
      prefetch_l2_range(p.next_w + r * p.next_row_bytes, p.next_row_bytes, p.next_bulk);
      if (p.next_scales != nullptr) {
        prefetch_l2_range(reinterpret_cast<const char *>(p.next_scales + r * p.next_scale_row),
                          p.next_scale_bytes, p.next_bulk);
      }
    }
  }
}

// DK, DV > 0: the head dimensions as compile-time constants (the launcher picks these for the
// common shapes), so that every index, loop bound and group count below folds into the code;
// 0: read from p. The arithmetic is the same either way. SPLIT: the split-KV kernel (a grid of
// p.splits blocks per head); without it one block per head sees every visible key, and the code
// below is exactly that of the kernel before split-KV existed. C: the cache's element type,
// float or __half (SPARSIFY_ATTN_CACHE_F16); with __half the new key and value are rounded as
// the cache stores them before this block uses them, so the step at pos sees what later steps
// read back; sums are float32 either way.
template <int DK, int DV, bool SPLIT, typename C>
__global__ void __launch_bounds__(kAttnThreads) attention_kernel(const AttnParams p) {
  extern __shared__ float4 smem4[];
  float *sm = reinterpret_cast<float *>(smem4);
  const int dk = DK > 0 ? DK : p.dk;
  const int dv = DV > 0 ? DV : p.dv;
  float *q = sm;        // (dk) q of this head, then normed
  float *k = q + dk;    // (dk) the new key of this head's group
  float *qr = k + dk;   // (dk) q after RoPE
  float *kr = qr + dk;  // (dk) new key after RoPE
  float *vn = kr + dk;  // (dv) the new value
  float *s = vn + dv;   // (score_cap rounded up to 4) scores, then softmax numerators
  // (kPartFloats) value-phase partial sums
  float *part = s + (((SPLIT ? p.score_cap : p.max_len) + 3) & ~3);
  // (new_row_floats) half cache: the new key and value as stored (a float cache: kr and vn)
  C *knew = sizeof(C) == 4 ? reinterpret_cast<C *>(kr)
                           : reinterpret_cast<C *>(part + kPartFloats);
  C *vnew = sizeof(C) == 4 ? reinterpret_cast<C *>(vn) : knew + dk;
  __shared__ float red[32];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int h = SPLIT ? blockIdx.x % p.n_head : blockIdx.x;
  const int sp = SPLIT ? blockIdx.x / p.n_head : 0;  // key range (split) of this block
  const int rep = p.n_head / p.n_head_kv;
  const int g = h / rep;
  // Read before the wait for the previous kernel: the position, this thread's RoPE table
  // entries (dk <= kMaxHeadDim <= kAttnThreads: one feature per thread), and with the flag the
  // cache rows before pos. None of them is written by a kernel that lets this one launch early
  // (the q/k/v GEMV writes q/k/v only; pos moves between steps), so their round trips overlap
  // that kernel's tail instead of following it.
  const long long pos64 = *p.pos;
  const bool pos_ok = pos64 >= 0 && pos64 < p.max_len;  // uniform across the block
  const int pos = pos_ok ? static_cast<int>(pos64) : 0;  // below max_len: int arithmetic
  // Visible keys t0..pos (llama.cpp's window masks pos - t >= window). SPLIT: they are cut
  // into nsplit ranges of `chunk` >= min_keys keys, and this block takes [ja, jb) of them;
  // blocks past nsplit have nothing to do at this position and leave before the wait (exiting
  // counts as their launch trigger). Without SPLIT they are worked out after the wait.
  int t0 = 0, nt = 0, nsplit = 1, ja = 0, jb = 0;
  if constexpr (SPLIT) {
    t0 = p.window > 0 ? max(0, pos - p.window + 1) : 0;
    nt = pos - t0 + 1;
    nsplit = pos_ok ? max(1, min(p.splits, nt / p.min_keys)) : 1;
    if (sp >= nsplit) return;
    const int chunk = (nt + nsplit - 1) / nsplit;
    ja = sp * chunk;  // < nt: nt / nsplit >= min_keys >= splits (the launcher's clamp)
    jb = min(nt, ja + chunk);
  }
  float rc = 1.0f;
  float rs = 0.0f;
  int rj = tid;
  if (pos_ok && tid < dk) {
    rc = p.cos_t[static_cast<size_t>(pos) * dk + tid];
    rs = p.sin_t[static_cast<size_t>(pos) * dk + tid];
    rj = p.perm[tid];
  }
  if constexpr (SPLIT) {
    if (p.prefetch_cache && pos_ok) {
      const int a = t0 + ja;
      const int b = min(pos, t0 + jb);
      if (b > a) prefetch_cache_range<C>(p, a, b, h, g, rep, dk, dv);
    }
  } else {
    if (p.prefetch_cache && pos_ok) prefetch_cache_rows<C>(p, pos, h, g, rep, dk, dv);
  }
  wait_previous_grid(p.wait);

  float *out = p.out + static_cast<size_t>(h) * dv;
  if (!pos_ok) {  // uniform across the block: no barrier is skipped
    for (int i = tid; i < dv; i += kAttnThreads) out[i] = __int_as_float(0x7fc00000);
    return;
  }
  const float *qsrc = p.qkv + static_cast<size_t>(h) * dk;
  const float *ksrc = p.qkv + static_cast<size_t>(p.n_head + g) * dk;
  const float *vsrc = p.qkv + static_cast<size_t>(p.n_head + p.n_head_kv) * dk +
                      static_cast<size_t>(g) * dv;
  if (p.parts <= 1) {
    for (int i = tid; i < dk; i += kAttnThreads) {
      q[i] = qsrc[i];
      k[i] = ksrc[i];
    }
    for (int i = tid; i < dv; i += kAttnThreads) vn[i] = vsrc[i];
  } else {
    // qkv as the unreduced split-K rows of the q/k/v GEMV: add them here. The e = 2 dk + dv
    // elements this block needs times `parts` rows are spread over the threads (groups of
    // threads take rows g, g + groups, ...; each thread keeps up to kRowsInFlight loads in
    // flight), then the groups' sums are added in group order: a fixed order, so the result is
    // deterministic.
    constexpr int kRowsInFlight = 12;
    const int ne = 2 * dk + dv;
    const int groups = max(1, kAttnThreads / ne);
    float *gsum = part;  // (groups, ne) <= kPartFloats: ne <= 3 * kMaxHeadDim
    for (int t = tid; t < groups * ne; t += kAttnThreads) {
      const int g0 = t / ne;
      const int e = t % ne;
      const float *src = e < dk ? qsrc + e : (e < 2 * dk ? ksrc + (e - dk) : vsrc + (e - 2 * dk));
      float a = 0.0f;
      for (int r0 = g0; r0 < p.parts; r0 += groups * kRowsInFlight) {
        float v[kRowsInFlight];
#pragma unroll
        for (int u = 0; u < kRowsInFlight; ++u) {
          const int r = r0 + u * groups;
          v[u] = r < p.parts ? src[static_cast<size_t>(r) * p.stride] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < kRowsInFlight; ++u) a += v[u];
      }
      gsum[g0 * ne + e] = a;
    }
    __syncthreads();
    for (int e = tid; e < ne; e += kAttnThreads) {
      float a = gsum[e];
      for (int g0 = 1; g0 < groups; ++g0) a += gsum[g0 * ne + e];
      if (e < dk) {
        q[e] = a;
      } else if (e < 2 * dk) {
        k[e - dk] = a;
      } else {
        vn[e - 2 * dk] = a;
      }
    }
    __syncthreads();  // gsum is the value phase's buffer; q/k are read by other threads below
  }
  if (p.q_norm != nullptr) {  // model.rms_norm over each head, before RoPE (same thread/element)
    float sq = 0.0f;
    float sk = 0.0f;
    for (int i = tid; i < dk; i += kAttnThreads) {
      sq += q[i] * q[i];
      sk += k[i] * k[i];
    }
    const float inv = 1.0f / static_cast<float>(dk);
    const float a = rsqrtf(block_reduce<false, kAttnThreads>(sq, red) * inv + p.eps);
    const float b = rsqrtf(block_reduce<false, kAttnThreads>(sk, red) * inv + p.eps);
    for (int i = tid; i < dk; i += kAttnThreads) {
      q[i] = q[i] * a * p.q_norm[i];
      k[i] = k[i] * b * p.k_norm[i];
    }
  }
  __syncthreads();  // RoPE reads partner elements written by other threads
  if (tid < dk) {
    qr[tid] = q[tid] * rc + q[rj] * rs;
    kr[tid] = k[tid] * rc + k[rj] * rs;
    if constexpr (sizeof(C) != 4) to_cache(knew + tid, kr[tid]);
  }
  if constexpr (sizeof(C) != 4) {
    for (int i = tid; i < dv; i += kAttnThreads) to_cache(vnew + i, vn[i]);
  }
  __syncthreads();
  const C *kbase = static_cast<const C *>(p.kc) + static_cast<size_t>(g) * p.max_len * dk;
  const C *vbase = static_cast<const C *>(p.vc) + static_cast<size_t>(g) * p.max_len * dv;
  if (h % rep == 0 && sp == 0) {  // one block per group writes the cache; none reads pos
    C *kdst = static_cast<C *>(p.kc) + (static_cast<size_t>(g) * p.max_len + pos) * dk;
    C *vdst = static_cast<C *>(p.vc) + (static_cast<size_t>(g) * p.max_len + pos) * dv;
    for (int i = tid; i < dk; i += kAttnThreads) kdst[i] = knew[i];
    for (int i = tid; i < dv; i += kAttnThreads) vdst[i] = vnew[i];
  }

  if constexpr (!SPLIT) {
    t0 = p.window > 0 ? max(0, pos - p.window + 1) : 0;
    nt = pos - t0 + 1;
    jb = nt;
  }
  const int nl = jb - ja;  // this block's keys, t0 + ja .. t0 + jb - 1
  const int tb = t0 + ja;
  const int ipos = pos;

  // Loads in flight: kKeysPerWarp keys per warp and kValuesPerThread value rows per thread;
  // twice as many of half rows in the split kernel, for the bytes in flight of float rows (on
  // an H200 at 4097 keys: 29.3 us a layer with four, 19.7 with eight, float rows 26.9; one
  // block per head, at 65 keys: 5.1 with four, 5.9 with eight; kernels/cuda/NOTES.md H24-H25).
  // The order of every sum is the same for any count.
  constexpr bool kWide = sizeof(C) != 4 && SPLIT;
  constexpr int kKeys = kWide ? 2 * kKeysPerWarp : kKeysPerWarp;
  constexpr int kValues = kWide ? 2 * kValuesPerThread : kValuesPerThread;
  // Scores: warp w takes keys w*K .. w*K + K - 1 (K = kKeys), then the next 32*K; lanes
  // cover the head dimension in float4s. Indices past the end are clamped to the last key (a
  // valid row), so all K loads issue unconditionally and only the store is skipped.
  const float4 *q4 = reinterpret_cast<const float4 *>(qr);
  const int n4k = dk / 4;
  // float4 columns per lane when the head dimension is known and a multiple of 128; with more
  // than one the columns are not a loop over c (below) but one batch of loads: in that loop,
  // with each column's loads next to its products, ptxas kept one half-row load in flight at a
  // time at dimension 256 (kernels/cuda/NOTES.md, H30).
  constexpr int kChunks = (DK > 0 && DK % 128 == 0) ? DK / 128 : 0;
  for (int j0 = warp * kKeys; j0 < nl; j0 += kAttnWarps * kKeys) {
    float dot[kKeys];
#pragma unroll
    for (int u = 0; u < kKeys; ++u) dot[u] = 0.0f;
    if constexpr (kChunks > 1) {
      // All kChunks * K loads are issued before the first product; the products are added in
      // the loop's order (chunk by chunk), so the sums are the loop's.
      const C *rows[kKeys];
#pragma unroll
      for (int u = 0; u < kKeys; ++u) {
        const int t = tb + min(j0 + u, nl - 1);
        rows[u] = (t == ipos) ? knew : kbase + static_cast<size_t>(t) * dk;
      }
      typename Row4<C>::Raw raw[kChunks][kKeys];
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
#pragma unroll
        for (int u = 0; u < kKeys; ++u) raw[i][u] = load_row4_raw(rows[u], lane + 32 * i);
      }
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        const float4 qv = q4[lane + 32 * i];
#pragma unroll
        for (int u = 0; u < kKeys; ++u) {
          const float4 kv = row4_floats(raw[i][u]);
          dot[u] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
        }
      }
    } else {
      for (int c = lane; c < n4k; c += 32) {
        const float4 qv = q4[c];
        float4 kv[kKeys];
#pragma unroll
        for (int u = 0; u < kKeys; ++u) {
          const int t = tb + min(j0 + u, nl - 1);
          const C *row = (t == ipos) ? knew : kbase + static_cast<size_t>(t) * dk;
          kv[u] = load_row4(row, c);
        }
#pragma unroll
        for (int u = 0; u < kKeys; ++u) {
          dot[u] += qv.x * kv[u].x + qv.y * kv[u].y + qv.z * kv[u].z + qv.w * kv[u].w;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      const float v = warp_sum(dot[u]);
      if (lane == 0 && j0 + u < nl) s[j0 + u] = v * p.scale;  // the model: (q k^T) * scale
    }
  }
  __syncthreads();

  // Softmax numerators in place (each j stays with one thread), then the denominator.
  float m = -INFINITY;
  for (int j = tid; j < nl; j += kAttnThreads) m = fmaxf(m, s[j]);
  m = block_reduce<true, kAttnThreads>(m, red);
  float sum = 0.0f;
  for (int j = tid; j < nl; j += kAttnThreads) {
    const float e = expf(s[j] - m);
    s[j] = e;
    sum += e;
  }
  sum = block_reduce<false, kAttnThreads>(sum, red);  // its barriers also publish every s[j]

  // Weighted values: thread (grp, c) adds float4 column c of rows grp, grp + groups, ...
  const int nchunk = dv / 4;
  const int groups = kAttnThreads / nchunk;
  const int grp = tid / nchunk;
  const int c = tid % nchunk;
  if (grp < groups) {
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int j = grp; j < nl; j += groups * kValues) {
      float4 v[kValues];
      float wt[kValues];
#pragma unroll
      for (int u = 0; u < kValues; ++u) {
        const int jj = min(j + u * groups, nl - 1);
        const int t = tb + jj;
        const C *row = (t == ipos) ? vnew : vbase + static_cast<size_t>(t) * dv;
        v[u] = load_row4(row, c);
        wt[u] = (j + u * groups < nl) ? s[jj] : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kValues; ++u) {
        acc.x += wt[u] * v[u].x;
        acc.y += wt[u] * v[u].y;
        acc.z += wt[u] * v[u].z;
        acc.w += wt[u] * v[u].w;
      }
    }
    reinterpret_cast<float4 *>(part)[grp * nchunk + c] = acc;
  }
  __syncthreads();

  auto finish = [&](int i, float o) { write_head_output(p, out, h, dv, i, o); };
  if (!SPLIT || nsplit == 1) {
    for (int i = tid; i < dv; i += kAttnThreads) {
      float o = 0.0f;
      for (int gg = 0; gg < groups; ++gg) o += part[gg * dv + i];
      finish(i, o / sum);
    }
    return;
  }

  if constexpr (SPLIT) {
    // Split-KV: this block's unnormalised sums, its maximum and its denominator go to the
    // workspace; the last of the head's nsplit blocks to arrive rescales them to the common
    // maximum and adds them in split order (deterministic). atomicInc wraps to 0 after
    // nsplit - 1, so the last arrival leaves the counter reset for the next launch.
    __shared__ unsigned ticket;
    __shared__ float wm[kMaxAttnSplits];
    __shared__ float wl[kMaxAttnSplits];
    const int row = dv + 2;
    float *work = p.work + static_cast<size_t>(h) * p.splits * row;
    for (int i = tid; i < dv; i += kAttnThreads) {
      float o = 0.0f;
      for (int gg = 0; gg < groups; ++gg) o += part[gg * dv + i];
      __stcg(work + static_cast<size_t>(sp) * row + i, o);
    }
    if (tid == 0) {
      __stcg(work + static_cast<size_t>(sp) * row + dv, m);
      __stcg(work + static_cast<size_t>(sp) * row + dv + 1, sum);
    }
    __syncthreads();  // every partial store before thread 0's release
    if (tid == 0) ticket = atomic_inc_acq_rel(p.counters + h, static_cast<unsigned>(nsplit - 1));
    __syncthreads();
    if (ticket != static_cast<unsigned>(nsplit - 1)) return;
    if (tid < nsplit) {
      wm[tid] = __ldcg(work + static_cast<size_t>(tid) * row + dv);
      wl[tid] = __ldcg(work + static_cast<size_t>(tid) * row + dv + 1);
    }
    __syncthreads();
    float mx = wm[0];
    for (int b = 1; b < nsplit; ++b) mx = fmaxf(mx, wm[b]);
    __syncthreads();  // every thread has read wm before it is overwritten with the scale
    if (tid < nsplit) wm[tid] = expf(wm[tid] - mx);
    __syncthreads();
    float den = 0.0f;
    for (int b = 0; b < nsplit; ++b) den += wl[b] * wm[b];
    for (int i = tid; i < dv; i += kAttnThreads) {
      float o = 0.0f;
      for (int b = 0; b < nsplit; ++b) o += __ldcg(work + static_cast<size_t>(b) * row + i) * wm[b];
      finish(i, o / den);
    }
  }
}

// Block-wide sums (or maxima) of n <= R values at once, in attention's fixed order (warp
// butterflies, then the warps in order): v[r] comes back as block_reduce<kMax> would give it
// alone, with one pair of barriers for all n. `red` holds 32 * R floats.
template <bool kMax, int R>
__device__ void block_reduce_n(float (&v)[R], int n, float *red) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r < n) v[r] = kMax ? warp_max(v[r]) : warp_sum(v[r]);
  }
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < n) red[r * 32 + warp] = v[r];
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r < n) {
      float a = red[r * 32];
      for (int w = 1; w < kAttnWarps; ++w) {
        a = kMax ? fmaxf(a, red[r * 32 + w]) : a + red[r * 32 + w];
      }
      v[r] = a;
    }
  }
}

// Split-KV over key/value heads (SPARSIFY_ATTN_GROUP_HEADS): block b takes key/value head
// g = b % n_head_kv and key range b / n_head_kv, and works out all rep = n_head / n_head_kv <= R
// query heads of the group over that range, so each cache row is read once per group instead of
// once per query head. Every sum of a head is formed in the same order as in attention_kernel
// (the same per-element order for the partial q/k/v rows, the same dot products and butterflies,
// the same value rows per thread in the same order), so with one range the result is bit for bit
// that kernel's. R = 4 keeps 4 keys per warp and 4 value rows per thread in flight, R = 8 two
// each (registers: 1024 threads have 64 each). C: the cache's element type, as there.
template <int DK, int DV, int R, typename C>
__global__ void __launch_bounds__(kAttnThreads) attention_group_kernel(const AttnParams p) {
  constexpr int kKeys = R > 4 ? 2 : kKeysPerWarp;
  constexpr int kValues = R > 4 ? 2 : kValuesPerThread;
  extern __shared__ float4 smem4[];
  float *sm = reinterpret_cast<float *>(smem4);
  const int dk = DK > 0 ? DK : p.dk;
  const int dv = DV > 0 ? DV : p.dv;
  const int rep = p.n_head / p.n_head_kv;  // <= R: the launcher's choice
  const int cap = (p.score_cap + 3) & ~3;
  float *q = sm;                  // (rep, dk) q of the group's heads, then normed
  float *k = q + rep * dk;        // (dk) the new key
  float *qr = k + dk;             // (rep, dk) q after RoPE
  float *kr = qr + rep * dk;      // (dk) the new key after RoPE
  float *vn = kr + dk;            // (dv) the new value
  float *s = vn + dv;             // (rep, cap) scores, then softmax numerators
  float *part = s + rep * cap;    // (rep, kPartFloats) value-phase partial sums
  // (new_row_floats) half cache: the new key and value as stored (a float cache: kr and vn)
  C *knew = sizeof(C) == 4 ? reinterpret_cast<C *>(kr)
                           : reinterpret_cast<C *>(part + rep * kPartFloats);
  C *vnew = sizeof(C) == 4 ? reinterpret_cast<C *>(vn) : knew + dk;
  __shared__ float red[32 * (R + 1)];  // R + 1 values: the q/k norms' sums
  __shared__ float hm[R], hl[R];  // each head's maximum and denominator over the range
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = blockIdx.x % p.n_head_kv;
  const int sp = blockIdx.x / p.n_head_kv;
  const int h0 = g * rep;  // the group's first query head
  const long long pos64 = *p.pos;
  const bool pos_ok = pos64 >= 0 && pos64 < p.max_len;
  const int pos = pos_ok ? static_cast<int>(pos64) : 0;
  const int t0 = p.window > 0 ? max(0, pos - p.window + 1) : 0;
  const int nt = pos - t0 + 1;
  const int nsplit = pos_ok ? max(1, min(p.splits, nt / p.min_keys)) : 1;
  if (sp >= nsplit) return;
  const int chunk = (nt + nsplit - 1) / nsplit;
  const int ja = sp * chunk;
  const int jb = min(nt, ja + chunk);
  float rc = 1.0f;
  float rs = 0.0f;
  int rj = tid;
  if (pos_ok && tid < dk) {
    rc = p.cos_t[static_cast<size_t>(pos) * dk + tid];
    rs = p.sin_t[static_cast<size_t>(pos) * dk + tid];
    rj = p.perm[tid];
  }
  if (p.prefetch_cache && pos_ok) {
    const int a = t0 + ja;
    const int b = min(pos, t0 + jb);
    if (b > a) prefetch_cache_range<C>(p, a, b, 0, g, 1, dk, dv);  // the whole range: one block
  }
  wait_previous_grid(p.wait);

  if (!pos_ok) {
    for (int i = tid; i < rep * dv; i += kAttnThreads) {
      p.out[static_cast<size_t>(h0) * dv + i] = __int_as_float(0x7fc00000);
    }
    return;
  }
  const int nq = rep * dk;
  const float *qsrc = p.qkv + static_cast<size_t>(h0) * dk;
  const float *ksrc = p.qkv + static_cast<size_t>(p.n_head + g) * dk;
  const float *vsrc = p.qkv + static_cast<size_t>(p.n_head + p.n_head_kv) * dk +
                      static_cast<size_t>(g) * dv;
  if (p.parts <= 1) {
    for (int i = tid; i < nq; i += kAttnThreads) q[i] = qsrc[i];
    for (int i = tid; i < dk; i += kAttnThreads) k[i] = ksrc[i];
    for (int i = tid; i < dv; i += kAttnThreads) vn[i] = vsrc[i];
  } else {
    // As attention_kernel, with the same number of row groups (that of one head's 2 dk + dv
    // elements), so that each element's rows are added in the same order.
    constexpr int kRowsInFlight = 12;
    const int ne = nq + dk + dv;
    const int groups = max(1, kAttnThreads / (2 * dk + dv));
    float *gsum = part;  // (groups, ne) <= rep * kPartFloats
    for (int t = tid; t < groups * ne; t += kAttnThreads) {
      const int g0 = t / ne;
      const int e = t % ne;
      const float *src = e < nq ? qsrc + e : (e < nq + dk ? ksrc + (e - nq) : vsrc + (e - nq - dk));
      float a = 0.0f;
      for (int r0 = g0; r0 < p.parts; r0 += groups * kRowsInFlight) {
        float v[kRowsInFlight];
#pragma unroll
        for (int u = 0; u < kRowsInFlight; ++u) {
          const int r = r0 + u * groups;
          v[u] = r < p.parts ? src[static_cast<size_t>(r) * p.stride] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < kRowsInFlight; ++u) a += v[u];
      }
      gsum[g0 * ne + e] = a;
    }
    __syncthreads();
    for (int e = tid; e < ne; e += kAttnThreads) {
      float a = gsum[e];
      for (int g0 = 1; g0 < groups; ++g0) a += gsum[g0 * ne + e];
      if (e < nq) {
        q[e] = a;
      } else if (e < nq + dk) {
        k[e - nq] = a;
      } else {
        vn[e - nq - dk] = a;
      }
    }
    __syncthreads();
  }
  if (p.q_norm != nullptr) {  // per head, as attention_kernel (same thread per element)
    float sq[R + 1];
#pragma unroll
    for (int r = 0; r <= R; ++r) sq[r] = 0.0f;
    for (int i = tid; i < dk; i += kAttnThreads) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < rep) sq[r] += q[r * dk + i] * q[r * dk + i];
      }
      sq[R] += k[i] * k[i];
    }
    // The key's sum travels in slot rep, so that one reduction serves all rep + 1 of them.
    float ss[R + 1];
#pragma unroll
    for (int r = 0; r <= R; ++r) ss[r] = r < rep ? sq[r] : (r == rep ? sq[R] : 0.0f);
    block_reduce_n<false, R + 1>(ss, rep + 1, red);
    const float inv = 1.0f / static_cast<float>(dk);
    float kb = 0.0f;
#pragma unroll
    for (int r = 0; r <= R; ++r) {
      if (r == rep) kb = rsqrtf(ss[r] * inv + p.eps);
    }
    for (int i = tid; i < dk; i += kAttnThreads) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < rep) q[r * dk + i] = q[r * dk + i] * rsqrtf(ss[r] * inv + p.eps) * p.q_norm[i];
      }
      k[i] = k[i] * kb * p.k_norm[i];
    }
  }
  __syncthreads();
  if (tid < dk) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < rep) qr[r * dk + tid] = q[r * dk + tid] * rc + q[r * dk + rj] * rs;
    }
    kr[tid] = k[tid] * rc + k[rj] * rs;
    if constexpr (sizeof(C) != 4) to_cache(knew + tid, kr[tid]);
  }
  if constexpr (sizeof(C) != 4) {
    for (int i = tid; i < dv; i += kAttnThreads) to_cache(vnew + i, vn[i]);
  }
  __syncthreads();
  const C *kbase = static_cast<const C *>(p.kc) + static_cast<size_t>(g) * p.max_len * dk;
  const C *vbase = static_cast<const C *>(p.vc) + static_cast<size_t>(g) * p.max_len * dv;
  if (sp == 0) {  // one block per group writes the cache; none reads pos from it
    C *kdst = static_cast<C *>(p.kc) + (static_cast<size_t>(g) * p.max_len + pos) * dk;
    C *vdst = static_cast<C *>(p.vc) + (static_cast<size_t>(g) * p.max_len + pos) * dv;
    for (int i = tid; i < dk; i += kAttnThreads) kdst[i] = knew[i];
    for (int i = tid; i < dv; i += kAttnThreads) vdst[i] = vnew[i];
  }
  const int nl = jb - ja;
  const int tb = t0 + ja;

  // Scores: as attention_kernel, each key row loaded once for all the group's heads.
  const float4 *q4 = reinterpret_cast<const float4 *>(qr);
  const int n4k = dk / 4;
  for (int j0 = warp * kKeys; j0 < nl; j0 += kAttnWarps * kKeys) {
    float dot[R][kKeys];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int u = 0; u < kKeys; ++u) dot[r][u] = 0.0f;
    }
    for (int c = lane; c < n4k; c += 32) {
      float4 kv[kKeys];
#pragma unroll
      for (int u = 0; u < kKeys; ++u) {
        const int t = tb + min(j0 + u, nl - 1);
        const C *row = (t == pos) ? knew : kbase + static_cast<size_t>(t) * dk;
        kv[u] = load_row4(row, c);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < rep) {
          const float4 qv = q4[r * n4k + c];
#pragma unroll
          for (int u = 0; u < kKeys; ++u) {
            dot[r][u] += qv.x * kv[u].x + qv.y * kv[u].y + qv.z * kv[u].z + qv.w * kv[u].w;
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < rep) {
#pragma unroll
        for (int u = 0; u < kKeys; ++u) {
          const float v = warp_sum(dot[r][u]);
          if (lane == 0 && j0 + u < nl) s[r * cap + j0 + u] = v * p.scale;
        }
      }
    }
  }
  __syncthreads();

  // Softmax numerators in place, every head's maximum and denominator in one reduction each.
  float m[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    if (r < rep) {
      for (int j = tid; j < nl; j += kAttnThreads) m[r] = fmaxf(m[r], s[r * cap + j]);
    }
  }
  block_reduce_n<true, R>(m, rep, red);
  float sum[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    sum[r] = 0.0f;
    if (r < rep) {
      for (int j = tid; j < nl; j += kAttnThreads) {
        const float e = expf(s[r * cap + j] - m[r]);
        s[r * cap + j] = e;
        sum[r] += e;
      }
    }
  }
  block_reduce_n<false, R>(sum, rep, red);  // its barriers also publish every s[j]
  if (tid == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < rep) {
        hm[r] = m[r];
        hl[r] = sum[r];
      }
    }
  }

  // Weighted values: thread (grp, c) adds float4 column c of rows grp, grp + groups, ... for
  // every head, each value row loaded once.
  const int nchunk = dv / 4;
  const int groups = kAttnThreads / nchunk;
  const int grp = tid / nchunk;
  const int c = tid % nchunk;
  if (grp < groups) {
    float4 acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int j = grp; j < nl; j += groups * kValues) {
      float4 v[kValues];
#pragma unroll
      for (int u = 0; u < kValues; ++u) {
        const int jj = min(j + u * groups, nl - 1);
        const int t = tb + jj;
        const C *row = (t == pos) ? vnew : vbase + static_cast<size_t>(t) * dv;
        v[u] = load_row4(row, c);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < rep) {
#pragma unroll
          for (int u = 0; u < kValues; ++u) {
            const int jj = min(j + u * groups, nl - 1);
            const float wt = (j + u * groups < nl) ? s[r * cap + jj] : 0.0f;
            acc[r].x += wt * v[u].x;
            acc[r].y += wt * v[u].y;
            acc[r].z += wt * v[u].z;
            acc[r].w += wt * v[u].w;
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < rep) reinterpret_cast<float4 *>(part + r * kPartFloats)[grp * nchunk + c] = acc[r];
    }
  }
  __syncthreads();

  if (nsplit == 1) {
    for (int i = tid; i < rep * dv; i += kAttnThreads) {
      const int r = i / dv;
      const int ii = i - r * dv;
      const float *pr = part + r * kPartFloats;
      float o = 0.0f;
      for (int gg = 0; gg < groups; ++gg) o += pr[gg * dv + ii];
      write_head_output(p, p.out + static_cast<size_t>(h0 + r) * dv, h0 + r, dv, ii, o / hl[r]);
    }
    return;
  }

  // As attention_kernel's split path, per head of the group; one ticket per group.
  __shared__ unsigned ticket;
  __shared__ float wm[R][kMaxAttnSplits];
  __shared__ float wl[R][kMaxAttnSplits];
  const int row = dv + 2;
  for (int i = tid; i < rep * dv; i += kAttnThreads) {
    const int r = i / dv;
    const int ii = i - r * dv;
    const float *pr = part + r * kPartFloats;
    float o = 0.0f;
    for (int gg = 0; gg < groups; ++gg) o += pr[gg * dv + ii];
    __stcg(p.work + (static_cast<size_t>(h0 + r) * p.splits + sp) * row + ii, o);
  }
  if (tid < rep) {
    float *w = p.work + (static_cast<size_t>(h0 + tid) * p.splits + sp) * row;
    __stcg(w + dv, hm[tid]);
    __stcg(w + dv + 1, hl[tid]);
  }
  __syncthreads();  // every partial store before thread 0's release
  if (tid == 0) ticket = atomic_inc_acq_rel(p.counters + g, static_cast<unsigned>(nsplit - 1));
  __syncthreads();
  if (ticket != static_cast<unsigned>(nsplit - 1)) return;
  for (int t = tid; t < rep * nsplit; t += kAttnThreads) {
    const int r = t / nsplit;
    const int b = t - r * nsplit;
    const float *w = p.work + (static_cast<size_t>(h0 + r) * p.splits + b) * row;
    wm[r][b] = __ldcg(w + dv);
    wl[r][b] = __ldcg(w + dv + 1);
  }
  __syncthreads();
  if (tid < rep) {  // each head's scales to the common maximum, and its denominator
    float mx = wm[tid][0];
    for (int b = 1; b < nsplit; ++b) mx = fmaxf(mx, wm[tid][b]);
    float den = 0.0f;
    for (int b = 0; b < nsplit; ++b) {
      wm[tid][b] = expf(wm[tid][b] - mx);
      den += wl[tid][b] * wm[tid][b];
    }
    hl[tid] = den;
  }
  __syncthreads();
  for (int i = tid; i < rep * dv; i += kAttnThreads) {
    const int r = i / dv;
    const int ii = i - r * dv;
    const float *w = p.work + static_cast<size_t>(h0 + r) * p.splits * row + ii;
    float o = 0.0f;
    for (int b = 0; b < nsplit; ++b) o += __ldcg(w + static_cast<size_t>(b) * row) * wm[r][b];
    write_head_output(p, p.out + static_cast<size_t>(h0 + r) * dv, h0 + r, dv, ii, o / hl[r]);
  }
}

bool aligned(const void *ptr, size_t b) { return reinterpret_cast<uintptr_t>(ptr) % b == 0; }

// Launch-time settings read here through env_int (common.cuh): SPARSIFY_DIAG_NO_WAIT (timing
// diagnostic, see sparse_gemv.h), whose bit 4 makes attention skip the wait for the kernel
// before it; SPARSIFY_ATTN_GENERIC (benchmark A/B, see decode_ops.h), nonzero for attention with
// the head dimensions read at run time, also where a kernel specialised to them exists; and
// SPARSIFY_ATTN_SPLIT_KEYS (benchmark A/B), the keys per split-KV range.

using AttnKernel = void (*)(AttnParams);

template <bool SPLIT, typename C>
AttnKernel attention_kernel_for(int dk, int dv) {
  if (env_int("SPARSIFY_ATTN_GENERIC") == 0 && dk == dv) {
    switch (dk) {
      case 64: return attention_kernel<64, 64, SPLIT, C>;
      case 128: return attention_kernel<128, 128, SPLIT, C>;
      case 256: return attention_kernel<256, 256, SPLIT, C>;
      default: break;
    }
  }
  return attention_kernel<0, 0, SPLIT, C>;
}

constexpr int kMaxGroupHeads = 8;  // query heads per group for SPARSIFY_ATTN_GROUP_HEADS

template <int R, typename C>
AttnKernel attention_group_kernel_for_r(int dk, int dv) {
  if (env_int("SPARSIFY_ATTN_GENERIC") == 0 && dk == dv) {
    switch (dk) {
      case 64: return attention_group_kernel<64, 64, R, C>;
      case 128: return attention_group_kernel<128, 128, R, C>;
      case 256: return attention_group_kernel<256, 256, R, C>;
      default: break;
    }
  }
  return attention_group_kernel<0, 0, R, C>;
}

template <typename C>
AttnKernel attention_kernel_for(int dk, int dv, bool grouped, int rep, int splits) {
  if (grouped) {
    return rep <= 4 ? attention_group_kernel_for_r<4, C>(dk, dv)
                    : attention_group_kernel_for_r<kMaxGroupHeads, C>(dk, dv);
  }
  return splits > 1 ? attention_kernel_for<true, C>(dk, dv)
                    : attention_kernel_for<false, C>(dk, dv);
}

// The kernel of a launch with these arguments (validated by the caller).
AttnKernel attention_kernel_for(int dk, int dv, int rep, int splits, int flags) {
  const bool grouped = (flags & SPARSIFY_ATTN_GROUP_HEADS) != 0;
  return (flags & SPARSIFY_ATTN_CACHE_F16) != 0
             ? attention_kernel_for<__half>(dk, dv, grouped, rep, splits)
             : attention_kernel_for<float>(dk, dv, grouped, rep, splits);
}

cudaError_t device_major(int *major) {
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices) {
    *major = cache[dev].load(std::memory_order_relaxed);
    if (*major > 0) return cudaSuccess;
  }
  err = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(*major, std::memory_order_relaxed);
  return cudaSuccess;
}

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, int blocks, int threads, size_t smem, cudaStream_t stream,
                   Args... args) {
  int major = 0;
  cudaError_t err = device_major(&major);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = major >= 9 ? 1 : 0;
  err = cudaLaunchKernelEx(&cfg, kernel, args...);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

// Keys a range takes at least: M = kMinSplitKeys query-key pairs per block, or
// SPARSIFY_ATTN_SPLIT_KEYS when set (benchmark A/B), so ceil(M / heads) keys for a block of
// `heads` query heads (1, or a group's under SPARSIFY_ATTN_GROUP_HEADS); never below splits,
// so that no block of a launch gets an empty range.
int min_split_keys(int splits, int heads = 1) {
  const int env = env_int("SPARSIFY_ATTN_SPLIT_KEYS");
  const int pairs = env > 0 ? env : kMinSplitKeys;
  return std::max((pairs + heads - 1) / heads, splits);
}

// Query heads one block serves.
int block_heads(int n_head, int n_head_kv, int flags) {
  return (flags & SPARSIFY_ATTN_GROUP_HEADS) != 0 ? n_head / n_head_kv : 1;
}

// Scores one block holds: every visible key unsplit, else the longest range a launch can give
// a block: V < 2 * min_keys keys in one range, ceil(V / nsplit) < 1.5 * min_keys + 1 for
// nsplit = floor(V / min_keys) < splits ranges, ceil(max_len / splits) at the most ranges.
int score_cap(int max_len, int splits, int min_keys) {
  if (splits <= 1) return max_len;
  return std::min(max_len, std::max(2 * min_keys - 1, (max_len + splits - 1) / splits));
}

// q, k, their rotations, the new value, the scores, the value phase's partial sums; for a
// half cache (extra = new_row_floats), the new key and value as stored
size_t attention_smem_bytes(int dk, int dv, int cap, int extra = 0) {
  return (static_cast<size_t>(4) * dk + dv + ((static_cast<size_t>(cap) + 3) & ~size_t{3}) +
          kPartFloats + extra) * sizeof(float);
}

// The grouped kernel's: rep heads' q and rotated q, the new key twice, the new value, rep
// heads' scores and value-phase partial sums, then as above.
size_t attention_group_smem_bytes(int dk, int dv, int cap, int rep, int extra = 0) {
  return (static_cast<size_t>(2 * rep + 2) * dk + dv +
          static_cast<size_t>(rep) * (((static_cast<size_t>(cap) + 3) & ~size_t{3}) + kPartFloats) +
          extra) *
         sizeof(float);
}

// Dynamic shared memory of one launch, 0 for arguments no launch takes.
size_t launch_smem_bytes(int dk, int dv, int max_len, int n_head, int n_head_kv, int splits,
                         int flags) {
  if (dk < 1 || dv < 1 || max_len < 1 || n_head < 1 || n_head_kv < 1 ||
      n_head % n_head_kv != 0 || splits < 1 || splits > kMaxAttnSplits) {
    return 0;
  }
  const int cap = score_cap(max_len, splits,
                            min_split_keys(splits, block_heads(n_head, n_head_kv, flags)));
  const int extra = (flags & SPARSIFY_ATTN_CACHE_F16) != 0 ? new_row_floats<__half>(dk, dv) : 0;
  if ((flags & SPARSIFY_ATTN_GROUP_HEADS) == 0) return attention_smem_bytes(dk, dv, cap, extra);
  const int rep = n_head / n_head_kv;
  return rep <= kMaxGroupHeads ? attention_group_smem_bytes(dk, dv, cap, rep, extra) : 0;
}

constexpr int kAttnFlags =
    SPARSIFY_ATTN_PREFETCH_CACHE | SPARSIFY_ATTN_GROUP_HEADS | SPARSIFY_ATTN_CACHE_F16;

// The workspace: n_head tickets, then the partial rows from the next 16-byte boundary.
size_t work_offset(int n_head) {
  return (static_cast<size_t>(n_head) * sizeof(unsigned) + 15) & ~size_t{15};
}

}  // namespace

extern "C" {

cudaError_t sparsify_add_rms_norm(float *h, const float *r, const float *post_w, const float *w,
                                  float *x, int d, float eps, cudaStream_t stream) {
  if (d < 1 || h == nullptr || w == nullptr || x == nullptr) return cudaErrorInvalidValue;
  if (post_w != nullptr && r == nullptr) return cudaErrorInvalidValue;
  if (!aligned(h, 4) || !aligned(r, 4) || !aligned(post_w, 4) || !aligned(w, 4) ||
      !aligned(x, 4)) {
    return cudaErrorInvalidValue;
  }
  return launch(add_rms_norm_kernel, 1, kNormThreads, 0, stream, h, r, post_w, w, x, d, eps);
}

size_t sparsify_attention_smem_bytes(int dk, int dv, int max_len) {
  return attention_smem_bytes(dk, dv, max_len);
}

size_t sparsify_attention_launch_smem_bytes(int dk, int dv, int max_len, int n_head,
                                            int n_head_kv, int splits, int flags) {
  if ((flags & ~kAttnFlags) != 0) return 0;
  return launch_smem_bytes(dk, dv, max_len, n_head, n_head_kv, splits, flags);
}

int sparsify_attention_split_keys(int n_head, int n_head_kv, int splits, int flags) {
  if (splits < 1 || splits > kMaxAttnSplits || n_head < 1 || n_head_kv < 1 ||
      n_head % n_head_kv != 0 || (flags & ~kAttnFlags) != 0) {
    return 0;
  }
  return min_split_keys(splits, block_heads(n_head, n_head_kv, flags));
}

size_t sparsify_attention_workspace_bytes(int n_head, int dv, int splits) {
  if (n_head < 1 || dv < 1 || splits < 1) return 0;
  return work_offset(n_head) +
         static_cast<size_t>(n_head) * splits * (static_cast<size_t>(dv) + 2) * sizeof(float);
}

cudaError_t sparsify_attention_decode(const float *qkv, float *kc, float *vc, const int64_t *pos,
                                      const float *cos_t, const float *sin_t, const int32_t *perm,
                                      const float *q_norm, const float *k_norm, float *out,
                                      int n_head, int n_head_kv, int dk, int dv, int max_len,
                                      int window, float scale, float eps, cudaStream_t stream) {
  return sparsify_attention_decode_parts(qkv, 1, 0, kc, vc, pos, cos_t, sin_t, perm, q_norm,
                                         k_norm, out, n_head, n_head_kv, dk, dv, max_len, window,
                                         scale, eps, stream);
}

cudaError_t sparsify_attention_decode_parts(const float *qkv, int qkv_parts, int qkv_stride,
                                            float *kc, float *vc, const int64_t *pos,
                                            const float *cos_t, const float *sin_t,
                                            const int32_t *perm, const float *q_norm,
                                            const float *k_norm, float *out, int n_head,
                                            int n_head_kv, int dk, int dv, int max_len,
                                            int window, float scale, float eps,
                                            cudaStream_t stream) {
  return sparsify_attention_decode_ex(qkv, qkv_parts, qkv_stride, kc, vc, pos, cos_t, sin_t,
                                        perm, q_norm, k_norm, out, n_head, n_head_kv, dk, dv,
                                        max_len, window, scale, eps, nullptr, 0, stream);
}

cudaError_t sparsify_attention_decode_ex(const float *qkv, int qkv_parts, int qkv_stride,
                                           void *kc, void *vc, const int64_t *pos,
                                           const float *cos_t, const float *sin_t,
                                           const int32_t *perm, const float *q_norm,
                                           const float *k_norm, float *out, int n_head,
                                           int n_head_kv, int dk, int dv, int max_len,
                                           int window, float scale, float eps,
                                           const sparsify_next_rows *next, int flags,
                                           cudaStream_t stream) {
  return sparsify_attention_decode_split(qkv, qkv_parts, qkv_stride, kc, vc, pos, cos_t, sin_t,
                                         perm, q_norm, k_norm, out, n_head, n_head_kv, dk, dv,
                                         max_len, window, scale, eps, next, flags, 1, nullptr, 0,
                                         stream);
}

cudaError_t sparsify_attention_decode_split(const float *qkv, int qkv_parts, int qkv_stride,
                                            void *kc, void *vc, const int64_t *pos,
                                            const float *cos_t, const float *sin_t,
                                            const int32_t *perm, const float *q_norm,
                                            const float *k_norm, float *out, int n_head,
                                            int n_head_kv, int dk, int dv, int max_len,
                                            int window, float scale, float eps,
                                            const sparsify_next_rows *next, int flags,
                                            int splits, void *workspace, size_t workspace_bytes,
                                            cudaStream_t stream) {
  if (splits < 1 || splits > kMaxAttnSplits) return cudaErrorInvalidValue;
  if (splits > 1 && (workspace == nullptr || !aligned(workspace, 16) ||
                     workspace_bytes < sparsify_attention_workspace_bytes(n_head, dv, splits))) {
    return cudaErrorInvalidValue;
  }
  if (qkv_parts < 1 || (flags & ~kAttnFlags) != 0) return cudaErrorInvalidValue;
  if (next != nullptr &&
      (next->w == nullptr || next->threshold == nullptr || next->row_bytes == 0 ||
       next->row_bytes > (1u << 30) || !aligned(next->threshold, 4) ||
       !aligned(next->factor, 4) || !aligned(next->scales, 4) ||
       (next->scales != nullptr && (next->scale_row < 1 || next->scale_row > (1 << 24))))) {
    return cudaErrorInvalidValue;
  }
  if (qkv_parts > 1 && qkv_stride < n_head * dk + n_head_kv * (dk + dv)) {
    return cudaErrorInvalidValue;
  }
  if (qkv == nullptr || kc == nullptr || vc == nullptr || pos == nullptr || cos_t == nullptr ||
      sin_t == nullptr || perm == nullptr || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if ((q_norm == nullptr) != (k_norm == nullptr)) return cudaErrorInvalidValue;
  if (n_head < 1 || n_head_kv < 1 || n_head % n_head_kv != 0 || dk < 1 || dv < 1 ||
      max_len < 1 || window < 0) {
    return cudaErrorInvalidValue;
  }
  if (dk % 4 != 0 || dv % 4 != 0 || dk > kMaxHeadDim || dv > kMaxHeadDim) {
    return cudaErrorNotSupported;
  }
  // float4 access to cache rows and tables (q, k and v are read one float at a time).
  if (!aligned(qkv, 4) || !aligned(kc, 16) || !aligned(vc, 16) || !aligned(cos_t, 16) ||
      !aligned(sin_t, 16) || !aligned(pos, 8) || !aligned(perm, 4) || !aligned(out, 4) ||
      !aligned(q_norm, 4) || !aligned(k_norm, 4)) {
    return cudaErrorInvalidValue;
  }
  const bool grouped = (flags & SPARSIFY_ATTN_GROUP_HEADS) != 0;
  const int rep = n_head / n_head_kv;
  if (grouped && rep > kMaxGroupHeads) return cudaErrorNotSupported;
  const int min_keys = min_split_keys(splits, block_heads(n_head, n_head_kv, flags));
  const int cap = score_cap(max_len, splits, min_keys);
  const size_t smem = launch_smem_bytes(dk, dv, max_len, n_head, n_head_kv, splits, flags);
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  int limit = 0;
  err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  // The per-block limit covers the kernel's static shared memory too.
  const AttnKernel kernel = attention_kernel_for(dk, dv, rep, splits, flags);
  cudaFuncAttributes fa;
  err = cudaFuncGetAttributes(&fa, kernel);
  if (err != cudaSuccess) return err;
  limit -= static_cast<int>(fa.sharedSizeBytes);
  if (limit < 0 || smem > static_cast<size_t>(limit)) return cudaErrorNotSupported;
  if (smem > 48 * 1024) {
    // Past 48 KB a block must opt in; raising the limit is idempotent and not a stream op.
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // returned here: not left for the next launch to report
      return err;
    }
  }
  AttnParams p;
  p.qkv = qkv;
  p.kc = kc;
  p.vc = vc;
  p.pos = reinterpret_cast<const long long *>(pos);
  p.cos_t = cos_t;
  p.sin_t = sin_t;
  p.perm = perm;
  p.q_norm = q_norm;
  p.k_norm = k_norm;
  p.out = out;
  p.parts = qkv_parts;
  p.stride = qkv_stride;
  p.n_head = n_head;
  p.n_head_kv = n_head_kv;
  p.dk = dk;
  p.dv = dv;
  p.max_len = max_len;
  p.window = window;
  p.scale = scale;
  p.eps = eps;
  p.next_w = next != nullptr ? static_cast<const char *>(next->w) : nullptr;
  p.next_scales = next != nullptr ? next->scales : nullptr;
  p.next_factor = next != nullptr ? next->factor : nullptr;
  p.next_threshold = next != nullptr ? next->threshold : nullptr;
  p.next_row_bytes = next != nullptr ? static_cast<unsigned>(next->row_bytes) : 0u;
  p.next_scale_row = (next != nullptr && next->scales != nullptr) ? next->scale_row : 0;
  p.next_scale_bytes = static_cast<unsigned>(p.next_scale_row) * 4u;
  p.next_bulk = next != nullptr && aligned(next->w, 16) && p.next_row_bytes % 16 == 0 &&
                (next->scales == nullptr || (aligned(next->scales, 16) &&
                                             p.next_scale_bytes % 16 == 0));
  p.prefetch_cache = (flags & SPARSIFY_ATTN_PREFETCH_CACHE) != 0;
  p.wait = (env_int("SPARSIFY_DIAG_NO_WAIT") & 4) == 0;
  p.splits = splits;
  p.min_keys = min_keys;
  p.score_cap = cap;
  p.counters = static_cast<unsigned *>(workspace);
  p.work = splits > 1 ? reinterpret_cast<float *>(static_cast<char *>(workspace) +
                                                   work_offset(n_head))
                      : nullptr;
  // Split-major block order: the first n_head (grouped: n_head_kv) blocks, range 0, busy at
  // every position, are dispatched first; the blocks of ranges a short context does not need
  // leave at once.
  return launch(kernel, (grouped ? n_head_kv : n_head) * splits, kAttnThreads, smem, stream, p);
}

}  // extern "C"
