// Decode attention straight from the paged KV pool: one query token per sequence.
//
// The torch path gathers every sequence's blocks into a padded copy, then runs three
// batched matmuls with three query rows each (scores, softmax, weights @ V): about 90 MB of
// copying per step for 20 sequences of ~200 tokens, and tiny matmuls. Here each (sequence,
// KV head) task reads its keys and values in place, block by block, in one pass each, and
// keeps everything in fp32: scores, softmax and the weighted sum of values.
//
// Layouts (all contiguous, row-major):
//   q      [batch, heads, dim]                          (T: float or bf16 as uint16)
//   pool   [2 (K, V), kv_heads, num_blocks, block_size, dim]   one layer's pool
//   tables [batch, width]  int64 block ids, row b at tables + b * width (width 0: one row
//          shared by every query, as for the queries of one prefill chunk);
//   lengths [batch] int64 visible tokens
//   out    [batch, heads, dim]
//   work   [slots, group * max_len] fp32 scratch for the scores; the parallel loop runs
//          on at most `slots` threads, so a thread's row always exists
// Query heads h = kvh * group + g share key/value head kvh (grouped-query attention).
// Built by lmstack/kernels/__init__.py with g++ -O3 -march=native -fopenmp; OpenMP comes
// from the libgomp torch has already loaded, so the kernel runs on the caller's team.

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <omp.h>

namespace {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
    uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
// Branch-free (a select, not a jump), so loops over rows vectorise.
inline void store(uint16_t* p, int64_t i, float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    const uint32_t rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;  // nearest, ties even
    // NaN stays NaN (a bit test: -ffast-math drops isnan)
    p[i] = static_cast<uint16_t>((bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

constexpr int kMaxDim = 256;
constexpr int kMaxGroup = 16;

struct Shape {
    int64_t batch, heads, kv_heads, num_blocks, block_size, width, max_len, slots;
    float scale;
};

// A row of `dim` values converted to fp32 in `row`.
template <typename T>
inline void load_row(const T* src, int64_t dim, float* row) {
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) row[d] = load(src, d);
}

// Calls fn(t, row pointer) for the first `len` rows of a sequence's blocks in order, walking
// the block table block by block. Blocks lie scattered in the pool, so the hardware
// prefetcher stops at each block's end; the next block is prefetched while this one is
// computed on (the kernel is bound by memory latency, not arithmetic).
template <typename T, typename Fn>
inline void for_each_row(const T* head, const int64_t* table, int64_t len, const Shape& s,
                         int64_t dim, Fn&& fn) {
    const int64_t block_bytes = s.block_size * dim * static_cast<int64_t>(sizeof(T));
    for (int64_t start = 0, j = 0; start < len; start += s.block_size, ++j) {
        const T* block = head + table[j] * s.block_size * dim;
        if (start + s.block_size < len) {
            const char* next = reinterpret_cast<const char*>(head + table[j + 1] * s.block_size * dim);
            for (int64_t off = 0; off < block_bytes; off += 64) __builtin_prefetch(next + off);
        }
        const int64_t rows = len - start < s.block_size ? len - start : s.block_size;
        for (int64_t r = 0; r < rows; ++r) fn(start + r, block + r * dim);
    }
}

// One (sequence, KV head) task. D and G are compile-time in the common cases (head size 64
// or 128, up to 8 query heads per KV head) so the loops over them unroll and vectorise;
// D = G = 0 is the generic fallback reading them from `dim` and `group`.
template <typename T, int D, int G>
void task(const T* q, const T* keys, const T* values, const int64_t* table, int64_t len,
          T* out, float* scores, int64_t b, int64_t kvh, const Shape& s, int64_t dim_rt,
          int64_t group_rt) {
    const int64_t dim = D ? D : dim_rt;
    const int64_t group = G ? G : group_rt;
    const int64_t head_stride = s.num_blocks * s.block_size * dim;
    alignas(64) float qf[G ? G : kMaxGroup][D ? D : kMaxDim];
    for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d)
            qf[g][d] = load(q, (b * s.heads + kvh * group + g) * dim + d) * s.scale;
    float best[G ? G : kMaxGroup];
    for (int64_t g = 0; g < group; ++g) best[g] = -FLT_MAX;
    for_each_row(keys + kvh * head_stride, table, len, s, dim, [&](int64_t t, const T* src) {
        alignas(64) float kf[D ? D : kMaxDim];
        load_row(src, dim, kf);
        for (int64_t g = 0; g < group; ++g) {
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < dim; ++d) acc += qf[g][d] * kf[d];
            scores[g * s.max_len + t] = acc;
            best[g] = acc > best[g] ? acc : best[g];
        }
    });
    float total[G ? G : kMaxGroup];
    for (int64_t g = 0; g < group; ++g) {
        float* row = scores + g * s.max_len;
        const float top = best[g];
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
            row[t] = expf(row[t] - top);  // vectorised through libmvec (-ffast-math)
            sum += row[t];
        }
        total[g] = sum;
    }
    alignas(64) float acc[G ? G : kMaxGroup][D ? D : kMaxDim] = {};
    for_each_row(values + kvh * head_stride, table, len, s, dim, [&](int64_t t, const T* src) {
        alignas(64) float vf[D ? D : kMaxDim];
        load_row(src, dim, vf);
        for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * s.max_len + t];
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) acc[g][d] += p * vf[d];
        }
    });
    for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.f / total[g];
        for (int64_t d = 0; d < dim; ++d)
            store(out, (b * s.heads + kvh * group + g) * dim + d, acc[g][d] * inv);
    }
}

