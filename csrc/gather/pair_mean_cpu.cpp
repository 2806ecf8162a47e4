// Fused pair mean + column gather + finite flags on the CPU (see pair_mean.h). One task per
// range of rows; within a row, the finiteness pass brings the row into L1 and the gather reads
// it from there. Finite test: x - x is +0 for every finite x and NaN for +-Inf and NaN, so a
// row is finite iff the sum of (x - x) over it is 0 (no overflow is possible).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Storage.h>

#include <mutex>
#include <utility>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/cpu_index.h"
#include "gather/pair_mean.h"

#include <cstdlib>

// Outputs of 1 MiB or more start on a page boundary (posix_memalign), so that the compressor can
// hand whole blocks to the disk with O_DIRECT, which needs aligned memory, without a copy. Such
// allocations bypass the heap (glibc maps each one afresh: page faults and zeroing for every
// block), so the few most recently freed ones are kept for reuse: at most kCachedBuffers,
// kCachedBytes in all; a block stream of one size then runs on the same warm pages.
constexpr size_t kAlign = 4096;
constexpr size_t kCachedBuffers = 8;
constexpr size_t kCachedBytes = size_t(64) << 20;

struct AlignedCache {
  std::mutex mu;
  std::vector<std::pair<void*, size_t>> free_list;
  size_t bytes = 0;

  void* take(size_t n) {
    std::lock_guard<std::mutex> lock(mu);
    for (size_t i = 0; i < free_list.size(); ++i) {
      if (free_list[i].second == n) {
        void* p = free_list[i].first;
        free_list.erase(free_list.begin() + static_cast<std::ptrdiff_t>(i));
        bytes -= n;
        return p;
      }
    }
    return nullptr;
  }
  void give(void* p, size_t n) {
    std::lock_guard<std::mutex> lock(mu);
    while (!free_list.empty() && (free_list.size() >= kCachedBuffers || bytes + n > kCachedBytes)) {
      std::free(free_list.front().first);  // the oldest goes first
      bytes -= free_list.front().second;
      free_list.erase(free_list.begin());
    }
    if (n > kCachedBytes) {
      std::free(p);
      return;
    }
    free_list.emplace_back(p, n);
    bytes += n;
  }
};

AlignedCache& aligned_cache() {
  static auto* cache = new AlignedCache();  // never destroyed: deleters may run at exit
  return *cache;
}

at::Tensor page_aligned_empty(int64_t n, int64_t k, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(n) * static_cast<size_t>(k) *
                       c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < (size_t(1) << 20)) return at::empty({n, k}, options);
  void* p = aligned_cache().take(bytes);
  if (p == nullptr && (posix_memalign(&p, kAlign, bytes) != 0 || p == nullptr)) return at::empty({n, k}, options);
  // the deleter's context carries the size (from_blob's deleter sees only the pointer)
  auto* ctx = new std::pair<void*, size_t>(p, bytes);
  at::DataPtr data(p, ctx, [](void* c) {
    auto* pc = static_cast<std::pair<void*, size_t>*>(c);
    aligned_cache().give(pc->first, pc->second);
    delete pc;
  }, at::Device(at::kCPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(data), /*allocator=*/nullptr,
                       /*resizable=*/false);
  return at::empty({0}, options).set_(storage, 0, {n, k}, {k, 1});
}

// Rows per parallel task: about 2^22 input values (16 MiB of fp32). The op is bound by memory
// reads, so a second thread gains little on a block of that size and only adds hand-off and
// wake-up costs; the compressor's blocks (4096 rows x 512 x 2) therefore run on the calling
// thread, and the parallelism comes from its workers. Large in-memory inputs still split.
int64_t pair_mean_grain(int64_t d, int64_t m_count) {
  return std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(d * m_count, 1));
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SEMCOMP_PAIR_MEAN_AVX512 1
#endif

