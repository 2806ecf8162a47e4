// The Hopper (sm_90a) mainloop of the "wgmma" implementations: InfoNCE's
// (infonce/infonce_wgmma_cuda.cu) and SigLIP's (siglip/siglip_wgmma_cuda.cu). It computes the
// dot tiles <q_i, k_j> of one CTA's 128 rows of q against the column tiles of its split and
// hands each finished tile, in registers, to the caller's epilogue callable. TMA loads into
// 128-byte-swizzled shared stages, an mbarrier pipeline (cutlass::PipelineTmaAsync) between a
// producer warpgroup and two consumer warpgroups, and wgmma.mma_async (both operands from shared
// memory), on the CUTLASS/CuTe headers of the pinned nvidia-cutlass package (header-only).
//
// Built only with the CuTe headers (SEMCOMP_HAVE_CUTE, set by CMake) and outside the host
// emulator (EMU_HAVE_TORCH): SEMCOMP_WGMMA_KERNELS is 1 then, and users compile their kernels
// and host drivers only under it (stubs otherwise, whose available() is false). The device
// functions exist only in the sm_90a device pass (__CUDA_ARCH_FEAT_SM90_ALL); the kernels'
// bodies in other device passes trap.
//
// CTA (kThreads = 384): warpgroup 0 is the producer (setmaxnreg down to 40; one thread issues
// the TMA loads), warpgroups 1 and 2 consume (setmaxnreg up to 232): wgmma m64n128k16, one
// 64-row half of the 128 x 128 tile each, fp32 accumulators in registers (64 per thread).
// 128 x 128 rather than 128 x 256: InfoNCE's backward epilogue holds two column coefficients per
// accumulator column, and 128 accumulator registers plus those would not fit next to the row
// state; 128 columns keep one tile of logic for every pass of both losses.
//
// Pipeline: kStages = 5 stages of 32 KiB, each the q slice (128 rows x 64 elements, 128 bytes
// per row) and the k slice (128 x 64) of one step; the step sequence runs over (column tile,
// D step) of the CTA's split without draining between column tiles, so the producer prefetches
// the next tile's slices while the consumers run the epilogue. Both slices stream (q rows are
// re-read per column tile and hit L2). D tails and rows past the ends are TMA out-of-bounds zero
// fill, so every size with d % 8 == 0 and 16-byte aligned bases works (the TMA stride rule);
// can_run() is false otherwise and the dispatchers use the other paths. A consumer step: wait
// on the stage's full barrier, four wgmma k16 steps (the first of a column tile with scale-out
// 0), commit, wait for them, release the stage (every consumer thread arrives on its empty
// barrier).
//
// Shared layout: the TMA box {64 elements, 128 rows} with CU_TENSOR_MAP_SWIZZLE_128B writes
// row r at byte 128 r, 16-byte chunk c at position c ^ (r % 8): the CuTe GMMA K-major SW128
// layout (static_assert below), 1024-byte aligned stages, from which CuTe builds the wgmma
// shared-memory descriptors. Smem<SCRATCH> adds the pipeline's barriers and SCRATCH floats
// of epilogue scratch.
//
// The accumulators reach the epilogue as float[1][kNJ][4] in the m16n8 C layout of
// common/mma_frag.cuh (static_assert below): consumer warp w (0..7) holds tile rows
// [16 w, 16 w + 16) and all 128 columns, i.e. an epilogue geometry of MI = 1, NJ = 16,
// SLOTS_M = 8, SLOTS_N = 1 over kEpiThreads = 256 threads, synchronised by consumer_bar().
//
// Numerics: the same mainloop code for every pass (same TMA boxes, same wgmma sequence over
// the same D steps), so a dot tile at a given 128-row block is the same bits in every pass.
// The wgmma dot differs from the mma.sync dot (common/mma_mainloop.cuh) in the last bits (a
// different summation order inside the tensor cores).
//
// Use (kernel side, sm_90a pass):
//   Smem<S>& sm = smem_ref<S>(); Pipeline pipe = make_pipeline(sm); __syncthreads();
//   Walk w{...};                         // the CTA's rows and column tiles
//   if (producer_role(pipe, sm, &qmap, &kmap, w)) return;   // consumer threads go on:
//   ... consume<BF16>(pipe, sm, w, [&](int64_t ct, float (&acc)[1][kNJ][4]) { epilogue });
// Host side: tma_map() for both operands (boxes of 128 rows x 64 elements), allow_smem(),
// launch with kThreads threads and smem_bytes<S> bytes of dynamic shared memory.
#pragma once