template <typename T, int D, int G>
void decode(const T* q, const T* pool, const int64_t* tables, const int64_t* lengths, T* out,
            float* work, const Shape& s, int64_t dim, int64_t group) {
    const T* keys = pool;
    const T* values = pool + s.kv_heads * s.num_blocks * s.block_size * dim;
#pragma omp parallel for schedule(dynamic, 1) num_threads(s.slots)
    for (int64_t i = 0; i < s.batch * s.kv_heads; ++i) {
        const int64_t b = i / s.kv_heads, kvh = i % s.kv_heads;
        float* scores = work + omp_get_thread_num() * group * s.max_len;
        task<T, D, G>(q, keys, values, tables + b * s.width, lengths[b], out, scores, b, kvh, s,
                      dim, group);
    }
}

template <typename T, int D>
void by_group(const T* q, const T* pool, const int64_t* tables, const int64_t* lengths, T* out,
              float* work, const Shape& s, int64_t dim, int64_t group) {
    switch (group) {
        case 1: return decode<T, D, 1>(q, pool, tables, lengths, out, work, s, dim, group);
        case 2: return decode<T, D, 2>(q, pool, tables, lengths, out, work, s, dim, group);
        case 3: return decode<T, D, 3>(q, pool, tables, lengths, out, work, s, dim, group);
        case 4: return decode<T, D, 4>(q, pool, tables, lengths, out, work, s, dim, group);
        case 8: return decode<T, D, 8>(q, pool, tables, lengths, out, work, s, dim, group);
        default: return decode<T, 0, 0>(q, pool, tables, lengths, out, work, s, dim, group);
    }
}

template <typename T>
void dispatch(const void* q, const void* pool, const int64_t* tables, const int64_t* lengths,
              void* out, float* work, const Shape& s, int64_t dim) {
    const T* qt = static_cast<const T*>(q);
    const T* pt = static_cast<const T*>(pool);
    T* ot = static_cast<T*>(out);
    const int64_t group = s.heads / s.kv_heads;
    if (dim == 64) return by_group<T, 64>(qt, pt, tables, lengths, ot, work, s, dim, group);
    if (dim == 128) return by_group<T, 128>(qt, pt, tables, lengths, ot, work, s, dim, group);
    decode<T, 0, 0>(qt, pt, tables, lengths, ot, work, s, dim, group);
}

}  // namespace

// attention_bf16.cpp: bf16, head size 64, on AVX512-BF16; 0 where it does not apply.
int lmstack_paged_decode_bf16_d64(const void* q, const void* pool, const int64_t* tables,
                                  const int64_t* lengths, void* out, float* work, int64_t batch,
                                  int64_t heads, int64_t kv_heads, int64_t num_blocks,
                                  int64_t block_size, int64_t width, int64_t max_len,
                                  int64_t slots, float scale);

extern "C" {

// dtype_bytes: 4 (float32) or 2 (bfloat16). Returns 0, or -1 for shapes the kernel's fixed
// buffers cannot hold (the caller checks these first and falls back to torch).
int lmstack_paged_decode(const void* q, const void* pool, const int64_t* tables,
                         const int64_t* lengths, void* out, float* work, int64_t dtype_bytes,
                         int64_t batch, int64_t heads, int64_t kv_heads, int64_t num_blocks,
                         int64_t block_size, int64_t dim, int64_t width, int64_t max_len,
                         int64_t slots, float scale) {
    if (dim > kMaxDim || heads % kv_heads || heads / kv_heads > kMaxGroup || slots < 1)
        return -1;
    if (dtype_bytes == 2 && dim == 64 &&
        lmstack_paged_decode_bf16_d64(q, pool, tables, lengths, out, work, batch, heads,
                                      kv_heads, num_blocks, block_size, width, max_len, slots,
                                      scale))
        return 0;
    const Shape s{batch, heads, kv_heads, num_blocks, block_size, width, max_len, slots, scale};
    if (dtype_bytes == 4)
        dispatch<float>(q, pool, tables, lengths, out, work, s, dim);
    else if (dtype_bytes == 2)
        dispatch<uint16_t>(q, pool, tables, lengths, out, work, s, dim);
    else
        return -1;
    return 0;
}

}  // extern "C"

