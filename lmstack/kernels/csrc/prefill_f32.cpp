// Causal prefill attention in fp32 on AVX2 + FMA, tiled flash-style over the paged KV cache.
//
// The fp32 counterpart of prefill_bf16.cpp, for CPUs without native bf16 (where the engine
// runs fp32 activations and an fp32 KV cache). Without it a prefill chunk gathered its
// sequence's blocks into a contiguous copy for torch's flash attention, or (per query, in
// place) read every key once per query row. Here one task takes 8 or 16 query rows (8/G or
// 16/G tokens x the G query heads sharing a KV head), one ymm lane each, and walks the keys
// 8 or 4 at a time:
// - scores: the tile's queries are transposed once ([feature][row]); a key's feature,
//   broadcast, meets 8 rows in one FMA, so each key read serves 8 or 16 rows;
// - softmax is online (running max and sum per row, the output rescaled when a max grows);
// - the weighted sum of values is the same FMA: 8 rows' weights of one key against that
//   key's value feature, broadcast. The output accumulator [feature][row] stays in L1.
// Everything is fp32.
//
// Layouts: q [tokens, heads, dim] (positions start..start+tokens-1), pool [2, kv_heads,
// num_blocks, block_size, dim] with this chunk's keys and values already written, table:
// the sequence's block ids; query i sees keys 0..start+i. Returns 1 when it ran, 0 for
// shapes it does not take (the caller keeps its other path).

#include <cstdint>
#include <cstring>
#include <omp.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "exp2_poly.h"

