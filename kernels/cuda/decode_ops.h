/*
 * decode_ops.h - the non-GEMV work of one batch-1 decoder step on CUDA, as few launches.
 *
 * Between two sparse GEMVs a decoder block does small vector work (a residual add, an RMS norm,
 * RoPE, the KV-cache write, attention over the cache). Written as framework operations this is
 * a dozen tiny kernels per block, each paying a launch and a dependency wait that at batch 1
 * cost as much as a small GEMV. These two kernels do it in two launches per half-block. All
 * tensors are float32 (the KV cache may be float16: SPARSIFY_ATTN_CACHE_F16 below), contiguous,
 * on the device; every function launches asynchronously on `stream`, never synchronises or
 * allocates, and may be captured in a CUDA graph. Results are
 * deterministic (fixed reduction order). Like the GEMV, on compute capability 9.0+ they use
 * programmatic dependent launch: each waits for the preceding kernel to complete before it
 * touches global memory.
 *
 * sparsify_add_rms_norm: residual add, then RMS norm (llama.cpp's ggml_rms_norm times weight):
 *
 *     r' = r                                      (post_w == NULL)
 *     r' = r * rsqrt(mean(r^2) + eps) * post_w    (post_w != NULL: gemma's post-norms)
 *     h  = h + r'                                 (skipped when r == NULL)
 *     x  = h * rsqrt(mean(h^2) + eps) * w
 *
 *   h (d,) is updated in place; r, post_w, w, x are (d,). x must not alias h, r or w.
 *
 * sparsify_attention_decode: one query position against the cache, for every head at once.
 *
 *   qkv   (n_head*dk + n_head_kv*dk + n_head_kv*dv,): q heads, then k heads, then v heads,
 *         as the q/k/v projections write them.
 *   kc    (n_head_kv, max_len, dk), vc (n_head_kv, max_len, dv): the cache. Position pos is
 *         written (k after norm and RoPE, v as is); positions other than pos are read only
 *         where visible (pos - window < t < pos; every t < pos when window == 0).
 *   pos   DEVICE pointer to one int64, read when the kernel runs (0 <= pos < max_len; outside
 *         that range nothing is written to the cache and out is set to NaN). pos and the RoPE
 *         tables below are read before the wait for the previous kernel (programmatic dependent
 *         launch), so that their round trip overlaps its tail: they must not be written by a
 *         kernel right before this one that lets it launch early (none of these kernels writes
 *         them; a kernel without griddepcontrol.launch_dependents has finished first anyway).
 *   cos_t, sin_t  (max_len, dk) tables and perm (dk,) int32: RoPE as
 *         x'[d] = x[d] * cos_t[pos, d] + x[perm[d]] * sin_t[pos, d]
 *         (perm swaps the rotated pairs, sin_t carries the sign; features that do not rotate
 *         have cos 1, sin 0 and perm[d] = d).
 *   q_norm, k_norm  (dk,) or both NULL: per-head RMS norm of q and k before RoPE (gemma3).
 *   out   (n_head*dv,): softmax(scale * q.k_t over visible t) . v_t for each head; query head
 *         h reads kv head h / (n_head / n_head_kv) (grouped-query attention).
 *
 *   Limits: dk and dv multiples of 4, at most 512; n_head a multiple of n_head_kv; the
 *   shared memory (4*dk + dv + max_len + 4096 floats, and the kernel's static bytes) within
 *   the device's per-block limit. The kernel works out the new key itself in each block of its
 *   group and never reads position pos back from the cache, so no block depends on another
 *   within the launch.
 *
 * sparsify_attention_decode_parts: the same with qkv given as qkv_parts rows, qkv_stride floats
 *   apart (at least the width above), that are added in float32 before use, in a fixed order:
 *   the unreduced split-K rows of a q/k/v GEMV launched with partial outputs
 *   (sparse_gemv.h, y_parts), so that the GEMV needs no reduction tail. qkv_parts = 1 is
 *   sparsify_attention_decode.
 *
 * sparsify_attention_decode_ex: the same, told about the projection that reads `out` next
 *   (attn_output): its input-major weights (row r multiplies out[r], sparse_gemv.h's layout),
 *   int8 scales if any, weight-aware factor if any and threshold pointer. Each head issues an
 *   L2 prefetch of the rows of that projection's kept inputs (NOT(|out[r]| * factor[r] <= t),
 *   the GEMV's own criterion) as soon as its output is known, so the projection's first loads
 *   find them in L2 instead of waiting for DRAM behind this launch's tail (on the H200 this
 *   made the whole decode step slower: kernels/cuda/NOTES.md, run H10). next == NULL
 *   prefetches nothing. flags: SPARSIFY_ATTN_PREFETCH_CACHE also prefetches into L2, before
 *   the wait for the previous kernel, the cache rows each head's group will read (positions
 *   before pos, written by earlier steps), so that the score and value loops find them in L2;
 *   the rows are read ahead of the wait, like pos, and under the same condition.
 *   Prefetches are hints: results are those of sparsify_attention_decode_parts whatever `next`
 *   and `flags` say, as long as next's pointers are valid for (n_head * dv) rows.
 *   SPARSIFY_ATTN_CACHE_F16: kc and vc hold IEEE binary16 elements (llama.cpp's default cache
 *   type: half the bytes of float32 per key and value read). The new key and value are rounded
 *   to nearest as they are stored, and this launch uses the rounded values at pos too, so that
 *   a step sees exactly what later steps read back; every product and sum stays float32. The
 *   kernel needs (dk + dv) * 2 more bytes of shared memory, rounded up to 16
 *   (sparsify_attention_launch_smem_bytes counts them).
 *
 * sparsify_attention_decode_split: sparsify_attention_decode_ex over up to `splits` blocks per
 *   head (1 to 64; 1 is sparsify_attention_decode_ex). At a position with V visible keys the
 *   launch cuts them into nsplit = max(1, min(splits, floor(V / M))) consecutive ranges of at
 *   least M keys, M = 256 (SPARSIFY_ATTN_SPLIT_KEYS overrides it at launch time, for
 *   benchmarks; never below splits; sparsify_attention_split_keys tells it), one block per
 *   head and range; each block keeps its range's softmax maximum, denominator and
 *   unnormalised value sum in `workspace`, and the last block of the head to arrive rescales
 *   them to the common maximum and adds them in
 *   range order (deterministic). Below 2 * M keys (nsplit = 1) the result is bit for bit that
 *   of the unsplit launch and the other blocks leave at once; beyond, the work of a head
 *   spreads over nsplit multiprocessors instead of one. A choice that fills the device without
 *   queueing: n_head * splits <= its multiprocessor count. A block's scores take
 *   min(max_len, max(2M - 1, ceil(max_len / splits))) floats of shared memory, not max_len.
 *   workspace: sparsify_attention_workspace_bytes(n_head, dv, splits) bytes, 16-byte aligned,
 *   ZEROED once before the first launch (its tickets reset themselves after each launch);
 *   launches that may run at the same time need one each. NULL when splits == 1.
 *   flags: SPARSIFY_ATTN_GROUP_HEADS makes each block serve a key/value head instead of a
 *   query head: block (g, range) works out all rep = n_head / n_head_kv query heads of group g
 *   (rep <= 8, else cudaErrorNotSupported) over its range, reading each cache row once for
 *   the group instead of once per query head. `splits` then counts ranges per key/value head
 *   (n_head_kv * splits <= multiprocessors fills the device), a range takes at least
 *   ceil(M / rep) keys (M query-key pairs per block, as without the flag), and the workspace
 *   is the same. Every sum of a head is formed in the same order as without the flag,
 *   so with one range (splits == 1, or fewer than 2 * M visible keys) the result is bit for
 *   bit the unsplit launch's. Shared memory: rep times the scores and partial sums of one
 *   head (sparsify_attention_launch_smem_bytes).
 *
 * Head dimensions 64, 128 and 256 (dk == dv) run a kernel compiled for that size, others one
 *   that reads them at run time; both compute the same thing in the same order. Benchmark A/B:
 *   the environment variable SPARSIFY_ATTN_GENERIC=1 at launch time makes every launch take
 *   the run-time one.
 *
 * Timing diagnostic (not for use): with the environment variable SPARSIFY_DIAG_NO_WAIT holding
 *   a number with bit 4 set when a launch is made, attention does not wait for the kernel
 *   before it, and reads q/k/v that may still be being written (sparse_gemv.h has the bits for
 *   the GEMVs). Results are then wrong; the step time bounds what a finer dependency between
 *   the kernels (per tile instead of per grid) could save.
 *
 * Return: cudaSuccess, cudaErrorInvalidValue for a bad argument, cudaErrorNotSupported for
 * sizes past the limits above, or the launch error.
 */
