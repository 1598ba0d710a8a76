// Causal prefill attention for bf16 and head size 64 on AVX512-BF16, tiled flash-style.
//
// The decode kernel (attention_bf16.cpp) run once per query token reads every visible key
// and value once per query: for a 7,000-token prompt attention took 3x the time of all the
// matmuls. Here one task takes 16 query rows at once (16/G consecutive tokens x the G query
// heads that share a KV head) and walks the keys 16 at a time, so each key and value read
// serves 16 rows:
// - the tile's queries are transposed once, so that a register holds one pair of features
//   of all 16 rows; then a key's pair, broadcast, meets the 16 rows in one vdpbf16ps, and
//   32 of them give that key's 16 scores, with no horizontal sums;
// - softmax is online (running max and sum per row, the output rescaled when the max
//   grows), all of it across the 16 rows in one register;
// - the weighted sum of values is the same instruction: the 16 rows' weights of two keys,
//   rounded to bf16, against the two keys' values of one feature, broadcast. Softmax
//   weights are rounded to bf16 for that product, as torch's CPU flash attention does for
//   bf16; the scores, the softmax and every sum stay fp32.
// The output accumulator (64 features x 16 rows, fp32) stays in L1. Products of bf16 values
// are exact in fp32 and sums are fp32, as in the other kernels.
//
// Layouts: q [tokens, heads, 64] (positions start..start+tokens-1), pool [2, kv_heads,
// num_blocks, block_size, 64] with this chunk's keys and values already written, table:
// the sequence's block ids; query i sees keys 0..start+i.

#include <cstdint>
#include <cstring>
#include <omp.h>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

#include "exp2_poly.h"
#include "groups.h"

namespace {

constexpr int kDim = 64, kPairs = 32, kRows = 16, kKeys = 16;
constexpr float kFloor = -1e30f;  // "no key yet" (finite: the build uses -ffast-math)

// 2^x for x <= 0 (scores minus their running max, in base 2); 0 below -126: 2^n times a
// degree-5 Taylor polynomial of 2^f on |f| <= 1/2 (relative error ~3e-6, far below the
// bf16 rounding the weights then get).
inline __m512 exp2_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(kExp2Poly[0]);
    for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
    return _mm512_scalef_ps(p, n);
}

inline const uint16_t* row_of(const uint16_t* head, const int64_t* table, int64_t block_size,
                              int64_t t) {
    return head + (table[t / block_size] * block_size + t % block_size) * kDim;
}

