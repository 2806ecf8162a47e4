// InfoNCE "wgmma" kernels (see infonce_wgmma.h): the mma implementation's logit passes
// (infonce_mma_cuda.cu) with a Hopper mainloop for sm_90a (H100/H200): TMA loads into
// 128-byte-swizzled shared stages, an mbarrier pipeline between a producer warpgroup and two
// consumer warpgroups, and wgmma.mma_async (both operands from shared memory), on the
// CUTLASS/CuTe headers of the pinned nvidia-cutlass package (header-only). The epilogues are
// kernel 1's (infonce/infonce_mma_epilogue.cuh), as are the host drivers' partial states,
// splits and fixed-order merges (infonce/infonce_lse.cuh).
//
// Built only with the CuTe headers (SEMCOMP_HAVE_CUTE, set by CMake) and only for sm_90a:
// the kernel bodies are guarded by __CUDA_ARCH_FEAT_SM90_ALL (other device passes compile an
// empty body that traps), the host emulator (EMU_HAVE_TORCH) and builds without the headers
// get stubs, and available() is false there.
//
// CTA (384 threads): warpgroup 0 is the producer (setmaxnreg down to 40; one thread issues
// the TMA loads), warpgroups 1 and 2 consume (setmaxnreg up to 232): wgmma m64n128k16, one
// 64-row half of the 128 x 128 tile each, fp32 accumulators in registers (64 per thread).
// 128 x 128 rather than 128 x 256: the backward's symmetric epilogue holds two column
// coefficients per accumulator column, and 128 accumulator registers plus those would not
// fit next to the row state; 128 columns keep one tile of logic for both passes.
//
// Pipeline: kStages = 5 stages of 32 KiB, each the q slice (128 rows x 64 elements, 128
// bytes per row) and the k slice (128 x 64) of one step; the step sequence runs over
// (column tile, D step) of the CTA's split without draining between column tiles, so the
// producer prefetches the next tile's slices while the consumers run the epilogue. Both
// slices stream (q rows are re-read per column tile and hit L2), as in kernel 1. D tails and
// rows past nq / nk are TMA out-of-bounds zero fill, so every size with d % 8 == 0 and
// 16-byte aligned bases works (the TMA stride rule); available() is false otherwise and the
// dispatcher uses the other paths. A consumer step: wait on the stage's full barrier, four
// wgmma k16 steps (the first of a column tile with scale-out 0), commit, wait for them, release
// the stage (every consumer thread arrives on its empty barrier).
//
// Shared layout: the TMA box {64 elements, 128 rows} with CU_TENSOR_MAP_SWIZZLE_128B writes
// row r at byte 128 r, 16-byte chunk c at position c ^ (r % 8): the CuTe GMMA K-major SW128
// layout (static_assert below), 1024-byte aligned stages, from which CuTe builds the wgmma
// shared-memory descriptors.
//
// Numerics: as kernel 1 (logit x = mul_rn(dot, s) in fp32, the epilogues are the same code).
// The forward and the backward run the same mainloop function (same TMA boxes, same wgmma
// sequence over the same D steps, each dot tile at the same 128-row block: the backward's
// row chunks are rounded up to multiples of 128), so the backward recomputes the forward's
// dot bit for bit. The wgmma dot itself differs from kernel 1's mma.sync dot in the last bits
// (a different summation order inside the tensor cores).
//
// Left for the GPU measurements to justify: overlapping one consumer warpgroup's epilogue with
// the other's wgmma (FA3's ping-pong; here both consumers run the epilogue together and the
// tensor cores wait), keeping the q block resident across column tiles when 128 x d fits,
// TMA stores of the backward's s*G tile, and 2-CTA clusters multicasting the k slices.
//
// Not yet run on a GPU: benchmarks/wgmma_check.py compares it with kernel 1 and an fp64
// reference on ragged shapes and times it.
#include <ATen/core/Tensor.h>

#include "infonce/infonce_wgmma.h"

