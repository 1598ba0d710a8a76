// y = x W^T in bf16 for the model's linear layers, on AVX512-BF16 (vdpbf16ps).
//
// Why not oneDNN: a decode step multiplies ~20 rows by every weight of the model once, so
// the weights stream from memory (270 MB for the bundled model, far beyond the L3) and the
// kernel has to compute on one block while the next one arrives. oneDNN's matmul on its
// pre-packed weights reached 235-280 GFLOP/s on this pattern here; this kernel 1.3-1.5x
// that (`lmstack bench kernels`: 1.28x), and the same as oneDNN for prefill-sized inputs.
//
// Layouts:
//   x    [m, k] bf16 rows (row stride ldx), k even
//   w    [ceil(n / 64), k / 2, 64, 2] bf16: blocks of 64 output columns; inside a block, for
//        each pair of input features, the pair's two weights of each of the 64 columns
//        side by side. One pair-row is four zmm registers, exactly what vdpbf16ps wants
//        (it multiplies pairs and adds both products into one fp32 lane). Columns past n
//        are zero. Packed once at load (lmstack/kernels/ops.py, pack_bf16).
//   out  [m, n] bf16 (row stride ldo), rounded to nearest even from fp32 sums.
//
// Work: the rows are cut into tiles of at most 6 (6 rows x 64 columns = 24 fp32
// accumulators, in registers); each thread takes a contiguous run of column blocks and
// runs every row tile over a block while it is hot in L2. While it computes one block it
// prefetches the next into L2, a share of it in every tile's loop, so memory and
// arithmetic overlap. With many row tiles and few blocks (prefill through a narrow layer)
// the rows are also split between threads, so no thread idles.

#include <algorithm>
#include <cstdint>
#include <omp.h>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

namespace {

constexpr int64_t kBlock = 64;  // output columns per packed block
constexpr int kMaxRows = 6;     // rows per register tile

template <int R>
void tile(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t pairs, uint16_t* out,
          int64_t ldo, int64_t cols, const char* next, int64_t next_lines, int64_t lines_per_pair) {
    __m512 acc[R][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
    const int32_t* xr[R];  // a pair of bf16 inputs read as one 32-bit word
    for (int i = 0; i < R; i++) xr[i] = reinterpret_cast<const int32_t*>(x + i * ldx);
    for (int64_t p = 0; p < pairs; p++) {
        for (int64_t l = p * lines_per_pair; l < (p + 1) * lines_per_pair; l++)
            if (l < next_lines) _mm_prefetch(next + l * 64, _MM_HINT_T1);
        const uint16_t* wp = w + p * 2 * kBlock;
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(wp);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(wp + 32);
        const __m512bh b2 = (__m512bh)_mm512_loadu_si512(wp + 64);
        const __m512bh b3 = (__m512bh)_mm512_loadu_si512(wp + 96);
        for (int i = 0; i < R; i++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(xr[i][p]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, b1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], a, b2);
            acc[i][3] = _mm512_dpbf16_ps(acc[i][3], a, b3);
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < 4; j++) {
            const __m256i r = (__m256i)_mm512_cvtneps_pbh(acc[i][j]);
            const int64_t left = cols - j * 16;
            uint16_t* dst = out + i * ldo + j * 16;
            if (left >= 16)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), r);
            else if (left > 0)
                _mm256_mask_storeu_epi16(dst, static_cast<__mmask16>((1u << left) - 1), r);
        }
}

using TileFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, uint16_t*, int64_t,
                        int64_t, const char*, int64_t, int64_t);
constexpr TileFn kTiles[kMaxRows + 1] = {nullptr,  tile<1>, tile<2>, tile<3>,
                                         tile<4>,  tile<5>, tile<6>};

void linear(const uint16_t* x, int64_t m, int64_t k, int64_t ldx, const uint16_t* w, int64_t n,
            uint16_t* out, int64_t ldo, int64_t threads) {
    const int64_t blocks = (n + kBlock - 1) / kBlock, pairs = k / 2;
    const int64_t block_elems = pairs * 2 * kBlock, block_lines = block_elems * 2 / 64;
    // Even tiles: 20 rows are 4 x 5, not 6 + 6 + 6 + 2.
    const int64_t tiles = (m + kMaxRows - 1) / kMaxRows;
    const int64_t base = m / tiles, extra = m % tiles;
    // Split rows between threads too when there are many tiles and the blocks do not
    // divide evenly among the threads.
    const int64_t groups = (tiles >= 4 * threads && blocks % threads) ? threads : 1;
    const int64_t per_group = (tiles + groups - 1) / groups;
    // Next block's cache lines to prefetch per input pair, spread over this block's tiles
    // (none for a single tile: the hardware prefetcher keeps up with one stream).
    const int64_t lines_per_pair = tiles > 1 ? (4 + tiles - 1) / tiles : 0;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < blocks * groups; item++) {
        const int64_t b = item / groups, g = item % groups;
        const uint16_t* wb = w + b * block_elems;
        const char* next = reinterpret_cast<const char*>(wb + block_elems);
        const int64_t cols = std::min(kBlock, n - b * kBlock);
        const int64_t first = g * per_group, last = std::min(tiles, first + per_group);
        int64_t row = first * base + std::min(first, extra);
        for (int64_t t = first; t < last; t++) {
            const int64_t rows = base + (t < extra);
            const int64_t done = (t - first) * pairs * lines_per_pair;
            const int64_t left = (b + 1 < blocks && g == 0) ? block_lines - done : 0;
            kTiles[rows](x + row * ldx, ldx, wb, pairs, out + row * ldo + b * kBlock, ldo, cols,
                         next + done * 64, left, lines_per_pair);
            row += rows;
        }
    }
}

}  // namespace

extern "C" {

int lmstack_linear_bf16_supported() { return 1; }

int lmstack_linear_bf16(const void* x, int64_t m, int64_t k, int64_t ldx, const void* w,
                        int64_t n, void* out, int64_t ldo, int64_t threads) {
    if (m < 1 || n < 1 || k < 2 || k % 2 || ldx < k || ldo < n || threads < 1) return -1;
    linear(static_cast<const uint16_t*>(x), m, k, ldx, static_cast<const uint16_t*>(w), n,
           static_cast<uint16_t*>(out), ldo, threads);
    return 0;
}

}  // extern "C"

#else  // no AVX512-BF16 on this CPU: the model keeps oneDNN's packed weights

extern "C" {
int lmstack_linear_bf16_supported() { return 0; }
int lmstack_linear_bf16(const void*, int64_t, int64_t, int64_t, const void*, int64_t, void*,
                        int64_t, int64_t) {
    return -2;
}
}  // extern "C"

#endif
