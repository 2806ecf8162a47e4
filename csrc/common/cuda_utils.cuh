// Helpers shared by the CUDA backends: warp/block reductions, an online (max, sum)
// log-sum-exp state, 16-byte vector access, device-side index validation with one host sync,
// and the gather kernel over a "column CSR" (csrc/common/column_csr.cuh) that turns a column
// index with duplicates into a deterministic, atomic-free scatter (gather_columns_bwd and
// segment_mean_bwd). No cub here: every unit includes this header.
//
// Headers: only c10/cuda (no ATen/cuda/CUDAContext.h, which needs cuSPARSE headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define SEMCOMP_MM_OUT_DTYPE 1  // aten::mm.dtype_out / addmm.dtype_out exist
#else
#define SEMCOMP_MM_OUT_DTYPE 0
#endif

namespace semcomp::cuda {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid dimension y/z are limited to 65535; x to 2^31 - 1.
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

// Multiprocessor count of a device (cached per device index).
inline int64_t multiprocessor_count(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, std::max(device, 0)));
    return std::max(1, n);
  }
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = std::max(1, n);
  }
  return cache[device];
}

// ---- reductions (fixed shuffle trees: deterministic for a given launch shape) ----------

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// max that propagates NaN (fmax drops it).
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over a whole block (blockDim.x a multiple of 32, <= 1024); result valid in thread 0.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) part[warp] = v;
  __syncthreads();
  const int nw = blockDim.x >> 5;
  v = (threadIdx.x < nw) ? part[threadIdx.x] : T(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();  // part[] may be reused by a following call
  return v;
}

// ---- log-sum-exp with exp2 -------------------------------------------------------------
// Every LSE kernel keeps its running max m in natural units (the logits S themselves) and
// sums exp2((S - m) log2(e)): one MUFU.EX2 per element in fp32; fp64 uses the libdevice
// exp2/log2. The max being a logit itself (not S log2(e) rounded), the LSE of a single
// logit is that logit exactly, and a backward that recomputes S the same way (mul_rn) gets
// exp2((S - r) log2(e)) = 1 exactly there: no rounding residue at N = 1.

