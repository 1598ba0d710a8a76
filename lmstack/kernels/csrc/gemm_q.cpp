// y = x W^T for block-quantized weights (GGUF's Q4_1/Q4_0 and Q8_0), on AVX2 + FMA + F16C.
//
// Why: on CPUs without native bf16 the model's fp32 weights (540 MB for the bundled model)
// stream from memory at every decode step, and fp32 FMAs bound batched steps. Here the
// weights stay in their 4- or 8-bit blocks (92 MB for the bundled GGUF: a sixth of the
// bytes) and are multiplied as integers: the activations are quantized to int8 per block of
// 32 (one scale and the sum of the block's quantized inputs, as llama.cpp's Q8_1), and vpmaddubsw
// multiplies 32 weight bytes by 32 activation bytes per instruction. Nothing is ever
// dequantized to memory: the nibbles are unpacked in registers and the block scales applied
// to each block's integer sum.
//
// Weight value of column c, input k (block b = k / 32):
//   Q4 (Q4_1; Q4_0 is Q4_1 with m = -8 d):  w = d[c][b] * q + m[c][b],  q in 0..15
//   Q8 (Q8_0):                              w = d[c][b] * q,            q in -127..127
// so a block's contribution to y[c] is  d * dx * sum(q * xq)  (+ m * sum(x) for Q4).
//
// Packed layout (lmstack/kernels/ops.py pack_q4 / pack_q8): output columns in groups of 8
// (one ymm of int32 or fp32 lanes), columns past n zero. For group g and block b one tile,
// tiles of a group contiguous over b (a thread streams its groups front to back):
//   Q4 tile (160 bytes): 4 x 32 quant bytes, then d[8] and m[8] as fp16. In vector p, byte
//      4c + i holds q[c][8p + i] in its low nibble and q[c][8p + 4 + i] in its high one:
//      after unpacking, a vector pairs four consecutive inputs of each of the 8 columns
//      with one broadcast 32-bit word of activations.
//   Q8 tile (272 bytes): 8 x 32 bytes, byte 4c + i of vector s is q[c][4s + i]; then d[8].
//
// Integer sums cannot overflow: for Q4 a 16-bit lane collects 16 products of at most
// 15 * 127 over a block (30,480 < 32,767); for Q8 every pair (at most 2 * 128 * 127) is
// widened to 32 bits at once.
//
// Work: threads split the column groups; each runs all row tiles (up to 4 rows, whose
// accumulators live in registers) over a group while its weights are hot in L1.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

// AVX512-VNNI (with VL, on 256-bit vectors): vpdpbusd multiplies four unsigned weight bytes
// by four signed activation bytes and adds them into a 32-bit lane in one instruction, where
// AVX2 needs vpmaddubsw, then vpmaddwd (or 16-bit adds) to widen. Same tiles, same results
// (the integer sums are exact either way). LMSTACK_CPU_ISA=avx2 builds without it.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LMSTACK_VNNI 1
#else
#define LMSTACK_VNNI 0
#endif

namespace {

constexpr int64_t kCols = 8;
constexpr int kMaxRows = 4;
constexpr int64_t kQ4Tile = 160, kQ8Tile = 272;

inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// x [rows, k] fp32 -> q [rows, k] int8, d and s [rows, k / 32]: the block's scale (max|x| /
// 127) and the sum of its 32 quantized inputs (d times the sum of q).
void quantize_rows(const float* x, int64_t rows, int64_t k, int64_t ldx, int8_t* q, float* d,
                   float* s, int64_t threads) {
    const int64_t kb = k / 32;
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
#pragma omp parallel for num_threads(threads) if (rows * k > 65536)
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t b = 0; b < kb; ++b) {
            const float* src = x + r * ldx + b * 32;
            __m256 v[4], amax = _mm256_setzero_ps();
            for (int i = 0; i < 4; ++i) {
                v[i] = _mm256_loadu_ps(src + 8 * i);
                amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], abs_mask));
            }
            const float top = hmax(amax);
            const float scale = top / 127.f;
            d[r * kb + b] = scale;
            const __m256 inv = _mm256_set1_ps(top > 0.f ? 127.f / top : 0.f);
            __m256i n[4];
            for (int i = 0; i < 4; ++i) n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
            // The sum of the quantized inputs, not of x: then a Q4_1 block's two terms add
            // up to sum(w * xq), and its error is that of Q8_0's (sum of w times x's
            // rounding), not of (w - m) times it.
            const __m256i total = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]),
                                                   _mm256_add_epi32(n[2], n[3]));
            s[r * kb + b] = hsum(_mm256_cvtepi32_ps(total)) * scale;
            // packs interleave the 128-bit lanes; the permute puts the 4-byte groups back
            const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]),
                                                     _mm256_packs_epi32(n[2], n[3]));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + r * k + b * 32),
                                _mm256_permutevar8x32_epi32(bytes, order));
        }
    }
}