#if defined(SEMCOMP_HAVE_CUTE) && SEMCOMP_HAVE_CUTE && !defined(EMU_HAVE_TORCH)
#define SEMCOMP_WGMMA_KERNELS 1
#else
#define SEMCOMP_WGMMA_KERNELS 0
#endif

#if SEMCOMP_WGMMA_KERNELS
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cudaTypedefs.h>  // CUtensorMap, PFN_cuTensorMapEncodeTiled (no libcuda link)

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <cstdint>
#include <limits>
#include <string_view>
#include <type_traits>

#include "common/cuda_utils.cuh"  // also SEMCOMP_MM_OUT_DTYPE
#include "common/mma_frag.cuh"
#include "common/mma_mainloop.cuh"  // kernel 1's kBM (the host helpers count its row blocks)

namespace semcomp::wgmma_loop {

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

using Pipeline = cutlass::PipelineTmaAsync<kStages>;

// Shared memory: the stages (1024-byte aligned for the 128-byte swizzle), the pipeline's
// barriers, SCRATCH floats of epilogue scratch. The dynamic allocation is rounded up to 1024
// by hand (smem_ref), hence the extra 1024 bytes of smem_bytes.
template <int SCRATCH>
struct Smem {
  alignas(1024) uint16_t q[kStages][kSliceElems];
  alignas(1024) uint16_t k[kStages][kSliceElems];
  typename Pipeline::SharedStorage pipe;
  float scratch[SCRATCH];
};
template <int SCRATCH>
constexpr int smem_bytes = int(sizeof(Smem<SCRATCH>)) + 1024;
static_assert(kStageTxBytes == sizeof(Smem<1>::q[0]) + sizeof(Smem<1>::k[0]), "a stage's TMA bytes");

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

// ---- static checks of the layouts the kernels rely on ---------------------------------------

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

// One CTA's work: its first row r0 (of q, 128 rows), its column tiles [t0, t1), kt D steps
// (of kBK elements) per column tile.
struct Walk {
  int64_t r0, t0, t1;
  int kt;
};

// Device code for sm_90a only (other device passes compile the kernels' trapping bodies).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
template <int SCRATCH>
__device__ __forceinline__ Smem<SCRATCH>& smem_ref() {
  extern __shared__ unsigned char smem_raw[];
  const uintptr_t p = (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023);
  return *reinterpret_cast<Smem<SCRATCH>*>(p);
}

template <typename SmemT>
__device__ __forceinline__ Pipeline make_pipeline(SmemT& sm) {
  typename Pipeline::Params p;
  p.transaction_bytes = kStageTxBytes;
  p.role = threadIdx.x < 128 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  p.is_leader = threadIdx.x == 0;
  p.num_consumers = kEpiThreads;
  // initialises the barriers (warp 0) and fences the init; the caller syncs the CTA
  return Pipeline(sm.pipe, p, cute::Shape<cute::_1, cute::_1, cute::_1>{});
}

// Producer (thread 0): the q and k slices of every (column tile, D step) of the walk.
template <typename SmemT>
__device__ __forceinline__ void produce(Pipeline& pipe, SmemT& sm, const CUtensorMap* qmap,
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
// Every pass of every loss runs exactly this code.
template <bool BF16, typename SmemT, typename Epi>
__device__ __forceinline__ void consume(Pipeline& pipe, SmemT& sm, const Walk& w, Epi&& epi) {
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

// The roles: the producer warpgroup gives its registers back, thread 0 issues every load of
// the walk (produce()) and the call returns true: the kernel returns. The consumer warpgroups
// take their registers and get false: they go on with consume() and their epilogue.
//   if (producer_role(pipe, sm, &qmap, &kmap, w)) return;
// (A plain branch rather than a callable taking the consumer side: with the callable, nvcc
// schedules InfoNCE's epilogue set-up differently by a few instructions.)
template <typename SmemT>
__device__ __forceinline__ bool producer_role(Pipeline& pipe, SmemT& sm, const CUtensorMap* qmap,
                                              const CUtensorMap* kmap, const Walk& w) {
  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x == 0) produce(pipe, sm, qmap, kmap, w);
    return true;
  }
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  return false;
}

// The consumer thread's fragment coordinates: warp w = ctid / 32 holds tile rows [16 w, 16 w + 16)
// and all kBN columns (the epilogues' SLOTS_M = 8, SLOTS_N = 1 geometry).
__device__ __forceinline__ mma_frag::Frag<1, kNJ> consumer_frag() {
  const int ctid = int(threadIdx.x) - 128, warp = ctid >> 5, lane = ctid & 31;
  return mma_frag::Frag<1, kNJ>{16 * warp, 0, warp, 0, lane >> 2, lane & 3};
}

// Synchronises the kEpiThreads consumer threads (not the producer warpgroup, which has left).
__device__ __forceinline__ void consumer_bar() {
  cutlass::arch::NamedBarrier::sync(kEpiThreads, 0);  // id 0 past CUTLASS's reserved ids
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// ---- host -------------------------------------------------------------------------------------

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link to libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
#else
    C10_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q));