__device__ __forceinline__ float exp2_(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_(double x) { return exp2(x); }
__device__ __forceinline__ float log2_(float x) { return log2f(x); }
__device__ __forceinline__ double log2_(double x) { return log2(x); }

template <typename A>
constexpr A kLog2e = A(1.4426950408889634074);
template <typename A>
constexpr A kLn2 = A(0.6931471805599453094);

// a * b rounded once, never fused into a following add (an FMA would keep the product
// exact in one kernel and rounded in another): logits S = W s are computed with it
// everywhere, so the forward and the backward see the same S bit for bit.
#if defined(__CUDACC__)
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
#else  // host emulation of the kernels (development aid): a plain product
inline float mul_rn(float a, float b) { return a * b; }
inline double mul_rn(double a, double b) { return a * b; }
#endif

// exp of (x - m) in natural units, as one exp2 (the difference is taken first, exactly
// zero when x == m).
template <typename A>
__device__ __forceinline__ A exp_diff(A x, A m) {
  return exp2_((x - m) * kLog2e<A>);
}

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// Online state: m = running max, s = sum of exp(x - m) (natural units, each term computed
// as exp_diff). (-inf, 0) is the empty state.
template <typename A>
struct Lse2 {
  A m, s;
  __device__ __forceinline__ static Lse2 empty() { return {neg_inf<A>(), A(0)}; }
  // Adds one finite (or NaN) value. NaN poisons s.
  __device__ __forceinline__ void add(A x) {
    if (x > m) {
      s = s * exp_diff(m, x) + A(1);
      m = x;
    } else {
      s += exp_diff(x, m);
    }
  }
  // Merges another state; empty states (-inf, 0) are absorbed without computing
  // exp2(-inf - -inf). A state that saw a NaN as its first value keeps m = -inf with s = NaN:
  // it is not empty, and its NaN must reach the result.
  __device__ __forceinline__ void merge(A om, A os) {
    if (om > m) {
      const A t = m;
      m = om;
      om = t;
      const A u = s;
      s = os;
      os = u;
    }
    if (om != neg_inf<A>()) {
      s += os * exp_diff(om, m);
    } else if (os != A(0)) {
      s += os;  // os is NaN here: (-inf, s > 0) cannot arise from add()
    }
  }
  __device__ __forceinline__ A lse_natural() const { return m + log2_(s) * kLn2<A>; }
};

// ---- mixed-precision GEMM helpers (bf16/fp16 operands, fp32 accumulation and output) -------

#if SEMCOMP_MM_OUT_DTYPE
// acc (fp32) += m1 m2 with bf16/fp16 operands. Some torch versions accept an fp32 `self` in
// addmm.dtype_out, others insist it has the operands' dtype (the check fires before any
// launch, leaving acc untouched); then fall back, for the rest of the process, to
// mm.dtype_out into a scratch block plus add_ (one extra pass over acc per call). `mode`
// remembers the choice: 0 untried, 1 addmm, 2 fallback.
inline void addmm_fp32_accumulate(at::Tensor& acc, const at::Tensor& m1, const at::Tensor& m2,
                                  at::Tensor& scratch, std::atomic<int>& mode) {
  if (mode.load() != 2) {
    try {
      at::addmm_out(acc, acc, m1, m2, at::kFloat, /*beta=*/1, /*alpha=*/1);
      mode.store(1);
      return;
    } catch (const c10::Error&) {
      if (mode.load() == 1) throw;
      mode.store(2);
    }
  }
  if (!scratch.defined()) scratch = at::empty_like(acc);
  at::mm_out(scratch, m1, m2, at::kFloat);
  acc.add_(scratch);
}
#endif

// fp16 gradient blocks: with small upstream gradients (reduction="mean" at large N) most
// entries of s*G lie below fp16's smallest subnormal (6e-8) and would flush to zero. They
// are stored times an exact power of two p = 2^floor(log2(2^14 / bound)) (exponent clamped to
// [-30, 60], 0 for a NaN bound), `bound` (a one-element device tensor) being the largest
// possible |entry|: chosen on the device, no sync. The GEMMs that read the
// block then write fp32, and their results are multiplied by 1/p (exact).
inline at::Tensor pow2_prescale(const at::Tensor& bound) {
  const at::Tensor e = bound.reshape({}).reciprocal().mul(16384.0).log2().floor();
  return e.nan_to_num(0.0, 60.0, -30.0).clamp(-30.0, 60.0).exp2().reshape({1}).contiguous();
}

// ---- 16-byte vector access -------------------------------------------------------------

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

__host__ __device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- index validation: first bad position, one host sync (none under graph capture) ----

// Records in *first_bad the smallest i with idx[i] outside [0, bound) (atomicMin, so the
// result is the first bad position whatever the schedule).
// (Header kernels are templates so that every translation unit may include them.)
template <typename I>
__global__ void first_out_of_range_kernel(const I* __restrict__ idx, int64_t n,
                                          int64_t bound, unsigned long long* first_bad) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = static_cast<int64_t>(idx[i]);
    if (v < 0 || v >= bound) atomicMin(first_bad, static_cast<unsigned long long>(i));
  }
}

// Launches the scan of idx (int64, contiguous, n entries) into slot `slot` of `status`
// (int64 tensor on the device, initialised to INT64_MAX by new_status()).
inline void launch_index_scan(const at::Tensor& idx, int64_t bound, at::Tensor& status,
                              int64_t slot, cudaStream_t stream) {
  const int64_t n = idx.numel();
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, threads), 4096);
  first_out_of_range_kernel<<<blocks, threads, 0, stream>>>(
      idx.const_data_ptr<int64_t>(), n, bound,
      reinterpret_cast<unsigned long long*>(status.data_ptr<int64_t>() + slot));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline at::Tensor new_status(int64_t slots, const at::Tensor& like) {
  return at::full({slots}, std::numeric_limits<int64_t>::max(),
                  like.options().dtype(at::kLong));
}

// Whether `stream` is being captured into a CUDA graph (a host sync there is illegal).
inline bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &st));
  return st != cudaStreamCaptureStatusNone;
}