// One tile: query rows lane = token * G + g (lanes past the tile's tokens are idle).
template <int G>
void tile(const uint16_t* q, const uint16_t* khead, const uint16_t* vhead,
          const int64_t* table, int64_t block_size, int64_t start, int64_t first,
          int64_t tokens, int64_t heads, int64_t kvh, uint16_t* out, float scale) {
    constexpr int kTokens = kRows / G;
    alignas(64) uint32_t qt[kPairs][kRows];      // transposed queries: [pair][row]
    alignas(64) uint16_t keys[kKeys][kDim];      // this block of keys, contiguous
    alignas(64) uint32_t vpairs[kKeys / 2][kDim];  // values of keys 2j, 2j+1 per feature
    alignas(64) float acc[kDim][kRows];          // output, transposed: [feature][row]
    alignas(64) int32_t limit[kRows];            // keys visible to each row (0: idle lane)
    std::memset(qt, 0, sizeof qt);
    std::memset(acc, 0, sizeof acc);
    int64_t visible = 0;  // keys the tile's last row sees
    for (int lane = 0; lane < kRows; ++lane) {
        const int64_t token = first + lane / G;
        limit[lane] = 0;
        if (lane >= kTokens * G || token >= tokens) continue;
        const uint32_t* src = reinterpret_cast<const uint32_t*>(
            q + (token * heads + kvh * G + lane % G) * kDim);
        for (int p = 0; p < kPairs; ++p) qt[p][lane] = src[p];
        limit[lane] = static_cast<int32_t>(start + token + 1);
        visible = start + token + 1;
    }
    alignas(64) static const uint16_t zeros[kDim] = {};
    alignas(64) uint16_t lo_idx[32], hi_idx[32];  // (x0, y0, x1, y1, ...) from x, y
    for (int m = 0; m < 16; ++m) {
        lo_idx[2 * m] = m, lo_idx[2 * m + 1] = 32 + m;
        hi_idx[2 * m] = 16 + m, hi_idx[2 * m + 1] = 48 + m;
    }
    const __m512i lo_pairs = _mm512_load_si512(lo_idx), hi_pairs = _mm512_load_si512(hi_idx);
    const __m512i limits = _mm512_load_si512(limit);
    const int32_t fewest = static_cast<int32_t>(start + first + 1);  // lane 0's limit
    __m512 best = _mm512_set1_ps(kFloor), total = _mm512_setzero_ps();
    const __m512 vscale = _mm512_set1_ps(scale * 1.44269504f);  // scores in base 2
    for (int64_t t0 = 0; t0 < visible; t0 += kKeys) {
        const int n = visible - t0 < kKeys ? static_cast<int>(visible - t0) : kKeys;
        for (int k = 0; k < kKeys; ++k) {
            if (k < n) {
                const uint16_t* kr = row_of(khead, table, block_size, t0 + k);
                _mm512_store_si512(keys[k], _mm512_loadu_si512(kr));
                _mm512_store_si512(keys[k] + 32, _mm512_loadu_si512(kr + 32));
            } else {
                std::memset(keys[k], 0, sizeof keys[k]);
            }
        }
        for (int j = 0; j < kKeys / 2; ++j) {  // interleave two keys' values feature by feature
            const int k = 2 * j;
            const uint16_t* a = k < n ? row_of(vhead, table, block_size, t0 + k) : zeros;
            const uint16_t* b = k + 1 < n ? row_of(vhead, table, block_size, t0 + k + 1) : zeros;
            for (int h = 0; h < 2; ++h) {
                const __m512i x = _mm512_loadu_si512(a + 32 * h), y = _mm512_loadu_si512(b + 32 * h);
                _mm512_store_si512(vpairs[j] + 32 * h, _mm512_permutex2var_epi16(x, lo_pairs, y));
                _mm512_store_si512(vpairs[j] + 32 * h + 16,
                                   _mm512_permutex2var_epi16(x, hi_pairs, y));
            }
        }
        // Scores: s[k] lane r = q_r . key_k.
        __m512 s[kKeys];
        for (int k = 0; k < kKeys; ++k) s[k] = _mm512_setzero_ps();
        for (int p = 0; p < kPairs; ++p) {
            const __m512bh a = (__m512bh)_mm512_load_si512(qt[p]);
            for (int k = 0; k < kKeys; ++k) {
                const uint32_t pair = reinterpret_cast<const uint32_t*>(keys[k])[p];
                s[k] = _mm512_dpbf16_ps(s[k], a, (__m512bh)_mm512_set1_epi32(pair));
            }
        }
        // Masks only where some row cannot see all of these keys (the diagonal, the tail).
        const bool masked = t0 + kKeys > fewest;
        __m512 top = best;
        __mmask16 seen[kKeys];
        for (int k = 0; k < kKeys; ++k) {
            seen[k] = masked ? _mm512_cmplt_epi32_mask(_mm512_set1_epi32(
                                                           static_cast<int32_t>(t0 + k)),
                                                       limits)
                             : static_cast<__mmask16>(0xFFFF);
            s[k] = _mm512_mask_mul_ps(_mm512_set1_ps(kFloor), seen[k], s[k], vscale);
            top = _mm512_max_ps(top, s[k]);
        }
        // Old terms' new weight; 1 in every row once the maxima settle (most blocks of a long
        // context), when the output needs no rescaling.
        const bool grew = _mm512_cmp_ps_mask(top, best, _CMP_GT_OQ);
        const __m512 shrink = exp2_neg(_mm512_sub_ps(best, top));
        best = top;
        __m512 sum = _mm512_setzero_ps();
        for (int k = 0; k < kKeys; ++k) {
            s[k] = _mm512_maskz_mov_ps(seen[k], exp2_neg(_mm512_sub_ps(s[k], top)));
            sum = _mm512_add_ps(sum, s[k]);
        }
        total = _mm512_fmadd_ps(total, shrink, sum);
        // Output: acc[d] = acc[d] * shrink + sum_k w[k] * value_k[d], two keys per product.
        __m512bh w[kKeys / 2];
        for (int j = 0; j < kKeys / 2; ++j)
            w[j] = (__m512bh)_mm512_or_si512(
                _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(s[2 * j])),
                _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(s[2 * j + 1])),
                                  16));
        for (int d0 = 0; d0 < kDim; d0 += 8) {
            __m512 o[8];
            for (int i = 0; i < 8; ++i) {
                o[i] = _mm512_load_ps(acc[d0 + i]);
                if (grew) o[i] = _mm512_mul_ps(o[i], shrink);
            }
            for (int j = 0; j < kKeys / 2; ++j)  // weights past n are 0, their values 0
                for (int i = 0; i < 8; ++i)
                    o[i] = _mm512_dpbf16_ps(o[i], w[j], (__m512bh)_mm512_set1_epi32(vpairs[j][d0 + i]));
            for (int i = 0; i < 8; ++i) _mm512_store_ps(acc[d0 + i], o[i]);
        }
    }
    alignas(64) float inv[kRows];
    _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.f), total));
    alignas(64) uint16_t rounded[kDim][kRows];
    for (int d = 0; d < kDim; ++d)
        _mm256_store_si256(reinterpret_cast<__m256i*>(rounded[d]),
                           (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(
                               _mm512_load_ps(acc[d]), _mm512_load_ps(inv))));
    for (int lane = 0; lane < kRows; ++lane) {
        if (!limit[lane]) continue;
        uint16_t* dst = out + ((first + lane / G) * heads + kvh * G + lane % G) * kDim;
        for (int d = 0; d < kDim; ++d) dst[d] = rounded[d][lane];
    }
}