#if defined(SEMCOMP_HAVE_CUTE) && SEMCOMP_HAVE_CUTE && !defined(EMU_HAVE_TORCH)
#define SEMCOMP_WGMMA_KERNELS 1
#else
#define SEMCOMP_WGMMA_KERNELS 0
#endif

#if SEMCOMP_WGMMA_KERNELS
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cudaTypedefs.h>  // CUtensorMap, PFN_cuTensorMapEncodeTiled (no libcuda link)

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <algorithm>
#include <limits>
#include <string_view>
#include <type_traits>

#include "common/cuda_utils.cuh"  // also SEMCOMP_MM_OUT_DTYPE
#include "common/mma_frag.cuh"
#include "common/mma_mainloop.cuh"  // host helpers (pick_splits, pick_blocks) and split_range
#include "infonce/infonce.h"
#include "infonce/infonce_lse.cuh"
#include "infonce/infonce_mma_epilogue.cuh"
#include "infonce/infonce_sg_bwd.cuh"
#endif

namespace semcomp::wgmma {

#if SEMCOMP_WGMMA_KERNELS
namespace {

using semcomp::cuda::ceil_div;
using semcomp::infonce_lse::FwdPartials;
using semcomp::infonce_lse::scale_ok;
using semcomp::mma_frag::Frag;

constexpr int kBM = 128, kBN = 128, kBK = 64, kStages = 5;
constexpr int kConsumerWGs = 2;
constexpr int kEpiThreads = 128 * kConsumerWGs;       // the consumer warpgroups
constexpr int kThreads = 128 + kEpiThreads;           // plus the producer warpgroup
constexpr int kSliceElems = kBM * kBK;                // one operand slice of a stage
constexpr int kSliceBytes = kSliceElems * 2;          // 16 KiB
constexpr uint32_t kStageTxBytes = 2 * kSliceBytes;   // what the TMA writes per stage
constexpr int kNJ = kBN / 8;                          // m16n8 fragments per consumer warp
constexpr int kProducerRegs = 40, kConsumerRegs = 232;
static_assert(kBM == kConsumerWGs * 64, "one wgmma m64 row half per consumer warpgroup");
static_assert(kBK * 2 == 128, "a slice row is one 128-byte swizzle span (TMA box width)");
static_assert(kBM == semcomp::mma_loop::kBM, "pick_blocks counts kernel 1's 128-row blocks");
static_assert(128 * kProducerRegs + kEpiThreads * kConsumerRegs <= 65536, "register file");

template <bool SYM>
using FwdEpiT = semcomp::mma_epi::InfoNCEFwd<kBM, kBN, 8, 1, 1, kNJ, SYM>;
template <typename T, bool SYM>
using GradEpiT = semcomp::mma_epi::InfoNCEGrad<T, kBM, kBN, 8, 1, 1, kNJ, SYM>;
constexpr int kScratchFloats =
    std::max(FwdEpiT<true>::kScratchFloats, GradEpiT<c10::BFloat16, true>::kScratchFloats);
static_assert(FwdEpiT<true>::kThreads == kEpiThreads, "the epilogue runs on the consumer warps");

using Pipeline = cutlass::PipelineTmaAsync<kStages>;

// Shared memory: the stages (1024-byte aligned for the 128-byte swizzle), the pipeline's
// barriers, the epilogue scratch. The dynamic allocation is rounded up to 1024 by hand.
struct Smem {
  alignas(1024) uint16_t q[kStages][kSliceElems];
  alignas(1024) uint16_t k[kStages][kSliceElems];
  typename Pipeline::SharedStorage pipe;
  float scratch[kScratchFloats];
};
constexpr int kSmemBytes = int(sizeof(Smem)) + 1024;
static_assert(kStageTxBytes == sizeof(Smem::q[0]) + sizeof(Smem::k[0]), "a stage's TMA bytes");
static_assert(kSmemBytes <= 227 * 1024, "sm_90 shared memory per block");

template <bool BF16>
struct Cfg {
  using E = std::conditional_t<BF16, cute::bfloat16_t, cute::half_t>;
  // (128 rows, 64 elements, stage): the SW128 K-major atom (8 rows x 64) stacked down the rows
  using SmemLayout = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<E>{},
      cute::make_shape(cute::Int<kBM>{}, cute::Int<kBK>{}, cute::Int<kStages>{})));
  using Atom = std::conditional_t<
      BF16, cute::SM90_64x128x16_F32BF16BF16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>,
      cute::SM90_64x128x16_F32F16F16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>>;
  // two m64 atoms down the rows: consumer thread t (0..255) is in warpgroup t / 128
  using TiledMma = decltype(cute::make_tiled_mma(
      Atom{}, cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
};

// ---- static checks of the layouts the kernel relies on --------------------------------------

// The SW128 layout is the TMA's 128B-swizzle image: CuTe applies the swizzle Sw<3,4,3> to the
// byte address (bits 4-6 ^= bits 7-9 of a 1024-byte aligned buffer), so element (r, c) of
// stage p sits at byte 2 (p * 8192 + 64 r + 8 ((c / 8) ^ (r % 8)) + c % 8). Checked on a
// sample (every 16-byte chunk, rows of each swizzle phase, first and last stage): the full
// grid exceeds the compiler's constexpr budget.
template <bool BF16>
constexpr bool smem_layout_is_tma_image() {
  constexpr typename Cfg<BF16>::SmemLayout L{};
  constexpr auto sw = cute::get_swizzle_portion(L);
  constexpr auto in = cute::get_nonswizzle_portion(L);
  constexpr int rows[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 63, 64, 121, 127};
  for (int p = 0; p < kStages; p += kStages - 1)
    for (int r : rows)
      for (int c = 0; c < kBK; c += 7)
        if (int(sw(2 * int(in(r, c, p)))) != 2 * (p * kSliceElems + 64 * r + 8 * ((c / 8) ^ (r % 8)) + c % 8))
          return false;
  return true;
}
static_assert(smem_layout_is_tma_image<true>(), "CuTe's GMMA K-major SW128 layout must match the TMA 128B swizzle");
static_assert(smem_layout_is_tma_image<false>(), "CuTe's GMMA K-major SW128 layout must match the TMA 128B swizzle");

// The accumulator of consumer thread t (0..255), value v (0..63) is element (row, col) of the
// 128 x 128 tile with row = 64 (t / 128) + 16 ((t / 32) % 4) + (t % 32) / 4 + 8 ((v / 2) % 2)
// and col = 8 (v / 4) + 2 (t % 4) + v % 2: in mma_frag terms warp w = t / 32 holds rows
// [16 w, 16 w + 16), fragment nj = v / 4, element e = v % 4 of the m16n8 C layout, so the
// fragment's flat order (2 columns, 2 row halves, N/8) is e + 4 nj = float[1][N/8][4].
template <bool BF16>
constexpr bool accumulator_is_m16n8() {
  using TM = typename Cfg<BF16>::TiledMma;
  static_assert(std::is_same_v<typename cute::MMA_Traits<typename Cfg<BF16>::Atom>::CLayout,
                               cute::GMMA::CLayout_64xN<kBN>>);
  constexpr auto tv = TM{}.get_layoutC_TV();  // (thread, value) -> row + 128 col
  constexpr int threads[] = {0, 1, 2, 3, 4, 5, 30, 31, 32, 33, 63, 64, 97, 127,
                             128, 129, 131, 135, 160, 191, 200, 224, 254, 255};
  for (int t : threads)
    for (int v = 0; v < 64; ++v) {
      const int row = 64 * (t / 128) + 16 * ((t / 32) % 4) + (t % 32) / 4 + 8 * ((v / 2) % 2);
      const int col = 8 * (v / 4) + 2 * (t % 4) + v % 2;
      if (int(tv(t, v)) != row + kBM * col) return false;
    }
  return true;
}
static_assert(accumulator_is_m16n8<true>() && accumulator_is_m16n8<false>(),
              "the wgmma accumulator must be the m16n8 C layout the epilogues read");

// ---- device -----------------------------------------------------------------------------------

// Everything both passes share: the CTA's rows, its column tiles [t0, t1), d.
struct Walk {
  int64_t r0, t0, t1;
  int kt;  // D steps per column tile
};

// Device code for sm_90a only (other device passes compile the kernels' trapping bodies).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ Smem& smem_ref() {
  extern __shared__ unsigned char smem_raw[];
  const uintptr_t p = (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023);
  return *reinterpret_cast<Smem*>(p);
}

__device__ __forceinline__ Pipeline make_pipeline(Smem& sm) {
  typename Pipeline::Params p;
  p.transaction_bytes = kStageTxBytes;
  p.role = threadIdx.x < 128 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  p.is_leader = threadIdx.x == 0;
  p.num_consumers = kEpiThreads;
  // initialises the barriers (warp 0) and fences the init; the caller syncs the CTA
  return Pipeline(sm.pipe, p, cute::Shape<cute::_1, cute::_1, cute::_1>{});
}

// Producer (thread 0): the q and k slices of every (column tile, D step) of the walk.
__device__ __forceinline__ void produce(Pipeline& pipe, Smem& sm, const CUtensorMap* qmap,
                                        const CUtensorMap* kmap, const Walk& w) {
  constexpr uint64_t kHint = uint64_t(cute::TMA::CacheHintSm90::EVICT_NORMAL);
  cute::prefetch_tma_descriptor(reinterpret_cast<const cute::TmaDescriptor*>(qmap));
  cute::prefetch_tma_descriptor(reinterpret_cast<const cute::TmaDescriptor*>(kmap));
  auto st = cutlass::make_producer_start_state<Pipeline>();
  const int32_t qrow = static_cast<int32_t>(w.r0);
  for (int64_t ct = w.t0; ct < w.t1; ++ct) {
    const int32_t krow = static_cast<int32_t>(ct * kBN);
    for (int ks = 0; ks < w.kt; ++ks) {
      pipe.producer_acquire(st);  // the stage is free; expects kStageTxBytes on its full barrier
      uint64_t* bar = pipe.producer_get_barrier(st);
      // coordinates innermost first: (D element, row)
      cute::SM90_TMA_LOAD_2D::copy(qmap, bar, kHint, sm.q[st.index()], ks * kBK, qrow);
      cute::SM90_TMA_LOAD_2D::copy(kmap, bar, kHint, sm.k[st.index()], ks * kBK, krow);
      ++st;
    }
  }
}

// Consumers (threads 128 .. 383): the dot tile of every column tile of the walk, accumulated
// over the D steps in order, then epi(ct, acc) with acc as float[1][kNJ][4] (m16n8 layout).
// The forward and the backward run exactly this code.
template <bool BF16, typename Epi>
__device__ __forceinline__ void consume(Pipeline& pipe, Smem& sm, const Walk& w, Epi&& epi) {
  using namespace cute;
  using C = Cfg<BF16>;
  using E = typename C::E;
  typename C::TiledMma mma;
  const int ctid = int(threadIdx.x) - 128;
  auto thr = mma.get_thread_slice(ctid);
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<E*>(&sm.q[0][0])), typename C::SmemLayout{});
  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<E*>(&sm.k[0][0])), typename C::SmemLayout{});
  Tensor tA = thr.make_fragment_A(thr.partition_A(sQ));  // (MMA, 1, kBK / 16, kStages) descriptors
  Tensor tB = thr.make_fragment_B(thr.partition_B(sK));
  Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});  // ((2, 2, kNJ), 1, 1)
  static_assert(decltype(size(acc))::value == 4 * kNJ, "64 accumulators per thread");
  static_assert(decltype(size<2>(tA))::value == kBK / 16, "four k16 steps per stage");
  auto& acc4 = *reinterpret_cast<float(*)[1][kNJ][4]>(raw_pointer_cast(acc.data()));
  typename Pipeline::PipelineState st;  // stage 0, phase 0
  for (int64_t ct = w.t0; ct < w.t1; ++ct) {
    for (int ks = 0; ks < w.kt; ++ks) {
      pipe.consumer_wait(st);
      const int stage = st.index();
      warpgroup_fence_operand(acc);
      warpgroup_arrive();
      mma.accumulate_ = ks == 0 ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
      CUTE_UNROLL
      for (int kb = 0; kb < kBK / 16; ++kb) {
        cute::gemm(mma, tA(_, _, kb, stage), tB(_, _, kb, stage), acc);
        mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc);
      pipe.consumer_release(st);
      ++st;
    }
    epi(ct, acc4);
  }
}