#endif
    TORCH_CHECK(q == cudaDriverEntryPointSuccess && p != nullptr,
                "wgmma kernels: the CUDA driver has no cuTensorMapEncodeTiled (needs CUDA 12)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// The TMA map of x (rows x d, row-major, bf16/fp16): boxes of 128 rows x 64 elements, 128B
// swizzle, zero fill out of bounds. op, name: for the error message ("infonce wgmma", "q").
inline CUtensorMap tma_map(const at::Tensor& x, const char* op, const char* name) {
  CUtensorMap m;
  const cuuint64_t dims[2] = {cuuint64_t(x.size(1)), cuuint64_t(x.size(0))};
  const cuuint64_t strides[1] = {cuuint64_t(x.size(1)) * 2};  // bytes, dimension 1
  const cuuint32_t box[2] = {kBK, kBM};
  const cuuint32_t estr[2] = {1, 1};
  const CUresult r = encode_tiled()(
      &m, x.scalar_type() == at::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      2, const_cast<void*>(x.const_data_ptr()), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, op, ": cuTensorMapEncodeTiled failed (CUresult ", int(r), ") for ", name,
              " of shape ", x.sizes());
  return m;
}

// The kernel's dynamic shared memory above the 48 KiB default.
template <typename K>
void allow_smem(K* kernel, int bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// Whether a CMake architecture list ("80,90a", CMAKE_CUDA_ARCHITECTURES joined by commas) has
// sm_90a code; without it an H100 would run the trapping sm_90 body. "all", "native" and the
// like count as no: the wgmma implementations are then unavailable.
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

// The rules every wgmma implementation shares (its available()): a build with sm_90a code,
// torch >= 2.8 (mm.dtype_out), q and k CUDA, contiguous, both bf16 or both fp16, 2-D with the
// same d, d % 8 == 0 and 16-byte aligned bases (TMA: 16-byte row strides and addresses),
// 1 <= rows < 2^31 and d < 2^31 (int32 TMA coordinates), a device of compute capability 9.0.
inline bool can_run(const at::Tensor& q, const at::Tensor& k) {
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

}  // namespace semcomp::wgmma_loop

#endif  // SEMCOMP_WGMMA_KERNELS
