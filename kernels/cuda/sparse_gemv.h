/*
 * sparse_gemv.h - threshold-sparse GEMV on CUDA for input-major weights.
 *
 * Computes, for one token,
 *
 *     y[n] = sum_i W[i, n] * x[i] * keep[i],    keep[i] = NOT(score[i] <= t),
 *     score[i] = |x[i]|            (factor == NULL, magnitude criterion)
 *     score[i] = |x[i]| * factor[i] (weight-aware criterion)
 *
 * which is y = W^T (x . keep) with W stored input-major. The threshold compare happens inside the
 * kernel: no separate pass, no host synchronisation, no allocation. Rows of W whose channel is
 * not kept are never read, so the bytes moved fall with the sparsity (the benchmark variants
 * 11-13 of sparsify_gemv_tuned add an L2 prefetch of the first rows of each block's K-chunk,
 * issued before x is known).
 *
 * Layout
 *   W        (K, N) row-major, input-major: row i holds the N weights that multiply x[i].
 *            fp16 / bf16: 2 bytes per weight. int8: 1 byte per weight, symmetric (value = q * s).
 *   scales   int8 only: float32 (K, ceil(N / SPARSIFY_GEMV_INT8_GROUP)) row-major; scales[i, g]
 *            multiplies W[i, g*G .. g*G + G - 1], one scale per group of G consecutive outputs of
 *            one input row (G = 128). When N is not a multiple of G the last group is short.
 *   x        float32 (K,)   activations.
 *   factor   float32 (K,) or NULL: per-input-channel score factor (for example the L2 norm of
 *            row i of W); NULL selects the magnitude criterion.
 *   threshold  DEVICE pointer to one float32. It is read by the kernel when it runs, so a CUDA
 *            graph captured once follows a new sparsity level after a plain device copy into
 *            that float (cudaMemcpyAsync / fill), with no re-capture.
 *   y        float32 (N,)   output; every element is written (it need not be initialised).
 *
 * Alignment: all pointers must be 4-byte aligned; workspace 16-byte aligned. The fast path (16-byte
 * loads) is taken when W is 16-byte aligned and N * sizeof(weight) is a multiple of 16 (N % 8 == 0
 * for fp16/bf16, N % 16 == 0 for int8); other shapes run a correct, slower scalar path.
 *
 * Workspace: split-K partial sums and per-tile arrival counters. Allocate at least
 * sparsify_gemv_workspace_bytes(K, N) bytes and set them to ZERO ONCE (cudaMemset) before the
 * first call; every completed launch leaves the counters at zero again, so later calls (and CUDA
 * graph replays) need no memset. Launches that may run at the same time (different streams with
 * no ordering between them) must use different workspaces. One workspace serves any sequence of
 * shapes on one stream as long as it is large enough for each.
 *
 * Threading and streams: launches are asynchronous on `stream`; the functions are thread-safe
 * (they keep only per-device cached attributes) and may be called while `stream` is being
 * captured into a CUDA graph. Results are deterministic: the summation order is fixed and does
 * not depend on block scheduling. On compute capability 9.0+ the kernel is launched with
 * programmatic dependent launch: it waits for the preceding kernel in the stream to complete
 * before it reads or writes any global memory, and lets the following kernel begin launching
 * early, which hides launch latency between back-to-back kernels (also inside graphs).
 *
 * NaN policy: keep = NOT(score <= t). A NaN in x (or factor) makes its channel kept, so it
 * propagates into y as in a dense product; a NaN threshold keeps every channel. Weights of
 * dropped channels are never read, so Inf/NaN stored in a dropped row do not reach y.
 *
 * Limits: 0 <= K, 0 <= N, K * N * sizeof(weight) addressable; K = 0 gives y = 0.
 * Return: cudaSuccess, cudaErrorInvalidValue for a bad argument (null pointer, negative size,
 * misaligned pointer, workspace too small), or the launch error.
 */
#ifndef SPARSIFY_SPARSE_GEMV_H
#define SPARSIFY_SPARSE_GEMV_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Outputs per int8 scale group (consecutive output channels of one input row). */
#define SPARSIFY_GEMV_INT8_GROUP 128

/* Weight formats, for sparsify_gemv_tuned. */
#define SPARSIFY_GEMV_F16 0
#define SPARSIFY_GEMV_BF16 1
#define SPARSIFY_GEMV_I8 2

/* Bytes of workspace needed for a (K, N) call of any weight format on any device. */
size_t sparsify_gemv_workspace_bytes(int k, int n);

/* fp16 weights (IEEE half, raw 16-bit storage). */
cudaError_t sparsify_gemv_f16(const void *w, const float *x, const float *factor,
                              const float *threshold, float *y, int k, int n, void *workspace,
                              size_t workspace_bytes, cudaStream_t stream);

/* bf16 weights (raw 16-bit storage). */
cudaError_t sparsify_gemv_bf16(const void *w, const float *x, const float *factor,
                               const float *threshold, float *y, int k, int n, void *workspace,
                               size_t workspace_bytes, cudaStream_t stream);