// The consumer thread's fragment coordinates: warp w = ctid / 32 holds tile rows [16 w, 16 w + 16)
// and all kBN columns (the epilogue's SLOTS_M = 8, SLOTS_N = 1 geometry).
__device__ __forceinline__ Frag<1, kNJ> consumer_frag() {
  const int ctid = int(threadIdx.x) - 128, warp = ctid >> 5, lane = ctid & 31;
  return Frag<1, kNJ>{16 * warp, 0, warp, 0, lane >> 2, lane & 3};
}

__device__ __forceinline__ void consumer_bar() {
  cutlass::arch::NamedBarrier::sync(kEpiThreads, 0);  // id 0 past CUTLASS's reserved ids
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

struct FwdArgs {
  int64_t nq, nk, d, offset, rb0;
  const float* scale;
  float *row_pm, *row_ps, *col_pm, *col_ps, *diag;  // as mma_fwd_kernel
};

// grid (row blocks of this pass, splits); rb0: first row block of the pass.
template <bool BF16, bool SYM>
__global__ void __launch_bounds__(kThreads, 1)
wgmma_fwd_kernel(const __grid_constant__ CUtensorMap qmap, const __grid_constant__ CUtensorMap kmap,
                 const FwdArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  Smem& sm = smem_ref();
  Pipeline pipe = make_pipeline(sm);
  __syncthreads();  // barriers initialised
  const int64_t rbl = blockIdx.x, split = blockIdx.y;
  Walk w{(a.rb0 + rbl) * kBM, 0, 0, static_cast<int>(ceil_div(a.d, kBK))};
  semcomp::mma_loop::split_range(ceil_div(a.nk, kBN), split, gridDim.y, w.t0, w.t1);
  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x == 0) produce(pipe, sm, &qmap, &kmap, w);
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  const float s = a.scale[0];
  FwdEpiT<SYM> epi(consumer_frag(), w.r0, a.nq, a.nk, s, a.offset, sm.scratch, int(threadIdx.x) - 128,
                   SYM ? a.col_pm + rbl * a.nk : nullptr, SYM ? a.col_ps + rbl * a.nk : nullptr, a.diag);
  consume<BF16>(pipe, sm, w, [&](int64_t ct, float (&acc)[1][kNJ][4]) { epi.tile(ct, acc, consumer_bar); });
  epi.finish(a.row_pm + split * a.nq, a.row_ps + split * a.nq, consumer_bar);
#elif defined(__CUDA_ARCH__)
  __trap();  // sm_90a only (available() checks the device and the build)
#endif
}