namespace semcomp {
namespace {

#ifdef SEMCOMP_PAIR_MEAN_AVX512
// The common case of offline compression — float32 rows with unit column stride and a sorted,
// duplicate-free RFS index — with AVX-512 (chosen at run time): each row is read 16 columns
// at a time; the kept columns of a chunk are packed by one register compress (mask[c]) and
// stored, or added, at the chunk's output offset (pos[c]). The same additions in the same
// order, then the same division (or the multiplication by 1/M when M is a power of two, which
// rounds identically), as the generic loop: the results are bit-identical.
// SEMCOMP_PAIR_MEAN_GENERIC=1 in the environment forces the generic loop (tests compare both).
bool use_avx512() {
  static const bool supported = __builtin_cpu_supports("avx512f");
  const char* off = std::getenv("SEMCOMP_PAIR_MEAN_GENERIC");
  return supported && !(off && off[0] && off[0] != '0');
}

__attribute__((target("avx512f"))) void pair_mean_rows_avx512(
    const std::vector<const float*>& base, const std::vector<int64_t>& sr, int64_t d, int64_t k,
    const std::vector<uint16_t>& masks, const std::vector<int32_t>& pos, float* out, bool* fl, int64_t lo,
    int64_t hi) {
  const int64_t m_count = static_cast<int64_t>(base.size());
  const int64_t chunks = (d + 15) / 16;
  const __mmask16 tail = (d % 16) ? static_cast<__mmask16>((1u << (d % 16)) - 1u) : static_cast<__mmask16>(0xFFFF);
  const bool pow2 = (m_count & (m_count - 1)) == 0;
  const __m512 inv = _mm512_set1_ps(1.0f / static_cast<float>(m_count));
  const __m512 den = _mm512_set1_ps(static_cast<float>(m_count));
  for (int64_t i = lo; i < hi; ++i) {
    float* dst = out + i * k;
    __m512 bad = _mm512_setzero_ps();
    for (int64_t m = 0; m < m_count; ++m) {
      const float* row = base[m] + i * sr[m];
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512 v = _mm512_maskz_loadu_ps(c == chunks - 1 ? tail : static_cast<__mmask16>(0xFFFF), row + 16 * c);
        bad = _mm512_add_ps(bad, _mm512_sub_ps(v, v));  // +0 for finite values, NaN otherwise
        const __mmask16 km = masks[c];
        if (km == 0) continue;
        const __m512 packed = _mm512_maskz_compress_ps(km, v);
        const __mmask16 sm = static_cast<__mmask16>((1u << __builtin_popcount(km)) - 1u);
        float* o = dst + pos[c];
        if (m == 0) {
          _mm512_mask_storeu_ps(o, sm, packed);
        } else {
          _mm512_mask_storeu_ps(o, sm, _mm512_add_ps(_mm512_maskz_loadu_ps(sm, o), packed));
        }
      }
    }
    if (m_count > 1) {
      for (int64_t c = 0; c < k; c += 16) {
        const __mmask16 lm = (k - c >= 16) ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (k - c)) - 1u);
        const __m512 v = _mm512_maskz_loadu_ps(lm, dst + c);
        _mm512_mask_storeu_ps(dst + c, lm, pow2 ? _mm512_mul_ps(v, inv) : _mm512_div_ps(v, den));
      }
    }
    fl[i] = _mm512_reduce_add_ps(bad) == 0.0f;
  }
}

// Per 16-column chunk of [0, d): the bit mask of the kept columns and the output offset of the
// chunk's first kept column. Returns false unless idx is strictly increasing (sorted, no repeats).
bool chunk_masks(const int64_t* ip, int64_t k, int64_t d, std::vector<uint16_t>& masks, std::vector<int32_t>& pos) {
  const int64_t chunks = (d + 15) / 16;
  masks.assign(chunks, 0);
  pos.assign(chunks, 0);
  for (int64_t c = 1; c < k; ++c)
    if (ip[c] <= ip[c - 1]) return false;
  int64_t j = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    pos[c] = static_cast<int32_t>(j);
    for (; j < k && ip[j] < 16 * (c + 1); ++j) masks[c] |= static_cast<uint16_t>(1u << (ip[j] - 16 * c));
  }
  return true;
}
#endif

// The AVX-512 path where it applies (float32, see above); false: use the generic loop.
template <typename T, typename A>
bool pair_mean_fast(const std::vector<const T*>&, const std::vector<int64_t>&, int64_t, int64_t, int64_t,
                    const int64_t*, A*, bool*) {
  return false;
}