// Device-side end of validation inside a captured graph: a bad slot (selected by `mask`)
// prints its slot and position and traps, so the replay fails with a CUDA error instead of
// returning results computed from bad indices.
template <int Unused = 0>
__global__ void trap_if_bad_kernel(const unsigned long long* __restrict__ status, int slots,
                                   unsigned mask) {
  for (int s = 0; s < slots; ++s) {
    if (((mask >> s) & 1u) && status[s] != static_cast<unsigned long long>(INT64_MAX)) {
      printf("semcomp: out-of-range index in a CUDA graph replay (check slot %d, position %llu)\n",
             s, status[s]);
      __trap();
    }
  }
}

// Ends a validation: outside graph capture, copies `status` to the host (the op's one
// sync) for raise_if_bad; while the stream is captured, launches trap_if_bad_kernel on the
// slots in `mask` instead and returns an undefined tensor (raise_if_bad then does nothing).
inline at::Tensor finish_status(const at::Tensor& status, unsigned mask, cudaStream_t stream) {
  if (!stream_is_capturing(stream)) return status.cpu();
  trap_if_bad_kernel<<<1, 1, 0, stream>>>(
      reinterpret_cast<const unsigned long long*>(status.const_data_ptr<int64_t>()),
      static_cast<int>(status.numel()), mask);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {};
}

// After finish_status: raises the CPU backend's message for a bad slot.
inline void raise_if_bad(const char* op, const char* name, const at::Tensor& host_status,
                         int64_t slot, const at::Tensor& idx, int64_t bound) {
  if (!host_status.defined()) return;  // under graph capture: checked on the device
  const int64_t pos = host_status.const_data_ptr<int64_t>()[slot];
  if (pos == std::numeric_limits<int64_t>::max()) return;
  const int64_t v = idx[pos].item<int64_t>();  // error path only: a second sync is fine
  TORCH_CHECK_VALUE(false, op, ": ", name, "[", pos, "] = ", v, " is out of range [0, ", bound, ")");
}

// ---- column CSR (csrc/common/column_csr.cuh builds it: the cub radix sort is compiled in
// that one unit). Scatters over a column index with duplicates become gathers:
//   out[:, d] = sum_{t in [off[d], off[d+1])} in[:, src[t]]   (fixed order, no atomics).

// out[i, d] = scale_i * sum_{t in [off[d], off[d+1])} in[src_row_i, src[t]]  for d < dim,
// or, with off == nullptr (identity columns), scale_i * in[src_row_i, d].
// src_row_i = rows ? rows[i] : i; scale_i = counts ? 1 / counts[src_row_i] : 1.
// Rows whose src_row is outside [0, in_rows) or whose count is <= 0 are skipped and their
// first position recorded (atomicMin) in status[0] / status[1] for the caller's one sync.
// Thread mapping: grid-stride over rows in blockIdx.y/x, threads along d (coalesced
// writes; the reads of `in` stay inside one short row and hit L1/L2). fp32 (fp64) sums.
template <typename T>
__global__ void column_csr_scatter_kernel(const T* __restrict__ in, int64_t in_cols,
                                          int64_t in_rows, const int64_t* __restrict__ rows,
                                          const int64_t* __restrict__ counts,
                                          const int64_t* __restrict__ off,
                                          const int64_t* __restrict__ src, T* __restrict__ out,
                                          int64_t n, int64_t dim,
                                          unsigned long long* status) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    const int64_t r = rows ? rows[i] : i;
    if (r < 0 || r >= in_rows) {
      if (threadIdx.x == 0 && blockIdx.x == 0) atomicMin(status, static_cast<unsigned long long>(i));
      continue;
    }
    A scale = A(1);
    if (counts) {
      const int64_t c = counts[r];
      if (c <= 0) {
        if (threadIdx.x == 0 && blockIdx.x == 0)
          atomicMin(status + 1, static_cast<unsigned long long>(i));
        continue;
      }
      scale = A(1) / static_cast<A>(c);
    }
    const T* row = in + r * in_cols;
    T* dst = out + i * dim;
    for (int64_t d = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; d < dim;
         d += int64_t(gridDim.x) * blockDim.x) {
      A acc = A(0);
      if (off) {
        const int64_t e = off[d + 1];
        for (int64_t t = off[d]; t < e; ++t) acc += static_cast<A>(row[src[t]]);
      } else {
        acc = static_cast<A>(row[d]);
      }
      dst[d] = static_cast<T>(acc * scale);
    }
  }
}

}  // namespace semcomp::cuda