struct GradArgs {
  int64_t nk, d, i0, c, offset;
  const float *scale, *rlse, *rcoef, *dcoef, *clse, *ccoef, *gscale;
  uint16_t* gbuf;
  int64_t ld_g;
  bool pair_store;
  float* ds_part;
  int64_t ld_ds;
};

// grid (row blocks of rows [i0, i0 + c), splits); i0 is a multiple of kBM (the forward's row
// blocks). gbuf: row i - i0, column j at gbuf[(i - i0) * ld_g + j]; ds_part: (splits, ld_ds).
template <typename T, bool BF16, bool SYM>
__global__ void __launch_bounds__(kThreads, 1)
wgmma_grad_kernel(const __grid_constant__ CUtensorMap qmap, const __grid_constant__ CUtensorMap kmap,
                  const GradArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  Smem& sm = smem_ref();
  Pipeline pipe = make_pipeline(sm);
  __syncthreads();
  const int64_t split = blockIdx.y;
  Walk w{a.i0 + int64_t(blockIdx.x) * kBM, 0, 0, static_cast<int>(ceil_div(a.d, kBK))};
  semcomp::mma_loop::split_range(ceil_div(a.nk, kBN), split, gridDim.y, w.t0, w.t1);
  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x == 0) produce(pipe, sm, &qmap, &kmap, w);
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  const float s = scale_ok(a.scale[0]) ? a.scale[0] : std::numeric_limits<float>::quiet_NaN();
  const float sg = a.gscale ? s * a.gscale[0] : s;
  GradEpiT<T, SYM> epi(consumer_frag(), w.r0, a.i0, a.i0 + a.c, a.nk, a.offset, s, sg, a.rlse,
                       a.rcoef, a.dcoef, a.clse, a.ccoef, a.gbuf, a.ld_g, a.pair_store, sm.scratch);
  consume<BF16>(pipe, sm, w, [&](int64_t ct, float (&acc)[1][kNJ][4]) { epi.tile(ct, acc); });
  epi.finish(a.ds_part + split * a.ld_ds, consumer_bar);
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// ---- host -------------------------------------------------------------------------------------

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link to libcuda).
PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
#else
    C10_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q));