namespace {

constexpr int kRows = 8, kKeys = 8, kMaxDim = 128;
constexpr float kFloor = -1e30f;  // "no key yet" (finite: the build uses -ffast-math)

// 2^x for x <= 0: 2^n (built in the exponent bits) times a degree-5 polynomial of 2^f on
// |f| <= 1/2 (relative error ~3e-6); 0 below -126.
inline __m256 exp2_neg(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(kExp2Poly[0]);
    for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                            _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

inline const float* row_of(const float* head, const int64_t* table, int64_t block_size,
                           int64_t dim, int64_t t) {
    return head + (table[t / block_size] * block_size + t % block_size) * dim;
}

// One tile of 8 * H query rows: lane = token * group + g (lanes past the tile's tokens are
// idle), H ymm registers per row set, 8 / H keys per pass (so the 8 * H / H score
// accumulators and the H query vectors stay in the 16 registers). H = 2 makes each key and
// value read serve 16 rows: twice the reuse, for chunks long enough to fill the lanes.
template <int H>
void tile(const float* q, const float* khead, const float* vhead, const int64_t* table,
          int64_t block_size, int64_t dim, int64_t group, int64_t start, int64_t first,
          int64_t tokens, int64_t heads, int64_t kvh, float* out, float scale) {
    constexpr int kLanes = 8 * H, kStep = kKeys / H;
    const int64_t tile_tokens = kLanes / group;
    alignas(32) float qt[kMaxDim][kLanes];   // transposed, pre-scaled to base-2 scores
    alignas(32) float acc[kMaxDim][kLanes];  // output, transposed
    alignas(32) int32_t limit[kLanes];       // keys visible to each row (0: idle lane)
    std::memset(qt, 0, sizeof qt);
    std::memset(acc, 0, sizeof acc);
    const float s2 = scale * 1.44269504f;
    int64_t visible = 0;
    for (int lane = 0; lane < kLanes; ++lane) {
        const int64_t token = first + lane / group;
        limit[lane] = 0;
        if (lane >= tile_tokens * group || token >= tokens) continue;
        const float* src = q + (token * heads + kvh * group + lane % group) * dim;
        for (int64_t d = 0; d < dim; ++d) qt[d][lane] = src[d] * s2;
        limit[lane] = static_cast<int32_t>(start + token + 1);
        visible = start + token + 1;
    }
    __m256i limits[H];
    __m256 best[H], total[H];
    for (int h = 0; h < H; ++h) {
        limits[h] = _mm256_load_si256(reinterpret_cast<const __m256i*>(limit + 8 * h));
        best[h] = _mm256_set1_ps(kFloor);
        total[h] = _mm256_setzero_ps();
    }
    const int64_t fewest = start + first + 1;  // lane 0's limit
    const float* keys[kStep];
    const float* values[kStep];
    for (int64_t t0 = 0; t0 < visible; t0 += kStep) {
        const int n = visible - t0 < kStep ? static_cast<int>(visible - t0) : kStep;
        for (int k = 0; k < kStep; ++k) {
            const int64_t t = t0 + (k < n ? k : 0);  // past n: any visible row, masked out
            keys[k] = row_of(khead, table, block_size, dim, t);
            values[k] = row_of(vhead, table, block_size, dim, t);
        }
        __m256 s[kStep][H];
        for (int k = 0; k < kStep; ++k)
            for (int h = 0; h < H; ++h) s[k][h] = _mm256_setzero_ps();
        for (int64_t d = 0; d < dim; ++d) {
            __m256 a[H];
            for (int h = 0; h < H; ++h) a[h] = _mm256_load_ps(qt[d] + 8 * h);
            for (int k = 0; k < kStep; ++k) {
                const __m256 key = _mm256_broadcast_ss(keys[k] + d);
                for (int h = 0; h < H; ++h) s[k][h] = _mm256_fmadd_ps(a[h], key, s[k][h]);
            }
        }
        // Masks only where some row cannot see all of these keys (the diagonal, the tail).
        const bool masked = t0 + kStep > fewest;
        bool grew = false;
        __m256 shrink[H];
        for (int h = 0; h < H; ++h) {
            __m256 top = best[h];
            __m256 seen[kStep];
            for (int k = 0; k < kStep; ++k) {
                const __m256i key = _mm256_set1_epi32(static_cast<int32_t>(t0 + k));
                seen[k] = masked ? _mm256_castsi256_ps(_mm256_cmpgt_epi32(limits[h], key))
                                 : _mm256_castsi256_ps(_mm256_set1_epi32(-1));
                if (k >= n) seen[k] = _mm256_setzero_ps();
                s[k][h] = _mm256_blendv_ps(_mm256_set1_ps(kFloor), s[k][h], seen[k]);
                top = _mm256_max_ps(top, s[k][h]);
            }
            grew |= _mm256_movemask_ps(_mm256_cmp_ps(top, best[h], _CMP_GT_OQ)) != 0;
            shrink[h] = exp2_neg(_mm256_sub_ps(best[h], top));
            best[h] = top;
            __m256 sum = _mm256_setzero_ps();
            for (int k = 0; k < kStep; ++k) {
                s[k][h] = _mm256_and_ps(seen[k], exp2_neg(_mm256_sub_ps(s[k][h], top)));
                sum = _mm256_add_ps(sum, s[k][h]);
            }
            total[h] = _mm256_fmadd_ps(total[h], shrink[h], sum);
        }
        for (int64_t d = 0; d < dim; ++d) {
            __m256 o[H];
            for (int h = 0; h < H; ++h) {
                o[h] = _mm256_load_ps(acc[d] + 8 * h);
                if (grew) o[h] = _mm256_mul_ps(o[h], shrink[h]);
            }
            for (int k = 0; k < kStep; ++k) {
                const __m256 value = _mm256_broadcast_ss(values[k] + d);
                for (int h = 0; h < H; ++h) o[h] = _mm256_fmadd_ps(s[k][h], value, o[h]);
            }
            for (int h = 0; h < H; ++h) _mm256_store_ps(acc[d] + 8 * h, o[h]);
        }
    }
    alignas(32) float inv[kLanes];
    for (int h = 0; h < H; ++h)
        _mm256_store_ps(inv + 8 * h, _mm256_div_ps(_mm256_set1_ps(1.f), total[h]));
    for (int lane = 0; lane < kLanes; ++lane) {
        if (!limit[lane]) continue;
        float* dst = out + ((first + lane / group) * heads + kvh * group + lane % group) * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = acc[d][lane] * inv[lane];
    }
}

template <int H>
void prefill(const float* q, const float* pool, const int64_t* table, int64_t start,
             int64_t tokens, float* out, int64_t heads, int64_t kv_heads, int64_t num_blocks,
             int64_t block_size, int64_t dim, int64_t threads, float scale) {
    const int64_t group = heads / kv_heads;
    const int64_t tile_tokens = 8 * H / group;
    const int64_t head_stride = num_blocks * block_size * dim;
    const float* values = pool + kv_heads * head_stride;
    const int64_t tiles = (tokens + tile_tokens - 1) / tile_tokens;
    // Last tiles first: they see the most keys, so the threads finish together.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < tiles * kv_heads; ++i) {
        const int64_t t = tiles - 1 - i / kv_heads, kvh = i % kv_heads;
        tile<H>(q, pool + kvh * head_stride, values + kvh * head_stride, table, block_size, dim,
                group, start, t * tile_tokens, tokens, heads, kvh, out, scale);
    }
}

}  // namespace

extern "C" int lmstack_prefill_f32_supported() { return 1; }

extern "C" int lmstack_paged_prefill_f32(const float* q, const float* pool,
                                         const int64_t* table, int64_t start, int64_t tokens,
                                         float* out, int64_t heads, int64_t kv_heads,
                                         int64_t num_blocks, int64_t block_size, int64_t dim,
                                         int64_t threads, float scale) {
    if (dim > kMaxDim || dim < 1 || kv_heads < 1 || heads % kv_heads || threads < 1) return 0;
    const int64_t group = heads / kv_heads;
    if (group > kRows) return 0;
    // 16-row tiles once the chunk fills more than 8 lanes (more reuse of each key read)
    if (tokens * group > kRows && group <= kRows)
        prefill<2>(q, pool, table, start, tokens, out, heads, kv_heads, num_blocks, block_size,
                   dim, threads, scale);
    else
        prefill<1>(q, pool, table, start, tokens, out, heads, kv_heads, num_blocks, block_size,
                   dim, threads, scale);
    return 1;
}

#else

extern "C" int lmstack_prefill_f32_supported() { return 0; }

extern "C" int lmstack_paged_prefill_f32(const float*, const float*, const int64_t*, int64_t,
                                         int64_t, float*, int64_t, int64_t, int64_t, int64_t,
                                         int64_t, int64_t, float) {
    return 0;
}

#endif
