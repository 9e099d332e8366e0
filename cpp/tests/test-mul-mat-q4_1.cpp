// test of GGML_OP_MUL_MAT with Q4_1 weights on the CPU backend, where batches (n >= 2 columns) go through
// llamafile's tinyBLAS (patch 0005) and single columns through ggml_vec_dot_q4_1_q8_1:
//   1. every element of a batched product equals, bit for bit, the product of its column alone (vec_dot path),
//      for every shape of tile the kernel has (m, n = 1..9 and larger), with 1 and 2 threads;
//   2. both agree with a double-precision reference of the Q4_1 x Q8_1 dot product, computed here from the
//      quantized blocks: sum over blocks of d_a*d_b*sum(q_a*q_b) + m_a*s_b;
//   3. on AVX2 CPUs llamafile_sgemm takes Q4_1 x Q8_1 (stock llama.cpp declines it) and gives those same bits.

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml-cpu/ggml-cpu-impl.h"     // ggml_compute_params
#include "ggml-cpu/llamafile/sgemm.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

// the block layouts of ggml-common.h (the test reads the quantized bytes itself)
struct q4_1_block {
    ggml_fp16_t d, m;
    uint8_t     qs[16];
};
struct q8_1_block {
    ggml_fp16_t d, s;
    int8_t      qs[32];
};
static_assert(sizeof(q4_1_block) == 20 && sizeof(q8_1_block) == 36, "unexpected block layout");

static int n_pass = 0;
static int n_fail = 0;

static void report(const std::string & name, const char * what, bool ok, const char * fmt, double a, double b) {
    char detail[256];
    snprintf(detail, sizeof(detail), fmt, a, b);
    printf("%-4s %-28s %-10s %s\n", ok ? "ok" : "FAIL", name.c_str(), what, detail);
    (ok ? n_pass : n_fail)++;
}

// W (m rows of k values, quantized to Q4_1) times X (n rows of k floats): out[j*m + i] = W_i . X_j
static std::vector<float> mul_mat(ggml_backend_t backend, const std::vector<uint8_t> & w, int64_t m, int64_t k,
                                  const float * x, int64_t n) {
    ggml_init_params ip = { 3*ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * a = ggml_new_tensor_2d(ctx, GGML_TYPE_Q4_1, k, m);
    ggml_tensor * b = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, n);
    ggml_tensor * out = ggml_mul_mat(ctx, a, b);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);

    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    GGML_ASSERT(buf);
    ggml_backend_tensor_set(a, w.data(), 0, ggml_nbytes(a));
    ggml_backend_tensor_set(b, x, 0, ggml_nbytes(b));
    GGML_ASSERT(ggml_backend_graph_compute(backend, gf) == GGML_STATUS_SUCCESS);

    std::vector<float> res(ggml_nelements(out));
    ggml_backend_tensor_get(out, res.data(), 0, ggml_nbytes(out));
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    return res;
}