#endif
    TORCH_CHECK(q == cudaDriverEntryPointSuccess && p != nullptr,
                "infonce wgmma: the CUDA driver has no cuTensorMapEncodeTiled (needs CUDA 12)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// The TMA map of x (rows x d, row-major, bf16/fp16): boxes of 128 rows x 64 elements, 128B
// swizzle, zero fill out of bounds.
CUtensorMap tma_map(const at::Tensor& x, const char* name) {
  CUtensorMap m;
  const cuuint64_t dims[2] = {cuuint64_t(x.size(1)), cuuint64_t(x.size(0))};
  const cuuint64_t strides[1] = {cuuint64_t(x.size(1)) * 2};  // bytes, dimension 1
  const cuuint32_t box[2] = {kBK, kBM};
  const cuuint32_t estr[2] = {1, 1};
  const CUresult r = encode_tiled()(
      &m, x.scalar_type() == at::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      2, const_cast<void*>(x.const_data_ptr()), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "infonce wgmma: cuTensorMapEncodeTiled failed (CUresult ", int(r),
              ") for ", name, " of shape ", x.sizes());
  return m;
}

// Rows per backward chunk: `chunk` rounded up to whole kBM-row blocks (the forward's row blocks,
// so every dot tile is recomputed as the forward computed it), at most nq; auto_rows (a
// multiple of kBM) when chunk <= 0.
constexpr int64_t bwd_chunk_rows(int64_t chunk, int64_t nq, int64_t auto_rows) {
  const int64_t want = chunk <= 0 ? auto_rows : chunk >= nq ? nq : (chunk + kBM - 1) / kBM * kBM;
  return want < nq ? want : nq;
}
static_assert(bwd_chunk_rows(50, 1000, 0) == 128 && bwd_chunk_rows(128, 1000, 0) == 128 &&
              bwd_chunk_rows(129, 1000, 0) == 256 && bwd_chunk_rows(999, 1000, 0) == 1000 &&
              bwd_chunk_rows(int64_t(1) << 62, 1000, 0) == 1000 && bwd_chunk_rows(0, 1000, 384) == 384 &&
              bwd_chunk_rows(0, 300, 384) == 300 && bwd_chunk_rows(1, 1, 128) == 1);

template <typename K>
void allow_smem(K* kernel) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
}

