// vramcal's fused operations on CUDA: forward and backward of RMSNorm, RoPE, SwiGLU, the
// attention softmax and the LM-head cross-entropy, for f32 and bf16 tensors.
//
// Written plainly, in the manner of llm.c's `train_gpt2.cu`: one thread block per row for row
// operations, one thread per element for elementwise ones, statistics and softmax in f32. Each
// kernel computes exactly what the composed candle operations of `src/ops/` compute, rounding to
// the tensor dtype at the same points, so that a kernel and its CPU counterpart agree to the
// dtype's rounding (tests/cuda.rs checks this when a GPU is present).
//
// Compiled into PTX by build.rs (cudaforge, the builder candle-kernels uses) when the `cuda`
// feature is on; loaded by src/ops/kernels.rs through candle's custom-op CUDA path. Shapes are
// given per kernel; every tensor is contiguous unless strides are passed.

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16(x); }

// `x` rounded to T and back: what a candle operation producing a T tensor keeps.
template <typename T> __device__ __forceinline__ float round_to(float x) {
  return to_f(from_f<T>(x));
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
  __shared__ float warp_part[32];
  __shared__ float total;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < (int)(blockDim.x / 32) ? warp_part[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    if (lane == 0) total = s;
  }
  __syncthreads();
  const float r = total;
  __syncthreads();  // nobody overwrites `total` before everyone has read it
  return r;
}

// Maximum over the block, as block_sum.
__device__ float block_max(float v) {
  __shared__ float warp_part[32];
  __shared__ float total;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < (int)(blockDim.x / 32) ? warp_part[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) s = fmaxf(s, __shfl_xor_sync(0xffffffff, s, o));
    if (lane == 0) total = s;
  }
  __syncthreads();
  const float r = total;
  __syncthreads();
  return r;
}

// 1 / sqrt(mean(x²) + eps) of one row of `h` values (Zhang & Sennrich 2019, eq. 4).
template <typename T> __device__ float inv_rms(const T* xr, int h, float eps) {
  float ss = 0.f;
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    const float v = to_f(xr[j]);
    ss += v * v;
  }
  return 1.f / sqrtf(block_sum(ss) * (1.f / (float)h) + eps);
}

// RMSNorm forward. x (rows, h), w (h,) -> out (rows, h): round(round(x·inv)·w).
// Grid: any number of blocks (rows are strided over them).
template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* w, T* out, int rows, int h, float eps) {
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + (size_t)row * h;
    const float inv = inv_rms(xr, h, eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x)
      out[(size_t)row * h + j] = from_f<T>(round_to<T>(to_f(xr[j]) * inv) * to_f(w[j]));
  }
}

// RMSNorm backward to the input. x, g (rows, h), w (h,) -> dx (rows, h):
// n = x·inv, dn = g·w, dx = (dn − n·mean(dn·n))·inv.
template <typename T>
__device__ void rms_norm_bwd_x(const T* x, const T* w, const T* g, T* dx, int rows, int h,
                               float eps) {
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + (size_t)row * h;
    const T* gr = g + (size_t)row * h;
    const float inv = inv_rms(xr, h, eps);
    float dot = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x)
      dot += to_f(gr[j]) * to_f(w[j]) * (to_f(xr[j]) * inv);
    const float proj = block_sum(dot) * (1.f / (float)h);
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
      const float n = to_f(xr[j]) * inv;
      dx[(size_t)row * h + j] = from_f<T>((to_f(gr[j]) * to_f(w[j]) - n * proj) * inv);
    }
  }
}

// RMSNorm backward to the weight, accumulated: dw (h,) f32 += Σ_rows g·round(x·inv).
// Dynamic shared memory: h floats. Each thread owns columns j ≡ threadIdx.x (mod blockDim.x),
// sums its rows there, then adds once per column per block.
template <typename T>
__device__ void rms_norm_bwd_w(const T* x, const T* g, float* dw, int rows, int h, float eps) {
  extern __shared__ float acc[];
  for (int j = threadIdx.x; j < h; j += blockDim.x) acc[j] = 0.f;
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + (size_t)row * h;
    const float inv = inv_rms(xr, h, eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x)
      acc[j] += to_f(g[(size_t)row * h + j]) * round_to<T>(to_f(xr[j]) * inv);
  }
  for (int j = threadIdx.x; j < h; j += blockDim.x) atomicAdd(&dw[j], acc[j]);
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// SwiGLU forward. gate, up (n,) -> out (n,): round(silu(gate)·up), silu computed as candle's
// CPU does in T's arithmetic, gate / (1 + exp(−gate)), rounding after each operation.
template <typename T> __device__ void swiglu_fwd(const T* gate, const T* up, T* out, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const float a = to_f(gate[i]);
    const float den = round_to<T>(1.f + round_to<T>(expf(-a)));
    out[i] = from_f<T>(round_to<T>(a / den) * to_f(up[i]));
  }
}

