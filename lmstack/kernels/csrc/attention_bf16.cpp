// Paged decode attention for bf16 and head size 64 on AVX512-BF16: the engine's common case.
//
// The generic kernel (cpu_kernels.cpp) converts each key row to fp32 and reduces one dot
// product per query head across the vector: ~100 cycles per key row and KV head, most of
// them in horizontal sums. Here a key row (64 bf16 = two zmm registers) meets a query row
// in two vdpbf16ps, which leave 16 partial sums; 16 keys' partial sums are then reduced
// together by a transpose-and-add tree (45 shuffles and adds for 16 scores). Products of
// two bf16 values are exact in fp32 and the sums are fp32, as in the generic kernel; only
// the order of the additions differs. Values stay fp32 for the weighted sum, so the
// softmax weights are never rounded to bf16. In the engine (20 sequences of 160-260 tokens,
// bf16) the step's attention took 8.6 ms with the generic kernel and 6.2 ms with this one.
//
// Same layouts and contract as lmstack_paged_decode (cpu_kernels.cpp); the work scratch
// holds group * max_len fp32 scores per thread.

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <omp.h>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

#include "groups.h"

namespace {

constexpr int kDim = 64;
// Rows prefetched ahead of the one being read: a sequence's blocks are scattered through the
// pool, so the hardware prefetcher loses the stream at every block boundary (16 rows).
// 48 rows ahead: ~10% less time per decode step than none, in the engine.
constexpr int64_t kLead = 48;

// out[i] = sum of the 16 lanes of v[i], for i in 0..15.
inline __m512 sum16(const __m512 v[16]) {
    __m512 w[8], x[4], y[2];
    for (int j = 0; j < 8; ++j)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
        w[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]),
                             _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
    for (int j = 0; j < 4; ++j) {  // per 128-bit lane: that lane's sum of 4 vectors
        const __m512d a = _mm512_castps_pd(w[2 * j]), b = _mm512_castps_pd(w[2 * j + 1]);
        x[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int j = 0; j < 2; ++j)  // add 128-bit lanes pairwise
        y[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88),
                         _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
}

// Walks a sequence's rows in order through its block table, without a division per row.
struct Rows {
    const uint16_t* head;
    const int64_t* table;
    int64_t block_size, block = 0, offset = 0;
    const uint16_t* next() {
        const uint16_t* row = head + (table[block] * block_size + offset) * kDim;
        if (++offset == block_size) offset = 0, ++block;
        return row;
    }
};

template <int G>
void task(const uint16_t* q, const uint16_t* khead, const uint16_t* vhead,
          const int64_t* table, int64_t len, int64_t block_size, uint16_t* out, float* scores,
          int64_t max_len, float scale) {
    __m512bh qv[G][2];  // 32 bf16 per register
    for (int g = 0; g < G; ++g)
        for (int h = 0; h < 2; ++h) qv[g][h] = (__m512bh)_mm512_loadu_si512(q + g * kDim + 32 * h);
    __m512 best[G];
    for (int g = 0; g < G; ++g) best[g] = _mm512_set1_ps(-FLT_MAX);
    const __m512 zero = _mm512_setzero_ps(), vscale = _mm512_set1_ps(scale);
    Rows keys{khead, table, block_size}, ahead{khead, table, block_size};
    int64_t fetched = 0;  // rows prefetched so far: kLead rows ahead of the reads
    for (int64_t t0 = 0; t0 < len; t0 += 16) {
        for (; fetched < len && fetched < t0 + kLead; ++fetched) {
            const char* row = reinterpret_cast<const char*>(ahead.next());
            __builtin_prefetch(row), __builtin_prefetch(row + 64);
        }
        const int n = len - t0 < 16 ? static_cast<int>(len - t0) : 16;
        const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
        const uint16_t* rows[16];
        for (int r = 0; r < n; ++r) rows[r] = keys.next();
        for (int g = 0; g < G; ++g) {
            __m512 part[16];
            for (int r = 0; r < 16; ++r) {
                if (r >= n) {
                    part[r] = zero;
                    continue;
                }
                const __m512bh lo = (__m512bh)_mm512_loadu_si512(rows[r]);
                const __m512bh hi = (__m512bh)_mm512_loadu_si512(rows[r] + 32);
                part[r] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(zero, lo, qv[g][0]), hi, qv[g][1]);
            }
            const __m512 s = _mm512_mul_ps(sum16(part), vscale);
            _mm512_mask_storeu_ps(scores + g * max_len + t0, valid, s);
            best[g] = _mm512_mask_max_ps(best[g], valid, best[g], s);
        }
    }
    float total[G];
    for (int g = 0; g < G; ++g) {
        float* row = scores + g * max_len;
        const float top = _mm512_reduce_max_ps(best[g]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
            row[t] = expf(row[t] - top);
            sum += row[t];
        }
        total[g] = sum;
    }
    __m512 acc[G][4];
    for (int g = 0; g < G; ++g)
        for (int j = 0; j < 4; ++j) acc[g][j] = zero;
    Rows values{vhead, table, block_size}, vahead{vhead, table, block_size};
    fetched = 0;
    for (int64_t t = 0; t < len; ++t) {
        for (; fetched < len && fetched < t + kLead; ++fetched) {
            const char* row = reinterpret_cast<const char*>(vahead.next());
            __builtin_prefetch(row), __builtin_prefetch(row + 64);
        }
        const uint16_t* v = values.next();
        __m512 vf[4];
        for (int j = 0; j < 4; ++j)
            vf[j] = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                    reinterpret_cast<const __m256i*>(v + 16 * j))),
                16));
        for (int g = 0; g < G; ++g) {
            const __m512 p = _mm512_set1_ps(scores[g * max_len + t]);
            for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_fmadd_ps(p, vf[j], acc[g][j]);
        }
    }
    for (int g = 0; g < G; ++g) {
        const __m512 inv = _mm512_set1_ps(1.f / total[g]);
        for (int j = 0; j < 4; ++j)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * kDim + 16 * j),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][j], inv)));
    }
}