template <int G>
void prefill(const uint16_t* q, const uint16_t* pool, const int64_t* table, int64_t start,
             int64_t tokens, uint16_t* out, int64_t heads, int64_t kv_heads, int64_t num_blocks,
             int64_t block_size, int64_t threads, float scale) {
    constexpr int kTokens = kRows / G;
    const int64_t head_stride = num_blocks * block_size * kDim;
    const uint16_t* values = pool + kv_heads * head_stride;
    const int64_t tiles = (tokens + kTokens - 1) / kTokens;
    // Last tiles first: they see the most keys, so the threads finish together.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < tiles * kv_heads; ++i) {
        const int64_t t = tiles - 1 - i / kv_heads, kvh = i % kv_heads;
        tile<G>(q, pool + kvh * head_stride, values + kvh * head_stride, table, block_size,
                start, t * kTokens, tokens, heads, kvh, out, scale);
    }
}

}  // namespace

extern "C" int lmstack_paged_prefill_bf16(const void* q, const void* pool,
                                          const int64_t* table, int64_t start, int64_t tokens,
                                          void* out, int64_t heads, int64_t kv_heads,
                                          int64_t num_blocks, int64_t block_size, int64_t dim,
                                          int64_t threads, float scale) {
    if (dim != kDim || kv_heads < 1 || heads % kv_heads || threads < 1) return 0;
    const auto* qt = static_cast<const uint16_t*>(q);
    const auto* pt = static_cast<const uint16_t*>(pool);
    auto* ot = static_cast<uint16_t*>(out);
    return with_group(heads / kv_heads, [&](auto group) {
        prefill<decltype(group)::value>(qt, pt, table, start, tokens, ot, heads, kv_heads,
                                        num_blocks, block_size, threads, scale);
    });
}

#else

extern "C" int lmstack_paged_prefill_bf16(const void*, const void*, const int64_t*, int64_t,
                                          int64_t, void*, int64_t, int64_t, int64_t, int64_t,
                                          int64_t, int64_t, float) {
    return 0;
}

#endif