template <bool SYM>
std::vector<at::Tensor> fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& s,
                                 int64_t offset, int64_t chunk) {
  using semcomp::mma_loop::pick_blocks;
  using semcomp::mma_loop::pick_splits;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const int64_t nq = q.size(0), nk = k.size(0), d = q.size(1);
  const auto opts = q.options().dtype(at::kFloat);
  const int64_t n_rb = ceil_div(nq, kBM), n_ct = ceil_div(nk, kBN);
  const int64_t pass = SYM ? pick_blocks(chunk, n_rb, 8 * nk) : n_rb;  // as kernel 1
  TORCH_CHECK_VALUE(pass <= std::numeric_limits<int>::max(), "infonce: too many rows (", nq, ")");
  const int64_t splits = pick_splits(pass, n_ct, semcomp::cuda::multiprocessor_count(q.device().index()));
  FwdPartials p(splits, nq, pass, nk, SYM, opts);
  const float* sp = s.const_data_ptr<float>();
  const CUtensorMap qm = tma_map(q, "q"), km = tma_map(k, "k");
  for (int64_t rb0 = 0; rb0 < n_rb; rb0 += pass) {
    const int64_t nb = std::min(pass, n_rb - rb0);
    const FwdArgs a{nq, nk, d, offset, rb0, sp, p.rpm.data_ptr<float>(), p.rps.data_ptr<float>(),
                    SYM ? p.cpm.data_ptr<float>() : nullptr, SYM ? p.cps.data_ptr<float>() : nullptr,
                    p.diag.data_ptr<float>()};
    const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(splits));
    auto launch = [&](auto kernel) {
      allow_smem(kernel);
      kernel<<<grid, kThreads, kSmemBytes, stream>>>(qm, km, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (q.scalar_type() == at::kBFloat16) launch(&wgmma_fwd_kernel<true, SYM>);
    else launch(&wgmma_fwd_kernel<false, SYM>);
    if constexpr (SYM) p.merge_columns(nb, stream);
  }
  return p.template finish<SYM>(sp, stream);
}

#if SEMCOMP_MM_OUT_DTYPE
template <bool SYM>
std::vector<at::Tensor> bwd_impl(const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& logit_scale, const at::Tensor& s,
                                 const at::Tensor& rlse, const at::Tensor& rcoef,
                                 const at::Tensor& dcoef, const at::Tensor& clse,
                                 const at::Tensor& ccoef, int64_t offset, int64_t chunk) {
  using semcomp::mma_loop::pick_blocks;
  using semcomp::mma_loop::pick_splits;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const int64_t nq = q.size(0), nk = k.size(0), d = q.size(1);
  const int64_t n_rb = ceil_div(nq, kBM), n_ct = ceil_div(nk, kBN);
  const int64_t C = bwd_chunk_rows(chunk, nq, pick_blocks(0, n_rb, kBM * nk * q.element_size()) * kBM);
  const int64_t splits =
      pick_splits(ceil_div(C, kBM), n_ct, semcomp::cuda::multiprocessor_count(q.device().index()));
  const CUtensorMap qm = tma_map(q, "q"), km = tma_map(k, "k");
  GradArgs a{nk, d, 0, 0, offset, s.const_data_ptr<float>(), rlse.const_data_ptr<float>(),
             rcoef.const_data_ptr<float>(), dcoef.const_data_ptr<float>(),
             SYM ? clse.const_data_ptr<float>() : nullptr, SYM ? ccoef.const_data_ptr<float>() : nullptr,
             nullptr, nullptr, nk, nk % 2 == 0, nullptr, C};
  return infonce_sg::backward<SYM>(q, k, logit_scale, s, rcoef, dcoef, ccoef, C, splits,
                                   [&](const infonce_sg::Chunk& ch) {
    a.i0 = ch.i0;
    a.c = ch.c;
    a.gscale = ch.gscale;
    a.gbuf = ch.gbuf;
    a.ds_part = ch.ds_part;
    const dim3 grid(static_cast<unsigned>(ceil_div(ch.c, kBM)), static_cast<unsigned>(splits));
    auto launch = [&](auto kernel) {
      allow_smem(kernel);
      kernel<<<grid, kThreads, kSmemBytes, stream>>>(qm, km, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (q.scalar_type() == at::kBFloat16) launch(&wgmma_grad_kernel<c10::BFloat16, true, SYM>);
    else launch(&wgmma_grad_kernel<c10::Half, false, SYM>);
  });
}
#endif

// Whether a CMake architecture list ("80,90a", CMAKE_CUDA_ARCHITECTURES joined by commas) has
// sm_90a code; without it an H100 would run the trapping sm_90 body. "all", "native" and the
// like count as no: this implementation is then unavailable.
constexpr bool archs_have_sm90a(std::string_view archs) {
  for (size_t i = 0; i <= archs.size();) {
    size_t j = archs.find(',', i);
    if (j == std::string_view::npos) j = archs.size();
    const std::string_view a = archs.substr(i, j - i);
    if (a == "90a" || a == "90a-real" || a == "90a-virtual") return true;
    i = j + 1;
  }
  return false;
}
static_assert(archs_have_sm90a("80,90a") && archs_have_sm90a("90a") && archs_have_sm90a("90a-real,80"));
static_assert(!archs_have_sm90a("80,90") && !archs_have_sm90a("") && !archs_have_sm90a("190a") &&
              !archs_have_sm90a("native") && !archs_have_sm90a("90a0"));

constexpr bool built_for_sm90a() {
#if defined(SEMCOMP_CUDA_ARCHS)
  return archs_have_sm90a(SEMCOMP_CUDA_ARCHS);
#else
  return false;
#endif
}

}  // namespace

bool available(const at::Tensor& q, const at::Tensor& k) {
  if (!SEMCOMP_MM_OUT_DTYPE || !built_for_sm90a()) return false;
  if (q.scalar_type() != at::kBFloat16 && q.scalar_type() != at::kHalf) return false;
  if (k.scalar_type() != q.scalar_type() || !q.is_cuda() || !k.is_cuda()) return false;
  if (q.dim() != 2 || k.dim() != 2 || q.size(1) != k.size(1) || !q.is_contiguous() || !k.is_contiguous())
    return false;
  const int64_t d = q.size(1), kMax = std::numeric_limits<int32_t>::max();
  // TMA: row strides a multiple of 16 bytes, 16-byte aligned bases, int32 coordinates
  if (d == 0 || d % 8 != 0 || q.size(0) == 0 || k.size(0) == 0) return false;
  if (q.size(0) > kMax || k.size(0) > kMax || d > kMax) return false;
  if (!semcomp::cuda::aligned16(q.const_data_ptr()) || !semcomp::cuda::aligned16(k.const_data_ptr()))
    return false;
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.device().index()));
  return major == 9 && minor == 0;  // sm_90a code runs on compute capability 9.0 only
}