// SwiGLU backward. gate, up, g (n,) -> d (n,): with which = 0 the gradient to the gate,
// g·up·σ(gate)·(1 + gate·(1 − σ(gate))); with which = 1 to up, g·silu(gate).
template <typename T>
__device__ void swiglu_bwd(const T* gate, const T* up, const T* g, T* d, size_t n, int which) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const float a = to_f(gate[i]), s = sigmoid(a), gi = to_f(g[i]);
    d[i] = from_f<T>(which == 0 ? gi * to_f(up[i]) * (s * (a * (1.f - s) + 1.f)) : gi * (a * s));
  }
}

// RoPE, transformers' rotate_half layout (pairs i, i + hd/2). x (b, heads, s, hd) with element
// strides st0..st3; cos, sin (s, hd) -> out (b, heads, s, hd) contiguous.
// Forward (backward = 0): out_i = round(round(x_i·cos_i) + round(r_i·sin_i)), r = rotate_half(x).
// Backward (backward = 1, x is the output gradient): the transpose of that map,
// out_i = round(round(x_i·cos_i) + r'_i) with r'_i = round(x_{i+hd/2}·sin_{i+hd/2}) for the first
// half and −round(x_{i−hd/2}·sin_{i−hd/2}) for the second.
template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* out, int b, int heads, int s,
                     int hd, size_t st0, size_t st1, size_t st2, size_t st3, int backward) {
  const size_t n = (size_t)b * heads * s * hd;
  const int half = hd / 2;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const int d = i % hd;
    const int p = (i / hd) % s;
    const int h = (i / ((size_t)hd * s)) % heads;
    const int bi = i / ((size_t)hd * s * heads);
    const T* row = x + bi * st0 + h * st1 + p * st2;
    const T* cr = cos + (size_t)p * hd;
    const T* sr = sin + (size_t)p * hd;
    const float xi = to_f(row[d * st3]);
    float other;
    if (!backward) {
      const float r = d < half ? -to_f(row[(d + half) * st3]) : to_f(row[(d - half) * st3]);
      other = round_to<T>(r * to_f(sr[d]));
    } else if (d < half) {
      other = round_to<T>(to_f(row[(d + half) * st3]) * to_f(sr[d + half]));
    } else {
      other = -round_to<T>(to_f(row[(d - half) * st3]) * to_f(sr[d - half]));
    }
    out[i] = from_f<T>(round_to<T>(xi * to_f(cr[d])) + other);
  }
}

// Attention probabilities. scores (rows, s) in T (q·kᵀ, rows = b·heads·s, query position
// row mod s), mask (s, s) f32 additive, scale already representable in T -> probs (rows, s)
// f32: softmax_j(round(scores·scale) + mask[row mod s, j]).
template <typename T>
__device__ void attention_softmax(const T* scores, const float* mask, float* probs, int rows,
                                  int s, float scale) {
  const float sc = scale;
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* r = scores + (size_t)row * s;
    const float* m = mask + (size_t)(row % s) * s;
    float* o = probs + (size_t)row * s;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < s; j += blockDim.x)
      mx = fmaxf(mx, round_to<T>(to_f(r[j]) * sc) + m[j]);
    mx = block_max(mx);
    float sum = 0.f;
    for (int j = threadIdx.x; j < s; j += blockDim.x) {
      const float e = expf(round_to<T>(to_f(r[j]) * sc) + m[j] - mx);
      o[j] = e;
      sum += e;
    }
    sum = block_sum(sum);
    for (int j = threadIdx.x; j < s; j += blockDim.x) o[j] /= sum;
  }
}

// The maximum of a row of `vocab` f32 logits and Σ exp(l − max), block-wide.
__device__ void row_max_sum(const float* l, int vocab, float* mx_out, float* sum_out) {
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, l[j]);
  mx = block_max(mx);
  float sum = 0.f;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(l[j] - mx);
  *mx_out = mx;
  *sum_out = block_sum(sum);
}