inline __m256i broadcast4(const int8_t* p) {
    int32_t word;
    std::memcpy(&word, p, 4);
    return _mm256_set1_epi32(word);
}

inline void store_cols(float* out, __m256 v, int64_t cols) {
    if (cols == kCols) {
        _mm256_storeu_ps(out, v);
        return;
    }
    alignas(32) float tmp[kCols];
    _mm256_store_ps(tmp, v);
    for (int64_t c = 0; c < cols; ++c) out[c] = tmp[c];
}

struct Acts {
    const int8_t* q;  // [rows, k]
    const float* d;   // [rows, kb]
    const float* s;   // [rows, kb]
    int64_t k, kb;
};

template <int R>
void q4_tile(const uint8_t* w, const Acts& a, int64_t row, float* out, int64_t ldo,
             int64_t cols) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a.kb; ++b) {
        const uint8_t* t = w + b * kQ4Tile;
        __m256i sum[R];
        for (int r = 0; r < R; ++r) sum[r] = _mm256_setzero_si256();
        // Not unrolled: interleaving the four vectors' unpacking spills the 16 ymm registers.
#pragma GCC unroll 1
        for (int p = 0; p < 4; ++p) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32 * p));
            const __m256i lo = _mm256_and_si256(v, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            for (int r = 0; r < R; ++r) {
                const int8_t* xb = a.q + (row + r) * a.k + b * 32 + 8 * p;
                sum[r] = _mm256_add_epi16(sum[r], _mm256_maddubs_epi16(lo, broadcast4(xb)));
                sum[r] = _mm256_add_epi16(sum[r], _mm256_maddubs_epi16(hi, broadcast4(xb + 4)));
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 128)));
        const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 144)));
        for (int r = 0; r < R; ++r) {
            const int64_t i = (row + r) * a.kb + b;
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum[r], ones));
            acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, _mm256_set1_ps(a.d[i])), acc[r]);
            acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s[i]), acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) store_cols(out + (row + r) * ldo, acc[r], cols);
}

template <int R>
void q8_tile(const uint8_t* w, const Acts& a, int64_t row, float* out, int64_t ldo,
             int64_t cols) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a.kb; ++b) {
        const uint8_t* t = w + b * kQ8Tile;
        __m256i sum[R];
        for (int r = 0; r < R; ++r) sum[r] = _mm256_setzero_si256();
#pragma GCC unroll 1
        for (int s = 0; s < 8; ++s) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32 * s));
            const __m256i mag = _mm256_abs_epi8(v);  // |w| as unsigned; w's sign moves to x
            for (int r = 0; r < R; ++r) {
                const __m256i x = broadcast4(a.q + (row + r) * a.k + b * 32 + 4 * s);
                const __m256i pairs = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(x, v));
                sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(pairs, ones));
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 256)));
        for (int r = 0; r < R; ++r) {
            const __m256 dot = _mm256_cvtepi32_ps(sum[r]);
            const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(a.d[(row + r) * a.kb + b]));
            acc[r] = _mm256_fmadd_ps(dot, scale, acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) store_cols(out + (row + r) * ldo, acc[r], cols);
}

#if LMSTACK_VNNI
// The same tiles with vpdpbusd. Each vpdpbusd depends on the last one into its accumulator
// (a few cycles of latency where vpmaddubsw's 16-bit adds take one), so a row's products go
// into kChains independent accumulators, summed once per block: a single row (decode at batch
// 1) would otherwise wait on one chain. AVX-512VL gives 32 ymm registers, so the unpacking is
// unrolled.
template <int R>
void q4_tile_vnni(const uint8_t* w, const Acts& a, int64_t row, float* out, int64_t ldo,
                  int64_t cols) {
    constexpr int kChains = R == 1 ? 4 : 2;
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a.kb; ++b) {
        const uint8_t* t = w + b * kQ4Tile;
        __m256i sum[R][kChains];
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < kChains; ++c) sum[r][c] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int p = 0; p < 4; ++p) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32 * p));
            const __m256i lo = _mm256_and_si256(v, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            const int c = (2 * p) % kChains;
            for (int r = 0; r < R; ++r) {
                const int8_t* xb = a.q + (row + r) * a.k + b * 32 + 8 * p;
                sum[r][c] = _mm256_dpbusd_epi32(sum[r][c], lo, broadcast4(xb));
                sum[r][c + 1] = _mm256_dpbusd_epi32(sum[r][c + 1], hi, broadcast4(xb + 4));
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 128)));
        const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 144)));
        for (int r = 0; r < R; ++r) {
            __m256i total = sum[r][0];
            for (int c = 1; c < kChains; ++c) total = _mm256_add_epi32(total, sum[r][c]);
            const int64_t i = (row + r) * a.kb + b;
            const __m256 dot = _mm256_cvtepi32_ps(total);
            acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, _mm256_set1_ps(a.d[i])), acc[r]);
            acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s[i]), acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) store_cols(out + (row + r) * ldo, acc[r], cols);
}