std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& s,
                            int64_t offset, bool sym, int64_t chunk) {
  TORCH_CHECK(available(q, k), "infonce wgmma: not available for these inputs (see available())");
  return sym ? fwd_impl<true>(q, k, s, offset, chunk) : fwd_impl<false>(q, k, s, offset, chunk);
}

std::vector<at::Tensor> bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& logit_scale,
                            const at::Tensor& s, const at::Tensor& rlse, const at::Tensor& rcoef,
                            const at::Tensor& dcoef, const at::Tensor& clse,
                            const at::Tensor& ccoef, int64_t offset, bool sym, int64_t chunk) {
#if SEMCOMP_MM_OUT_DTYPE
  TORCH_CHECK(available(q, k), "infonce wgmma: not available for these inputs (see available())");
  return sym ? bwd_impl<true>(q, k, logit_scale, s, rlse, rcoef, dcoef, clse, ccoef, offset, chunk)
             : bwd_impl<false>(q, k, logit_scale, s, rlse, rcoef, dcoef, clse, ccoef, offset, chunk);
#else
  TORCH_CHECK(false, "infonce wgmma: needs torch >= 2.8 (mm.dtype_out)");
  return {};
#endif
}

#else  // no CuTe headers, or the host emulator: the dispatcher uses the other paths

bool available(const at::Tensor&, const at::Tensor&) { return false; }

std::vector<at::Tensor> fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool,
                            int64_t) {
  TORCH_CHECK(false, "infonce wgmma: not built (needs the CuTe headers of nvidia-cutlass and sm_90a)");
  return {};
}

std::vector<at::Tensor> bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, int64_t, bool, int64_t) {
  TORCH_CHECK(false, "infonce wgmma: not built (needs the CuTe headers of nvidia-cutlass and sm_90a)");
  return {};
}

#endif  // SEMCOMP_WGMMA_KERNELS

}  // namespace semcomp::wgmma
