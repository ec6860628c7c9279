// Prefix views of repacked weights against physically truncated repacked weights, on ggml-cpu alone.
//
// For every type the CPU backend repacks on this CPU (Q4_0, Q4_K, Q5_K, Q6_K, Q8_0, IQ4_NL), a random weight is
// quantized and loaded into the CPU_REPACK buffer; prefix views of it (rows, columns, both) are multiplied with
// activations of 1..8 tokens (the gemv and gemm kernels), on 1 and 2 threads and compared bit for bit with the same product on a
// weight quantized from the cut floats and loaded (repacked) on its own -- what stock llama.cpp runs for a
// truncated GGUF. A view that is not whole row groups must be refused by supports_op (the loader then keeps the
// weight unrepacked). Prints the kernel each type ran with ("repack tensor ... with q4_0_4x8") and one line per
// type; exits non-zero on any mismatch. Built and run by tests/test_repack.py (x86) and tests/test_aarch64.py
// (each ARM -march under qemu-aarch64).
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

static std::string g_log;

static void log_cb(ggml_log_level, const char * text, void *) {
    g_log += text;
}

struct weight {
    ggml_context *        ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;
    ggml_tensor *         t   = nullptr;
    ~weight() {
        if (buf) ggml_backend_buffer_free(buf);
        if (ctx) ggml_free(ctx);
    }
};

// quantize rows [0, n) x columns [0, k) of the row-major float matrix w (row length k_full) into buft;
// false if buft is the repack buffer and this CPU has no repacked layout for the type
static bool make_weight(weight & out, ggml_backend_buffer_type_t buft, ggml_type type, const std::vector<float> & w,
                        int64_t k_full, int64_t k, int64_t n) {
    ggml_init_params ip = { ggml_tensor_overhead() * 2, nullptr, true };
    out.ctx = ggml_init(ip);
    out.t   = ggml_new_tensor_2d(out.ctx, type, k, n);
    ggml_set_name(out.t, "w");
    out.buf = ggml_backend_alloc_ctx_tensors_from_buft(out.ctx, buft);
    if (out.t->extra == nullptr) {
        return false; // init_tensor found no layout: stock never places such a weight here
    }
    std::vector<float> cut(k * n);
    for (int64_t r = 0; r < n; ++r) {
        memcpy(cut.data() + r * k, w.data() + r * k_full, k * sizeof(float));
    }
    std::vector<uint8_t> q(ggml_row_size(type, k) * n);
    ggml_quantize_chunk(type, cut.data(), q.data(), 0, n, k, nullptr);
    ggml_backend_tensor_set(out.t, q.data(), 0, q.size());
    return true;
}

// y = w[:rows, :cols] x for x {cols, T}; view: take the prefix as a view of w (else w is used whole)
static bool matmul(ggml_backend_t be, ggml_backend_dev_t dev, ggml_tensor * w, bool view, int64_t cols, int64_t rows,
                   const std::vector<float> & x, int64_t T, std::vector<float> & y) {
    ggml_init_params ip = { ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * a = view ? ggml_view_2d(ctx, w, cols, rows, w->nb[1], 0) : w;
    ggml_tensor * b = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, cols, T);
    ggml_set_input(b);
    ggml_tensor * out = ggml_mul_mat(ctx, a, b);
    ggml_set_output(out);
    if (view) {
        a->buffer = w->buffer; // what ggml_backend_view_init will set: supports_op looks at it
    }
    const bool supported = ggml_backend_dev_supports_op(dev, out);
    if (view) {
        a->buffer = nullptr;
    }
    if (!supported) {
        ggml_free(ctx);
        return false;
    }
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_gallocr_t galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(be));
    GGML_ASSERT(ggml_gallocr_alloc_graph(galloc, gf));
    ggml_backend_tensor_set(b, x.data(), 0, cols * T * sizeof(float));
    GGML_ASSERT(ggml_backend_graph_compute(be, gf) == GGML_STATUS_SUCCESS);
    y.resize(rows * T);
    ggml_backend_tensor_get(out, y.data(), 0, y.size() * sizeof(float));
    ggml_gallocr_free(galloc);
    ggml_free(ctx);
    return true;
}