template <int R>
void q8_tile_vnni(const uint8_t* w, const Acts& a, int64_t row, float* out, int64_t ldo,
                  int64_t cols) {
    constexpr int kChains = R == 1 ? 4 : 2;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a.kb; ++b) {
        const uint8_t* t = w + b * kQ8Tile;
        __m256i sum[R][kChains];
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < kChains; ++c) sum[r][c] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int s = 0; s < 8; ++s) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32 * s));
            const __m256i mag = _mm256_abs_epi8(v);  // |w| as unsigned; w's sign moves to x
            const int c = s % kChains;
            for (int r = 0; r < R; ++r) {
                const __m256i x = broadcast4(a.q + (row + r) * a.k + b * 32 + 4 * s);
                sum[r][c] = _mm256_dpbusd_epi32(sum[r][c], mag, _mm256_sign_epi8(x, v));
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 256)));
        for (int r = 0; r < R; ++r) {
            __m256i total = sum[r][0];
            for (int c = 1; c < kChains; ++c) total = _mm256_add_epi32(total, sum[r][c]);
            const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(a.d[(row + r) * a.kb + b]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), scale, acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) store_cols(out + (row + r) * ldo, acc[r], cols);
}
#define Q4_TILE q4_tile_vnni
#define Q8_TILE q8_tile_vnni
#else
#define Q4_TILE q4_tile
#define Q8_TILE q8_tile
#endif

template <bool Q4>
void run_group(const uint8_t* w, const Acts& a, int64_t rows, float* out, int64_t ldo,
               int64_t cols) {
    int64_t row = 0;
    for (; row + kMaxRows <= rows; row += kMaxRows)
        Q4 ? Q4_TILE<kMaxRows>(w, a, row, out, ldo, cols) : Q8_TILE<kMaxRows>(w, a, row, out, ldo, cols);
    switch (rows - row) {
        case 3: return Q4 ? Q4_TILE<3>(w, a, row, out, ldo, cols) : Q8_TILE<3>(w, a, row, out, ldo, cols);
        case 2: return Q4 ? Q4_TILE<2>(w, a, row, out, ldo, cols) : Q8_TILE<2>(w, a, row, out, ldo, cols);
        case 1: return Q4 ? Q4_TILE<1>(w, a, row, out, ldo, cols) : Q8_TILE<1>(w, a, row, out, ldo, cols);
        default: return;
    }
}

}  // namespace

extern "C" {

int lmstack_linear_q_supported() { return LMSTACK_VNNI ? 2 : 1; }  // 2: the VNNI path

// format: 4 (Q4 tiles) or 8 (Q8 tiles). x [m, k] fp32 (row stride ldx), k a multiple of 32;
// out [m, n] fp32 (row stride ldo). Returns 0, or -1 for arguments it cannot take.
int lmstack_linear_q(const float* x, int64_t m, int64_t k, int64_t ldx, const uint8_t* w,
                     int64_t n, int64_t format, float* out, int64_t ldo, int64_t threads) {
    if (k % 32 || m < 0 || n < 1 || threads < 1 || (format != 4 && format != 8)) return -1;
    if (m == 0) return 0;
    const int64_t kb = k / 32;
    // Per calling thread, reused across calls (the engine calls from one thread).
    thread_local std::vector<int8_t> xq;
    thread_local std::vector<float> xds;
    xq.resize(static_cast<size_t>(m * k));
    xds.resize(static_cast<size_t>(2 * m * kb));
    quantize_rows(x, m, k, ldx, xq.data(), xds.data(), xds.data() + m * kb, threads);
    const Acts a{xq.data(), xds.data(), xds.data() + m * kb, k, kb};
    const int64_t groups = (n + kCols - 1) / kCols;
    const int64_t group_bytes = kb * (format == 4 ? kQ4Tile : kQ8Tile);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
        const int64_t cols = n - g * kCols < kCols ? n - g * kCols : kCols;
        const uint8_t* wg = w + g * group_bytes;
        if (format == 4)
            run_group<true>(wg, a, m, out + g * kCols, ldo, cols);
        else
            run_group<false>(wg, a, m, out + g * kCols, ldo, cols);
    }
    return 0;
}

}  // extern "C"

#else  // no AVX2/FMA/F16C at build time: the callers keep their torch path

extern "C" {
int lmstack_linear_q_supported() { return 0; }
int lmstack_linear_q(const float*, int64_t, int64_t, int64_t, const uint8_t*, int64_t, int64_t,
                     float*, int64_t, int64_t) {
    return -1;
}
}

#endif