#ifndef SPARSIFY_DECODE_OPS_H
#define SPARSIFY_DECODE_OPS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

cudaError_t sparsify_add_rms_norm(float *h, const float *r, const float *post_w, const float *w,
                                  float *x, int d, float eps, cudaStream_t stream);

cudaError_t sparsify_attention_decode(const float *qkv, float *kc, float *vc, const int64_t *pos,
                                      const float *cos_t, const float *sin_t, const int32_t *perm,
                                      const float *q_norm, const float *k_norm, float *out,
                                      int n_head, int n_head_kv, int dk, int dv, int max_len,
                                      int window, float scale, float eps, cudaStream_t stream);

cudaError_t sparsify_attention_decode_parts(const float *qkv, int qkv_parts, int qkv_stride,
                                            float *kc, float *vc, const int64_t *pos,
                                            const float *cos_t, const float *sin_t,
                                            const int32_t *perm, const float *q_norm,
                                            const float *k_norm, float *out, int n_head,
                                            int n_head_kv, int dk, int dv, int max_len,
                                            int window, float scale, float eps,
                                            cudaStream_t stream);

/* Flags of sparsify_attention_decode_ex and sparsify_attention_decode_split. */
#define SPARSIFY_ATTN_PREFETCH_CACHE 1
#define SPARSIFY_ATTN_GROUP_HEADS 2 /* split only: one block per key/value head and range */
#define SPARSIFY_ATTN_CACHE_F16 4   /* kc and vc hold IEEE binary16 elements, not float32 */