int main() {
    ggml_log_set(log_cb, nullptr);
    ggml_backend_dev_t dev = ggml_backend_reg_dev_get(ggml_backend_cpu_reg(), 0);
    ggml_backend_t     be  = ggml_backend_cpu_init();

    ggml_backend_buffer_type_t repack = nullptr;
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t)
        ggml_backend_reg_get_proc_address(ggml_backend_cpu_reg(), "ggml_backend_dev_get_extra_bufts");
    for (ggml_backend_buffer_type_t * p = get_extra ? get_extra(dev) : nullptr; p && *p; ++p) {
        if (strcmp(ggml_backend_buft_name(*p), "CPU_REPACK") == 0) {
            repack = *p;
        }
    }
    if (!repack) {
        printf("no CPU_REPACK buffer type in this build\n");
        return 0;
    }

    const ggml_type types[] = { GGML_TYPE_Q4_0, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K, GGML_TYPE_Q8_0,
                                GGML_TYPE_IQ4_NL };
    const int64_t K = 1024, N = 128;
    std::mt19937 rng(42);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> w(K * N);
    for (float & v : w) v = nd(rng);

    int failures = 0;
    for (ggml_type type : types) {
        weight full;
        g_log.clear();
        if (!make_weight(full, repack, type, w, K, K, N)) {
            printf("%-7s not repacked on this CPU\n", ggml_type_name(type));
            continue;
        }
        const size_t at = g_log.find("with ");
        const std::string traits = at == std::string::npos ? "?" : g_log.substr(at + 5, g_log.find('\n', at) - at - 5);
        const int64_t blk = ggml_blck_size(type);
        // {columns, rows}: whole width, column prefixes (whole blocks), row prefixes (whole groups of 8), both
        const int64_t shapes[][2] = { { K, N }, { K / 2, N }, { 3 * K / 4, N }, { K, 32 }, { K, 48 }, { K / 2, 16 },
                                      { 3 * K / 4, 40 }, { K / 4, 96 } };
        int n_cases = 0;
        for (const auto & s : shapes) {
            const int64_t cols = s[0], rows = s[1];
            if (cols % blk) continue;
            weight cut;
            GGML_ASSERT(make_weight(cut, repack, type, w, K, cols, rows));
            for (int64_t T : { 1, 3, 4, 5, 8 }) {
              for (int n_threads : { 1, 2 }) { // 1 thread: one chunk spans many row groups
                ggml_backend_cpu_set_n_threads(be, n_threads);
                std::vector<float> x(cols * T), y_view, y_cut;
                for (float & v : x) v = nd(rng);
                if (!matmul(be, dev, full.t, true, cols, rows, x, T, y_view)) {
                    printf("FAIL %s: view %lld x %lld refused by supports_op\n", ggml_type_name(type), (long long) cols,
                           (long long) rows);
                    ++failures;
                    continue;
                }
                GGML_ASSERT(matmul(be, dev, cut.t, false, cols, rows, x, T, y_cut));
                if (memcmp(y_view.data(), y_cut.data(), y_cut.size() * sizeof(float)) != 0) {
                    printf("FAIL %s (%s): view %lld x %lld, %lld tokens, %d threads differs from the truncated weight\n",
                           ggml_type_name(type), traits.c_str(), (long long) cols, (long long) rows, (long long) T,
                           n_threads);
                    ++failures;
                }
                ++n_cases;
              }
            }
        }
        // a row prefix that is not whole row groups (4 or 8 rows) cannot run on the layout: refused
        std::vector<float> x(K), y;
        if (matmul(be, dev, full.t, true, K, 6, x, 1, y)) {
            printf("FAIL %s: a 6-row view was accepted\n", ggml_type_name(type));
            ++failures;
        }
        printf("%-7s %-16s %d products bit-identical to the truncated weight\n", ggml_type_name(type), traits.c_str(),
               n_cases);
    }
    ggml_backend_free(be);
    printf(failures ? "repack_views: %d FAILED\n" : "repack_views: OK\n", failures);
    return failures ? 1 : 0;
}
