// Every decoder layer of an engine step in one call, for block-quantized models (fp32
// activations, Q4/Q8 linear layers: gemm_q.cpp): decode tokens attend through the paged
// decode kernel, prefill chunks through the tiled fp32 prefill kernel (prefill_f32.cpp).
//
// Why: a decode step of the bundled model is 30 layers x ~10 kernel calls. Each is quick in
// C (the o_proj of one token reads 0.2 MB), but reaching it from Python through torch and
// ctypes costs 15-25 us, so a single stream spent more time between kernels than in them
// (14 ms a step, of which ~6 ms in the linear kernel). Here one call runs the layers with
// the same kernels (the exported functions of cpu_kernels.cpp and gemm_q.cpp, in the same
// order, so results equal the per-layer path's), and Python only embeds the tokens before
// and applies the LM head after.
//
// Per layer:  h = norm(x); qkv = h Wqkv; rope(q, k); store k, v in their slots;
//             a = paged attention(q); x += a Wo; h = norm(x); x += silu_mul(h Wgu) Wdown
// with each residual add fused into the next norm, as LlamaModel._forward_fused does.
// Layouts: x [rows, hidden] (the embeddings; becomes the residual stream), pool [layers, 2,
// kv_heads, num_blocks, block_size, dim] fp32, slots/positions [rows]; the decode rows
// (`decode_rows`, or rows 0.. in order when there is no chunk) with their block tables
// [decodes, width] (row stride `width`) and lengths [decodes]; prefill chunks as
// (first row, tokens, position of the first, address of its block table) quadruples;
// out [rows, hidden] = the final norm.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" {
int lmstack_linear_q(const float* x, int64_t m, int64_t k, int64_t ldx, const uint8_t* w,
                     int64_t n, int64_t format, float* out, int64_t ldo, int64_t threads);
int lmstack_rms_norm(void* residual, const void* delta, const void* weight, void* out,
                     int64_t dtype_bytes, int64_t rows, int64_t dim, int64_t threads, float eps);
int lmstack_rope(void* x, int64_t dtype_bytes, int64_t rows, int64_t heads, int64_t dim,
                 int64_t stride, int64_t threads, const int64_t* positions, const float* cos,
                 const float* sin);
int lmstack_silu_mul(const void* gate_up, void* out, int64_t dtype_bytes, int64_t rows,
                     int64_t inter, int64_t threads);
int lmstack_paged_decode(const void* q, const void* pool, const int64_t* tables,
                         const int64_t* lengths, void* out, float* work, int64_t dtype_bytes,
                         int64_t batch, int64_t heads, int64_t kv_heads, int64_t num_blocks,
                         int64_t block_size, int64_t dim, int64_t width, int64_t max_len,
                         int64_t slots, float scale);
int lmstack_paged_prefill_f32(const float* q, const float* pool, const int64_t* table,
                              int64_t start, int64_t tokens, float* out, int64_t heads,
                              int64_t kv_heads, int64_t num_blocks, int64_t block_size,
                              int64_t dim, int64_t threads, float scale);