/* The projection that reads attention's output, for sparsify_attention_decode_ex. */
typedef struct {
  const void *w;          /* (n_head * dv, n) input-major weights, row_bytes bytes per row */
  size_t row_bytes;       /* n * bytes per weight (1 to 2^30) */
  const float *scales;    /* int8: scale rows of scale_row floats, row r at scales + r * scale_row;
                             NULL for fp16 / bf16 */
  int scale_row;
  const float *factor;    /* (n_head * dv,) weight-aware score factor, or NULL (magnitude) */
  const float *threshold; /* DEVICE pointer to the projection's threshold */
} sparsify_next_rows;

cudaError_t sparsify_attention_decode_ex(const float *qkv, int qkv_parts, int qkv_stride,
                                           void *kc, void *vc, const int64_t *pos,
                                           const float *cos_t, const float *sin_t,
                                           const int32_t *perm, const float *q_norm,
                                           const float *k_norm, float *out, int n_head,
                                           int n_head_kv, int dk, int dv, int max_len,
                                           int window, float scale, float eps,
                                           const sparsify_next_rows *next, int flags,
                                           cudaStream_t stream);

cudaError_t sparsify_attention_decode_split(const float *qkv, int qkv_parts, int qkv_stride,
                                            void *kc, void *vc, const int64_t *pos,
                                            const float *cos_t, const float *sin_t,
                                            const int32_t *perm, const float *q_norm,
                                            const float *k_norm, float *out, int n_head,
                                            int n_head_kv, int dk, int dv, int max_len,
                                            int window, float scale, float eps,
                                            const sparsify_next_rows *next, int flags,
                                            int splits, void *workspace, size_t workspace_bytes,
                                            cudaStream_t stream);

/* Dynamic shared memory bytes sparsify_attention_decode needs for these sizes (unsplit, float32
   cache: an upper bound for sparsify_attention_decode_split without SPARSIFY_ATTN_CACHE_F16). */
size_t sparsify_attention_smem_bytes(int dk, int dv, int max_len);

/* Dynamic shared memory bytes of one sparsify_attention_decode_split launch with these
   arguments (0 for arguments no launch takes); it runs if this plus 1 KB of static shared memory
   fits the device's opt-in limit per block. */
size_t sparsify_attention_launch_smem_bytes(int dk, int dv, int max_len, int n_head,
                                            int n_head_kv, int splits, int flags);

/* Keys a split-KV range takes at least in a launch with these arguments (M above: 256, or
   SPARSIFY_ATTN_SPLIT_KEYS read now; ceil(M / rep) with SPARSIFY_ATTN_GROUP_HEADS; never below
   splits); 0 for a bad argument. Such a launch cuts its visible keys into more than one range
   from twice this many keys on. */
int sparsify_attention_split_keys(int n_head, int n_head_kv, int splits, int flags);

/* Workspace bytes of sparsify_attention_decode_split (0 for a bad argument). */
size_t sparsify_attention_workspace_bytes(int n_head, int dv, int splits);

#ifdef __cplusplus
}
#endif

#endif /* SPARSIFY_DECODE_OPS_H */