#ifdef SEMCOMP_PAIR_MEAN_AVX512
template <>
bool pair_mean_fast<float, float>(const std::vector<const float*>& base, const std::vector<int64_t>& sr, int64_t n,
                                  int64_t d, int64_t k, const int64_t* ip, float* out, bool* fl) {
  if (d >= (int64_t(1) << 31) || !use_avx512()) return false;
  std::vector<int64_t> all;
  if (ip == nullptr) {
    all.resize(d);
    for (int64_t c = 0; c < d; ++c) all[c] = c;
    ip = all.data();
  }
  std::vector<uint16_t> masks;
  std::vector<int32_t> pos;
  if (!chunk_masks(ip, k, d, masks, pos)) return false;
  const int64_t m_count = static_cast<int64_t>(base.size());
  at::parallel_for(0, n, pair_mean_grain(d, m_count), [&](int64_t lo, int64_t hi) {
    pair_mean_rows_avx512(base, sr, d, k, masks, pos, out, fl, lo, hi);
  });
  return true;
}
#endif

std::tuple<at::Tensor, at::Tensor> pair_mean_cpu(at::TensorList zs, const c10::optional<at::Tensor>& features) {
  constexpr const char* op = "pair_mean";
  check_pair_mean_args(op, zs, features);
  const int64_t m_count = static_cast<int64_t>(zs.size());
  const int64_t n = zs[0].size(0), d = zs[0].size(1);
  at::Tensor idx;
  if (features.has_value()) idx = cpu::checked_index(op, "features", *features, d);
  const bool gather = idx.defined();
  const int64_t k = gather ? idx.numel() : d;
  const int64_t* ip = gather ? idx.data_ptr<int64_t>() : nullptr;
  const at::ScalarType acc_type = zs[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = page_aligned_empty(n, k, zs[0].options().dtype(acc_type));
  at::Tensor finite = at::empty({n}, zs[0].options().dtype(at::kBool));
  if (n == 0) return {out, finite};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, zs[0].scalar_type(), op, [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    std::vector<const scalar_t*> base(m_count);
    std::vector<int64_t> sr(m_count), sc(m_count);
    bool unit = true;
    for (int64_t m = 0; m < m_count; ++m) {
      base[m] = zs[m].const_data_ptr<scalar_t>();
      sr[m] = zs[m].stride(0);
      sc[m] = zs[m].stride(1);
      unit = unit && sc[m] == 1;
    }
    A* o = out.data_ptr<A>();
    bool* fl = finite.data_ptr<bool>();
    if (unit && pair_mean_fast(base, sr, n, d, k, gather ? ip : nullptr, o, fl)) return;
    const A denom = static_cast<A>(m_count);
    at::parallel_for(0, n, pair_mean_grain(d, m_count), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        A* dst = o + i * k;
        A bad = 0;
        for (int64_t m = 0; m < m_count; ++m) {
          const scalar_t* row = base[m] + i * sr[m];
          if (unit) {
_Pragma("omp simd reduction(+:bad)")
            for (int64_t j = 0; j < d; ++j) {
              const A v = static_cast<A>(row[j]);
              bad += v - v;
            }
            if (m == 0) {
              if (gather) {
_Pragma("omp simd")
                for (int64_t c = 0; c < k; ++c) dst[c] = static_cast<A>(row[ip[c]]);
              } else {
_Pragma("omp simd")
                for (int64_t c = 0; c < k; ++c) dst[c] = static_cast<A>(row[c]);
              }
            } else if (gather) {
_Pragma("omp simd")
              for (int64_t c = 0; c < k; ++c) dst[c] += static_cast<A>(row[ip[c]]);
            } else {
_Pragma("omp simd")
              for (int64_t c = 0; c < k; ++c) dst[c] += static_cast<A>(row[c]);
            }
          } else {  // strided columns: read in place
            const int64_t s = sc[m];
            for (int64_t j = 0; j < d; ++j) {
              const A v = static_cast<A>(row[j * s]);
              bad += v - v;
            }
            for (int64_t c = 0; c < k; ++c) {
              const A v = static_cast<A>(row[(gather ? ip[c] : c) * s]);
              dst[c] = m == 0 ? v : dst[c] + v;
            }
          }
        }
        if (m_count > 1) {
_Pragma("omp simd")
          for (int64_t c = 0; c < k; ++c) dst[c] = dst[c] / denom;
        }
        fl[i] = bad == A(0);
      }
    });
  });
  return {out, finite};
}

}  // namespace

TORCH_LIBRARY_IMPL(semcomp, CPU, m) {
  m.impl("pair_mean", &pair_mean_cpu);
}

}  // namespace semcomp