static void run_case(ggml_backend_t backend, int n_threads, int64_t m, int64_t n, int64_t k, uint32_t seed) {
    char name[64];
    snprintf(name, sizeof(name), "m=%lld n=%lld k=%lld t=%d", (long long) m, (long long) n, (long long) k, n_threads);
    ggml_backend_cpu_set_n_threads(backend, n_threads);

    // weights with a per-row offset, so that the min of Q4_1 matters; activations of both signs
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> wf(m*k), x(n*k);
    for (int64_t i = 0; i < m; i++) {
        const float offset = 2.0f*u(rng);
        for (int64_t l = 0; l < k; l++) {
            wf[i*k + l] = offset + u(rng);
        }
    }
    for (float & v : x) {
        v = u(rng);
    }
    std::vector<uint8_t> w(ggml_row_size(GGML_TYPE_Q4_1, k)*m);
    ggml_quantize_chunk(GGML_TYPE_Q4_1, wf.data(), w.data(), 0, m, k, nullptr);

    const std::vector<float> batch = mul_mat(backend, w, m, k, x.data(), n);

    // 1. each column alone (one column: ggml_vec_dot_q4_1_q8_1)
    bool same = true;
    int64_t n_diff = 0;
    for (int64_t j = 0; j < n; j++) {
        const std::vector<float> col = mul_mat(backend, w, m, k, x.data() + j*k, 1);
        for (int64_t i = 0; i < m; i++) {
            if (memcmp(&col[i], &batch[j*m + i], sizeof(float)) != 0) {
                same = false;
                n_diff++;
            }
        }
    }
    report(name, "bitwise", same, "%.0f of %.0f elements differ from the column alone", (double) n_diff, (double) (m*n));

    // 2. the double-precision reference, from the blocks: X is quantized as the CPU backend quantizes it
    const ggml_from_float_t to_q8_1 = ggml_get_type_traits_cpu(GGML_TYPE_Q8_1)->from_float;
    const int64_t nb = k/32;
    std::vector<q8_1_block> xq(n*nb);
    for (int64_t j = 0; j < n; j++) {
        to_q8_1(x.data() + j*k, xq.data() + j*nb, k);
    }
    const q4_1_block * wq = (const q4_1_block *) w.data();
    double max_err = 0.0;
    bool ok = true;
    for (int64_t j = 0; j < n; j++) {
        for (int64_t i = 0; i < m; i++) {
            double ref = 0.0, mag = 0.0;
            for (int64_t b = 0; b < nb; b++) {
                const q4_1_block & wb = wq[i*nb + b];
                const q8_1_block & xb = xq[j*nb + b];
                int32_t dot = 0;
                for (int l = 0; l < 16; l++) {
                    dot += (wb.qs[l] & 0x0F)*xb.qs[l] + (wb.qs[l] >> 4)*xb.qs[l + 16];
                }
                const double t1 = (double) ggml_fp16_to_fp32(wb.d)*ggml_fp16_to_fp32(xb.d)*dot;
                const double t2 = (double) ggml_fp16_to_fp32(wb.m)*ggml_fp16_to_fp32(xb.s);
                ref += t1 + t2;
                mag += std::fabs(t1) + std::fabs(t2);
            }
            const double err = std::fabs(batch[j*m + i] - ref)/(mag + 1e-30);
            max_err = std::max(max_err, err);
            ok = ok && std::isfinite(batch[j*m + i]) && err < 1e-5;
        }
    }
    report(name, "reference", ok, "max relative error %.2e (tolerance %.0e)", max_err, 1e-5);

    // 3. the tinyBLAS kernel itself, called as ggml_compute_forward_mul_mat calls it (k and the strides in blocks)
    if (ggml_cpu_has_avx2() && ggml_cpu_has_f16c()) {
        ggml_compute_params params = {};
        params.ith = 0;
        params.nth = 1;
        std::vector<float> c(m*n, NAN);
        const bool taken = llamafile_sgemm(&params, m, n, nb, w.data(), nb, xq.data(), nb, c.data(), m,
                                           GGML_TYPE_Q4_1, GGML_TYPE_Q8_1, GGML_TYPE_F32);
        const bool equal = taken && memcmp(c.data(), batch.data(), c.size()*sizeof(float)) == 0;
        report(name, "sgemm", equal, "taken=%.0f, bit-identical to the graph's result=%.0f", taken, equal);
    }
}

int main() {
    ggml_backend_t backend = ggml_backend_cpu_init();
    GGML_ASSERT(backend);

    uint32_t seed = 4321;
    // every tile shape: the kernel packs m and n into tiles of up to 4 (and 4 x N / M x 4 on AVX2)
    for (int64_t m : { 1, 2, 3, 4, 5, 6, 7, 8, 9, 13 }) {
        for (int64_t n : { 2, 3, 4, 5, 6, 7, 8, 9 }) {
            run_case(backend, 1, m, n, 64, seed++);
        }
    }
    // larger shapes, with two threads sharing the tiles: SmolLM2-135M's projections (k = 576, 1536)
    run_case(backend, 2, 64, 37, 576, seed++);
    run_case(backend, 2, 61, 11, 1536, seed++);
    run_case(backend, 2, 7, 130, 96, seed++);
    run_case(backend, 1, 576, 24, 576, seed++);

    ggml_backend_free(backend);

    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