/* int8 weights with float32 scales per group of SPARSIFY_GEMV_INT8_GROUP outputs. */
cudaError_t sparsify_gemv_i8(const int8_t *w, const float *scales, const float *x,
                             const float *factor, const float *threshold, float *y, int k, int n,
                             void *workspace, size_t workspace_bytes, cudaStream_t stream);

/*
 * Same computation with the launch configuration exposed, for benchmarks. wtype is one of
 * SPARSIFY_GEMV_F16/BF16/I8 (scales ignored unless I8). variant: 0 default (one wave of
 * resident blocks; per lane two batches of four 16-byte loads, the next batch issued before the
 * current one is decoded; split-K ticket taken by one acquire-release atomic); 1 one batch of
 * four loads at a time; 2 default without programmatic dependent launch; 3 split-K reduced
 * through thread-block clusters (compute capability 9.0+, cudaErrorNotSupported below); 6 and 7:
 * K split finer, into two or four waves of blocks, so that the block scheduler evens out uneven
 * active-row counts; 8 one batch of eight loads at a time; 9 default with a sequentially
 * consistent fence in every thread around the ticket; 10 both 8 and 9 (the launch of the
 * earlier version); 11 and 12 default plus an L2 prefetch of the first rows of each block's
 * K-chunk before the wait for the previous kernel, 32 or 64 KB per multiprocessor; 13 variant 8
 * plus the 32 KB prefetch; 14 balanced splits (compute capability 9.0+): consecutive K-splits
 * of a tile form a thread-block cluster, join their lists of kept rows through distributed
 * shared memory and each stream an equal share of the joined list (the same launch without,
 * where a split's rows need more than one pass, no cluster size of 2-8 divides the split count,
 * or the clusters would not all be resident at once); 15 variant 14 without programmatic
 * dependent launch; 16 variant 14 even where its clusters are not all resident at once; 17 the
 * default launched in variant 14's clusters, without balancing (the cost of clusters); 18
 * globally balanced splits: every block evaluates the criterion for all K inputs of its segment
 * and streams split s's equal share of the whole kept list (for K <= 8192 and plain, gated or
 * normed inputs; the default launch otherwise). Every variant computes the same function; 3
 * sums the splits in another fixed order, and 14-16 and 18 cut them by kept count. For
 * benchmarks, the environment variable SPARSIFY_GEMV_VARIANT=N (read at each launch) makes
 * every default launch (variant 0, the plain and grouped entry points too) run variant N.
 * blocks_per_sm: cap on resident blocks per multiprocessor used to size the grid (0 = occupancy;
 * then SPARSIFY_GEMV_BLOCKS_PER_SM=N, read at each launch, caps every launch, the grouped ones
 * too, which leaves room on each multiprocessor for the next kernel's blocks to become
 * resident early; ask sparsify_gemv_group_splits again after changing it).
 *
 * Timing diagnostic (not for use): SPARSIFY_DIAG_NO_WAIT=BITS, read at each launch, makes some
 * launches skip programmatic dependent launch's wait for the kernel before them, so they read
 * an input that may still be being written and compute wrong results: bit 1 launches with
 * partial input rows (x_parts > 1: ffn_down after a gate/up with partial outputs), bit 2
 * accumulating launches of a plain input (attn_output after attention); decode_ops.h's bit 4
 * does the same for attention. The step time then bounds what a dependency per tile, instead
 * of per grid, could save.
 */
cudaError_t sparsify_gemv_tuned(int wtype, const void *w, const float *scales, const float *x,
                                const float *factor, const float *threshold, float *y, int k,
                                int n, void *workspace, size_t workspace_bytes, int variant,
                                int blocks_per_sm, cudaStream_t stream);

/*
 * Grouped launch: several weight matrices that multiply the same x (q, k and v of one block;
 * gate and up), computed by one kernel launch. Segment s has its own (K, n_s) input-major
 * weights, threshold, optional factor, int8 scales and output y_s, with the same semantics and
 * layout rules as above; all segments share x, K and the weight format. Each segment starts on
 * a fresh tile, so segments of any width mix freely (the 16-byte path is taken when every
 * segment qualifies for it). At most SPARSIFY_GEMV_MAX_SEGMENTS segments.
 *
 * Gated input: with x_up != NULL the input channel is x'[i] = act(x[i]) * x_up[i], computed in
 * float32 inside the kernel (act = SPARSIFY_GEMV_ACT_SILU: x / (1 + exp(-x));
 * SPARSIFY_GEMV_ACT_GELU_TANH: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))), and the score,
 * the threshold compare and the product all use x'. This is the FFN down projection's input
 * act(gate) * up without a separate pass. With x_up == NULL, act is ignored.
 *
 * Workspace: at least sparsify_gemv_group_workspace_bytes(K, n, nseg) bytes, zeroed once (as
 * above). The segment array is read on the host at the call; it need not outlive it.
 */