// shape: rows, layers, hidden, heads, kv_heads, dim, inter, num_blocks, block_size, width,
//        threads, decodes, chunks (13 values)
// linears: per layer 4 (pointer, format) pairs: qkv, o, gate_up, down (8 values a layer)
// norms: per layer (input, post-attention) weight pointers, then the final norm's
// Returns 0, or the first non-zero code of a kernel it called.
int lmstack_layer_stack(float* x, const int64_t* shape, float eps, const int64_t* linears,
                         const int64_t* norms, float* pool, const int64_t* slots,
                         const int64_t* tables, const int64_t* lengths,
                         const int64_t* positions, const float* cos, const float* sin,
                         const int64_t* decode_rows, const int64_t* chunks, float* out) {
    const int64_t rows = shape[0], layers = shape[1], hidden = shape[2], heads = shape[3];
    const int64_t kv_heads = shape[4], dim = shape[5], inter = shape[6];
    const int64_t num_blocks = shape[7], block_size = shape[8], width = shape[9];
    const int64_t threads = shape[10], decodes = shape[11], num_chunks = shape[12];
    if (rows < 1 || layers < 1 || kv_heads < 1 || heads % kv_heads || threads < 1) return -1;
    const bool in_order = num_chunks == 0;  // decode rows are rows 0.., as the table rows
    const int64_t qkv_width = (heads + 2 * kv_heads) * dim;
    const int64_t head_elems = num_blocks * block_size * dim;  // one KV head of one layer
    const int64_t layer_elems = 2 * kv_heads * head_elems;
    int64_t max_len = 0;
    for (int64_t r = 0; r < decodes; ++r) max_len = lengths[r] > max_len ? lengths[r] : max_len;

    thread_local std::vector<float> h, qkv, q, attn, gate_up, act, delta, work, qd, ad;
    h.resize(rows * hidden);
    qkv.resize(rows * qkv_width);
    q.resize(rows * heads * dim);
    attn.resize(rows * heads * dim);
    gate_up.resize(rows * 2 * inter);
    act.resize(rows * inter);
    delta.resize(rows * hidden);
    work.resize(threads * (heads / kv_heads) * (max_len > 0 ? max_len : 1));
    qd.resize(in_order ? 0 : decodes * heads * dim);
    ad.resize(in_order ? 0 : decodes * heads * dim);
    const int64_t q_row = heads * dim;
    const auto weight = [&](int64_t l, int i) {
        return reinterpret_cast<const uint8_t*>(linears[8 * l + 2 * i]);
    };
    const auto format = [&](int64_t l, int i) { return linears[8 * l + 2 * i + 1]; };
    const auto norm = [&](int64_t i) { return reinterpret_cast<const void*>(norms[i]); };
    const float scale = 1.f / std::sqrt(static_cast<float>(dim));
    int code = lmstack_rms_norm(x, nullptr, norm(0), h.data(), 4, rows, hidden, threads, eps);
    for (int64_t l = 0; l < layers && code == 0; ++l) {
        code |= lmstack_linear_q(h.data(), rows, hidden, hidden, weight(l, 0), qkv_width,
                                 format(l, 0), qkv.data(), qkv_width, threads);
        code |= lmstack_rope(qkv.data(), 4, rows, heads + kv_heads, dim, qkv_width, threads,
                             positions, cos, sin);
        float* layer_pool = pool + l * layer_elems;
        for (int64_t r = 0; r < rows; ++r) {
            const float* row = qkv.data() + r * qkv_width;
            std::memcpy(q.data() + r * heads * dim, row, heads * dim * sizeof(float));
            for (int64_t g = 0; g < kv_heads; ++g) {
                float* k_dst = layer_pool + g * head_elems + slots[r] * dim;
                float* v_dst = k_dst + kv_heads * head_elems;
                std::memcpy(k_dst, row + (heads + g) * dim, dim * sizeof(float));
                std::memcpy(v_dst, row + (heads + kv_heads + g) * dim, dim * sizeof(float));
            }
        }
        if (decodes && in_order) {
            code |= lmstack_paged_decode(q.data(), layer_pool, tables, lengths, attn.data(),
                                         work.data(), 4, decodes, heads, kv_heads, num_blocks,
                                         block_size, dim, width, max_len, threads, scale);
        } else if (decodes) {  // gather the decode rows, attend, scatter the outputs back
            for (int64_t i = 0; i < decodes; ++i)
                std::memcpy(qd.data() + i * q_row, q.data() + decode_rows[i] * q_row,
                            q_row * sizeof(float));
            code |= lmstack_paged_decode(qd.data(), layer_pool, tables, lengths, ad.data(),
                                         work.data(), 4, decodes, heads, kv_heads, num_blocks,
                                         block_size, dim, width, max_len, threads, scale);
            for (int64_t i = 0; i < decodes; ++i)
                std::memcpy(attn.data() + decode_rows[i] * q_row, ad.data() + i * q_row,
                            q_row * sizeof(float));
        }
        for (int64_t c = 0; c < num_chunks; ++c) {
            const int64_t* chunk = chunks + 4 * c;  // first row, tokens, start, table
            const auto* table = reinterpret_cast<const int64_t*>(chunk[3]);
            if (!lmstack_paged_prefill_f32(q.data() + chunk[0] * q_row, layer_pool, table,
                                           chunk[2], chunk[1], attn.data() + chunk[0] * q_row,
                                           heads, kv_heads, num_blocks, block_size, dim,
                                           threads, scale))
                return -3;  // a shape the tiled kernel refuses (the caller checks first)
        }
        code |= lmstack_linear_q(attn.data(), rows, heads * dim, heads * dim, weight(l, 1),
                                 hidden, format(l, 1), delta.data(), hidden, threads);
        code |= lmstack_rms_norm(x, delta.data(), norm(2 * l + 1), h.data(), 4, rows, hidden,
                                 threads, eps);
        code |= lmstack_linear_q(h.data(), rows, hidden, hidden, weight(l, 2), 2 * inter,
                                 format(l, 2), gate_up.data(), 2 * inter, threads);
        code |= lmstack_silu_mul(gate_up.data(), act.data(), 4, rows, inter, threads);
        code |= lmstack_linear_q(act.data(), rows, inter, inter, weight(l, 3), hidden,
                                 format(l, 3), delta.data(), hidden, threads);
        const bool last = l + 1 == layers;
        code |= lmstack_rms_norm(x, delta.data(), norm(last ? 2 * layers : 2 * l + 2),
                                 last ? out : h.data(), 4, rows, hidden, threads, eps);
    }
    return code;
}

}  // extern "C"