template <int G>
void decode(const uint16_t* q, const uint16_t* pool, const int64_t* tables,
            const int64_t* lengths, uint16_t* out, float* work, int64_t batch, int64_t heads,
            int64_t kv_heads, int64_t num_blocks, int64_t block_size, int64_t width,
            int64_t max_len, int64_t slots, float scale) {
    const int64_t head_stride = num_blocks * block_size * kDim;
    const uint16_t* values = pool + kv_heads * head_stride;
#pragma omp parallel for schedule(dynamic, 1) num_threads(slots)
    for (int64_t i = 0; i < batch * kv_heads; ++i) {
        const int64_t b = i / kv_heads, kvh = i % kv_heads;
        const int64_t first = (b * heads + kvh * G) * kDim;
        task<G>(q + first, pool + kvh * head_stride, values + kvh * head_stride,
                tables + b * width, lengths[b], block_size, out + first,
                work + omp_get_thread_num() * G * max_len, max_len, scale);
    }
}

}  // namespace

// 1 where it ran; 0 where this shape has no fast path (the caller runs the generic one).
int lmstack_paged_decode_bf16_d64(const void* q, const void* pool, const int64_t* tables,
                                  const int64_t* lengths, void* out, float* work, int64_t batch,
                                  int64_t heads, int64_t kv_heads, int64_t num_blocks,
                                  int64_t block_size, int64_t width, int64_t max_len,
                                  int64_t slots, float scale) {
    const auto* qt = static_cast<const uint16_t*>(q);
    const auto* pt = static_cast<const uint16_t*>(pool);
    auto* ot = static_cast<uint16_t*>(out);
    return with_group(heads / kv_heads, [&](auto group) {
        decode<decltype(group)::value>(qt, pt, tables, lengths, ot, work, batch, heads,
                                       kv_heads, num_blocks, block_size, width, max_len, slots,
                                       scale);
    });
}

#else

int lmstack_paged_decode_bf16_d64(const void*, const void*, const int64_t*, const int64_t*,
                                  void*, float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                  int64_t, int64_t, int64_t, float) {
    return 0;
}

#endif