#define SPARSIFY_GEMV_MAX_SEGMENTS 3
#define SPARSIFY_GEMV_ACT_NONE 0
#define SPARSIFY_GEMV_ACT_SILU 1
#define SPARSIFY_GEMV_ACT_GELU_TANH 2

typedef struct {
  const void *w;          /* (K, n) input-major weights */
  const float *scales;    /* int8 only: (K, ceil(n / G)); else NULL */
  const float *factor;    /* (K,) score factor or NULL */
  const float *threshold; /* device pointer to one float32 */
  float *y;               /* (n,) output */
  int n;
} sparsify_gemv_segment;

size_t sparsify_gemv_group_workspace_bytes(int k, const int *n, int nseg);

cudaError_t sparsify_gemv_group(int wtype, const sparsify_gemv_segment *segs, int nseg,
                                const float *x, const float *x_up, int act, int k,
                                void *workspace, size_t workspace_bytes, cudaStream_t stream);

/*
 * The grouped launch with the rest of a pre-norm decoder block folded in, so that a block
 * needs no separate norm kernel between its GEMVs:
 *
 * Normed input: with norm_w != NULL the input channel is
 *     x'[i] = x[i] * s * norm_w[i],    s = rsqrt(sum_j x[j]^2 / K + norm_eps)
 * (RMS norm over all K inputs, float32, the factors in this order), and the score, threshold
 * compare and product all use x'. The scale s is computed by every block of the launch in one
 * fixed order, so it is deterministic and the same for all outputs. x is then typically the
 * residual stream itself. Exclusive with the gated input (both set: cudaErrorInvalidValue);
 * norm_eps must be >= 0.
 *
 * Accumulate: with accumulate != 0 every segment's output becomes y_s[n] += result[n] (y_s must
 * hold valid values before the launch), e.g. the residual add of an attention-output or FFN-down
 * projection straight into the residual stream. y_s must not overlap x, x_up or norm_w.
 *
 * Partial outputs (deferred split-K reduction): with y_parts != 0 the launch does not add its
 * K-splits together; split p stores its sums for segment s at y_s + p * y_stride (n_s floats),
 * and the consumer adds the y_parts rows itself, typically while reading its input anyway (the
 * partial-input form below, or sparsify_attention_decode_parts). This removes the reduction
 * tail (a fence, an arrival atomic and a reload of the partial sums by the last block) from
 * the launch. y_parts must equal the launch's split count, which
 * sparsify_gemv_group_splits returns for the same arguments on the current device (a
 * different count: cudaErrorInvalidValue); y_stride >= every n_s; not with accumulate. Every
 * row is written. The workspace is not used.
 *
 * Partial input rows: with x_parts >= 2, x (and x_up for a gated input) are x_parts rows
 * x_stride floats apart (x_stride >= K), and the input channel is their sum, added in row
 * order in float32: x[i] = x[i] + x[x_stride + i] + ... (then gated, thresholded and used as
 * usual). Not with a normed input. A launch with y_parts feeding one with x_parts computes the
 * same function as the two launches with the reduction in place, up to the order of the
 * float32 additions of the splits.
 *
 * Everything else (layout, workspace, determinism, streams, NaN policy) is as for
 * sparsify_gemv_group, which is this call with norm_w = NULL, accumulate = 0 and one row in and
 * out. Fields added later come last; zero-initialise the struct (= {0}) so that unused ones
 * are off.
 */
typedef struct {
  const float *x;       /* (K,) input, or x_parts rows of it */
  const float *x_up;    /* (K,) gated input's up, or NULL; rows like x */
  int act;              /* SPARSIFY_GEMV_ACT_* of the gated input */
  const float *norm_w;  /* (K,) RMS-norm weight of a normed input, or NULL */
  float norm_eps;       /* RMS-norm epsilon */
  int accumulate;       /* nonzero: add the result into y instead of storing it */
  int x_parts;          /* 0 or 1: one input row; >= 2: partial rows to add */
  int x_stride;         /* floats between input rows */
  int y_parts;          /* 0: reduced outputs; else the split count, one output row per split */
  int y_stride;         /* floats between output rows */
} sparsify_gemv_input;

cudaError_t sparsify_gemv_group_ex(int wtype, const sparsify_gemv_segment *segs, int nseg,
                                   const sparsify_gemv_input *in, int k, void *workspace,
                                   size_t workspace_bytes, cudaStream_t stream);

/*
 * The number of K-splits (>= 1) sparsify_gemv_group_ex would use for these arguments on the
 * current device: the row count of its partial outputs. Only w and n of each segment, and
 * in's x, x_up, norm_w and x_parts, are looked at; nothing is launched. The count depends on
 * the device and on SPARSIFY_GEMV_VARIANT, so ask again after changing either.
 */
cudaError_t sparsify_gemv_group_splits(int wtype, const sparsify_gemv_segment *segs, int nseg,
                                       const sparsify_gemv_input *in, int k, int *splits);

/* Human-readable text for an error code returned above. */
const char *sparsify_gemv_error_string(cudaError_t err);

#ifdef __cplusplus
}
#endif

#endif /* SPARSIFY_SPARSE_GEMV_H */