// ---------------------------------------------------------------------------------------
// Element-wise layers of a decoder block, fused. In a decode step each of these is a chain
// of 4-8 small torch ops (casts, pow, mean, rsqrt, cat, neg...) whose dispatch costs more
// than the arithmetic; here each is one pass over the rows, computed in fp32 and rounded
// once to the model's dtype.

namespace {

// Each kernel runs on the caller's torch thread count (`threads`), never on OpenMP's own
// default: a thread that had not run torch yet would otherwise form a team of every core.
template <typename T>
void rms_norm_rows(T* residual, const T* delta, const T* weight, T* out, int64_t rows,
                   int64_t dim, float eps, int64_t threads) {
#pragma omp parallel for num_threads(threads) if (rows * dim > 65536)
    for (int64_t r = 0; r < rows; ++r) {
        T* x = residual + r * dim;
        float sum = 0.f;
        for (int64_t d = 0; d < dim; ++d) {
            float v = load(x, d);
            if (delta) {  // residual += delta, rounded to T as torch's add would
                store(x, d, v + load(delta + r * dim, d));
                v = load(x, d);
            }
            sum += v * v;
        }
        const float inv = 1.f / std::sqrt(sum / dim + eps);
        for (int64_t d = 0; d < dim; ++d) {
            // normalise in fp32, round to T, then scale by the weight (HF's order)
            T normed;
            store(&normed, 0, load(x, d) * inv);
            store(out + r * dim, d, load(&normed, 0) * load(weight, d));
        }
    }
}

// x [rows, heads, dim] with row stride `stride` elements, rotated in place (rotate-half
// RoPE); cos/sin are fp32 tables [positions, dim] indexed by each row's position.
template <typename T>
void rope_rows(T* x, int64_t rows, int64_t heads, int64_t dim, int64_t stride,
               const int64_t* positions, const float* cos, const float* sin, int64_t threads) {
    const int64_t half = dim / 2;
#pragma omp parallel for num_threads(threads) if (rows * heads * dim > 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const float* c = cos + positions[r] * dim;
        const float* s = sin + positions[r] * dim;
        for (int64_t h = 0; h < heads; ++h) {
            T* v = x + r * stride + h * dim;
            for (int64_t d = 0; d < half; ++d) {
                const float a = load(v, d), b = load(v, d + half);
                store(v, d, a * c[d] - b * s[d]);
                store(v, d + half, b * c[d + half] + a * s[d + half]);
            }
        }
    }
}

// gate_up [rows, 2 * inter] -> out [rows, inter] = silu(gate) * up
template <typename T>
void silu_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t inter, int64_t threads) {
#pragma omp parallel for num_threads(threads) if (rows * inter > 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const T* g = gate_up + r * 2 * inter;
        const T* u = g + inter;
#pragma omp simd
        for (int64_t d = 0; d < inter; ++d) {
            const float a = load(g, d);
            store(out + r * inter, d, a / (1.f + expf(-a)) * load(u, d));
        }
    }
}

}  // namespace

extern "C" {

// delta may be null (plain RMSNorm of `residual`, which is then only read).
int lmstack_rms_norm(void* residual, const void* delta, const void* weight, void* out,
                     int64_t dtype_bytes, int64_t rows, int64_t dim, int64_t threads, float eps) {
    if (threads < 1) return -1;
    if (dtype_bytes == 4)
        rms_norm_rows(static_cast<float*>(residual), static_cast<const float*>(delta),
                      static_cast<const float*>(weight), static_cast<float*>(out), rows, dim, eps,
                      threads);
    else if (dtype_bytes == 2)
        rms_norm_rows(static_cast<uint16_t*>(residual), static_cast<const uint16_t*>(delta),
                      static_cast<const uint16_t*>(weight), static_cast<uint16_t*>(out), rows,
                      dim, eps, threads);
    else
        return -1;
    return 0;
}

int lmstack_rope(void* x, int64_t dtype_bytes, int64_t rows, int64_t heads, int64_t dim,
                 int64_t stride, int64_t threads, const int64_t* positions, const float* cos,
                 const float* sin) {
    if (dim % 2 || threads < 1) return -1;
    if (dtype_bytes == 4)
        rope_rows(static_cast<float*>(x), rows, heads, dim, stride, positions, cos, sin, threads);
    else if (dtype_bytes == 2)
        rope_rows(static_cast<uint16_t*>(x), rows, heads, dim, stride, positions, cos, sin,
                  threads);
    else
        return -1;
    return 0;
}

int lmstack_silu_mul(const void* gate_up, void* out, int64_t dtype_bytes, int64_t rows,
                     int64_t inter, int64_t threads) {
    if (threads < 1) return -1;
    if (dtype_bytes == 4)
        silu_mul_rows(static_cast<const float*>(gate_up), static_cast<float*>(out), rows, inter,
                      threads);
    else if (dtype_bytes == 2)
        silu_mul_rows(static_cast<const uint16_t*>(gate_up), static_cast<uint16_t*>(out), rows,
                      inter, threads);
    else
        return -1;
    return 0;
}

}  // extern "C"