// Cross-entropy per row. logits (rows, vocab) f32, targets (rows,) u32 -> loss (rows,) f32:
// log Σ exp(l − max) − (l_target − max). A target outside the vocabulary gives NaN (the model's
// targets are its input tokens, which the embedding lookup has already bounded).
__device__ void ce_loss(const float* logits, const uint32_t* targets, float* loss, int rows,
                        int vocab) {
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const float* l = logits + (size_t)row * vocab;
    float mx, sum;
    row_max_sum(l, vocab, &mx, &sum);
    if (threadIdx.x == 0) {
      const uint32_t t = targets[row];
      loss[row] = t < (uint32_t)vocab ? logf(sum) - (l[t] - mx) : NAN;
    }
  }
}

// Cross-entropy gradient to the logits. logits (rows, vocab) f32, targets (rows,) u32,
// scale () f32 (the loss gradient over the token count) -> d (rows, vocab) in T:
// round((softmax(l) − onehot(target))·scale).
template <typename T>
__device__ void ce_grad(const float* logits, const uint32_t* targets, const float* scale, T* d,
                        int rows, int vocab) {
  const float g = *scale;
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const float* l = logits + (size_t)row * vocab;
    float mx, sum;
    row_max_sum(l, vocab, &mx, &sum);
    const uint32_t t = targets[row];
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
      const float p = expf(l[j] - mx) / sum - ((uint32_t)j == t ? 1.f : 0.f);
      d[(size_t)row * vocab + j] = from_f<T>(p * g);
    }
  }
}

// The entry points: one per kernel and dtype, named <kernel>_<dtype>.
#define ENTRIES(T, SUF)                                                                         \
  extern "C" __global__ void rms_norm_fwd_##SUF(const T* x, const T* w, T* out, int rows,     \
                                                int h, float eps) {                           \
    rms_norm_fwd<T>(x, w, out, rows, h, eps);                                                 \
  }                                                                                           \
  extern "C" __global__ void rms_norm_bwd_x_##SUF(const T* x, const T* w, const T* g, T* dx,  \
                                                  int rows, int h, float eps) {               \
    rms_norm_bwd_x<T>(x, w, g, dx, rows, h, eps);                                             \
  }                                                                                           \
  extern "C" __global__ void rms_norm_bwd_w_##SUF(const T* x, const T* g, float* dw, int rows, \
                                                  int h, float eps) {                         \
    rms_norm_bwd_w<T>(x, g, dw, rows, h, eps);                                                \
  }                                                                                           \
  extern "C" __global__ void swiglu_fwd_##SUF(const T* gate, const T* up, T* out, size_t n) { \
    swiglu_fwd<T>(gate, up, out, n);                                                          \
  }                                                                                           \
  extern "C" __global__ void swiglu_bwd_##SUF(const T* gate, const T* up, const T* g, T* d,   \
                                              size_t n, int which) {                          \
    swiglu_bwd<T>(gate, up, g, d, n, which);                                                  \
  }                                                                                           \
  extern "C" __global__ void rope_##SUF(const T* x, const T* cos, const T* sin, T* out, int b, \
                                        int heads, int s, int hd, size_t st0, size_t st1,     \
                                        size_t st2, size_t st3, int backward) {               \
    rope<T>(x, cos, sin, out, b, heads, s, hd, st0, st1, st2, st3, backward);                 \
  }                                                                                           \
  extern "C" __global__ void attention_softmax_##SUF(const T* scores, const float* mask,      \
                                                     float* probs, int rows, int s,           \
                                                     float scale) {                           \
    attention_softmax<T>(scores, mask, probs, rows, s, scale);                                \
  }                                                                                           \
  extern "C" __global__ void ce_grad_##SUF(const float* logits, const uint32_t* targets,      \
                                           const float* scale, T* d, int rows, int vocab) {   \
    ce_grad<T>(logits, targets, scale, d, rows, vocab);                                       \
  }

ENTRIES(float, f32)
ENTRIES(bf16, bf16)

extern "C" __global__ void ce_loss_f32(const float* logits, const uint32_t* targets, float* loss,
                                       int rows, int vocab) {
  ce_loss(logits, targets, loss, rows, vocab);
}
