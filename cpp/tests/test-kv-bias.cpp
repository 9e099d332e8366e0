// test of the kv bias of GGML_OP_SOFT_MAX and GGML_OP_FLASH_ATTN_EXT on the CPU backend
// (ggml_soft_max_add_kv_bias, ggml_flash_attn_ext_add_kv_bias) against a naive double-precision reference
//
// for row i1, head h and stream i3 the bias[h] is added to the logit of KV column c = idx[i1, i3 % n_idx_streams]
// after scale, softcap and mask (the mask is multiplied by the ALiBi slope, the bias is not); c outside [0, n_kv)
// means no bias

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml-backend-impl.h" // a fake device for the supports_op guard

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

enum bias_mode { BIAS_NONE, BIAS_ZERO, BIAS_SET };

struct test_case {
    std::string name;
    bool      flash;         // FLASH_ATTN_EXT, else SOFT_MAX
    int64_t   d;             // head size (flash only)
    int64_t   n_kv, n_rows, n_head, n_head_kv, n_stream, n_idx_streams;
    ggml_type kv_type;       // K/V type (flash only)
    ggml_type mask_type;     // GGML_TYPE_COUNT: no mask
    float     scale, max_bias, softcap;
    int32_t   idx0;          // forced column of row 0, stream 0 (-2: random)
    double    tol;           // flash: max abs error; soft_max: relative error
};

struct test_data {
    std::vector<float>   q, k, v, kq, mask; // values as uploaded
    std::vector<float>   q_rt, k_rt, v_rt, mask_rt; // values as the kernel sees them
    std::vector<float>   bias;
    std::vector<int32_t> idx;
};

static ggml_backend_t g_backend = nullptr;

// converts x (rows of n_per_row values) to type t: returns the bytes to upload, rt receives the values the kernel sees
static std::vector<uint8_t> convert(ggml_type t, const std::vector<float> & x, int64_t n_per_row, std::vector<float> & rt) {
    const int64_t nrows = (int64_t) x.size()/n_per_row;
    std::vector<uint8_t> buf(ggml_row_size(t, n_per_row)*nrows);
    rt.resize(x.size());
    if (t == GGML_TYPE_F32) {
        memcpy(buf.data(), x.data(), buf.size());
        rt = x;
    } else if (t == GGML_TYPE_F16) {
        ggml_fp16_t * p = (ggml_fp16_t *) buf.data();
        for (size_t i = 0; i < x.size(); i++) {
            p[i]  = ggml_fp32_to_fp16(x[i]);
            rt[i] = ggml_fp16_to_fp32(p[i]);
        }
    } else {
        ggml_quantize_chunk(t, x.data(), buf.data(), 0, nrows, n_per_row, nullptr);
        ggml_get_type_traits(t)->to_float(buf.data(), rt.data(), (int64_t) x.size());
    }
    return buf;
}

static bool is_tiled(const test_case & tc) {
    return tc.n_rows >= 64 && (tc.kv_type == GGML_TYPE_F16 || tc.kv_type == GGML_TYPE_F32);
}

static test_data make_data(const test_case & tc, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u1(-1.0f, 1.0f);
    std::uniform_real_distribution<float> u3(-3.0f, 3.0f);
    std::uniform_int_distribution<int32_t> ucol(0, (int32_t) tc.n_kv - 1);

    test_data td;
    auto fill = [&](std::vector<float> & x, size_t n, float a) { x.resize(n); for (auto & e : x) { e = a*u1(rng); } };

    if (tc.flash) {
        fill(td.q, tc.d*tc.n_rows*tc.n_head*tc.n_stream, 1.0f);
        fill(td.k, tc.d*tc.n_kv*tc.n_head_kv*tc.n_stream, 1.0f);
        fill(td.v, tc.d*tc.n_kv*tc.n_head_kv*tc.n_stream, 1.0f);
    } else {
        fill(td.kq, tc.n_kv*tc.n_rows*tc.n_head*tc.n_stream, 8.0f);
    }

    td.bias.resize(tc.n_head);
    for (auto & b : td.bias) {
        b = u3(rng);
    }

    // idx: j%4 == 2 -> -1 (no bias), j%13 == 12 -> n_kv (out of range, no bias), else a random column
    td.idx.resize(tc.n_rows*tc.n_idx_streams);
    for (size_t j = 0; j < td.idx.size(); j++) {
        td.idx[j] = j%4 == 2 ? -1 : j%13 == 12 ? (int32_t) tc.n_kv : ucol(rng);
    }
    if (tc.idx0 != -2) {
        td.idx[0] = tc.idx0;
    }

    if (tc.mask_type != GGML_TYPE_COUNT) {
        // mask [n_kv, n_rows, 1, n_stream]: ~10% -inf, else in [-2, 0]; in stream 0 the columns [64, 128) are masked
        // for every row when n_kv >= 192 (whole KV tiles skipped by the tiled kernel)
        td.mask.resize(tc.n_kv*tc.n_rows*tc.n_stream);
        for (int64_t i3 = 0; i3 < tc.n_stream; i3++) {
            for (int64_t i1 = 0; i1 < tc.n_rows; i1++) {
                float * m = td.mask.data() + (i3*tc.n_rows + i1)*tc.n_kv;
                for (int64_t c = 0; c < tc.n_kv; c++) {
                    const bool blk = i3 == 0 && tc.n_kv >= 192 && c >= 64 && c < 128;
                    m[c] = blk || u1(rng) > 0.8f ? -INFINITY : u1(rng) - 1.0f;
                }
                m[i1 % 32] = 0.0f; // at least one column open
                // j%4 == 1: the bias column is masked, it must keep a zero weight; else it is open (outside the block)
                const int64_t j = i1 + (i3 % tc.n_idx_streams)*tc.n_rows;
                const int32_t c = td.idx[j];
                if (c >= 0 && c < tc.n_kv) {
                    if (j%4 == 1) {
                        m[c] = -INFINITY;
                    } else if (std::isinf(m[c]) && !(i3 == 0 && tc.n_kv >= 192 && c >= 64 && c < 128)) {
                        m[c] = 0.0f;
                    }
                }
            }
        }
        convert(tc.mask_type == GGML_TYPE_F16 ? GGML_TYPE_F16 : GGML_TYPE_F32, td.mask, tc.n_kv, td.mask_rt);
    }

    if (tc.flash) {
        convert(tc.kv_type, td.k, tc.d, td.k_rt);
        convert(tc.kv_type, td.v, tc.d, td.v_rt);
        // the tiled kernel uses Q in F32, the others convert Q to the vec_dot type of K (F16 for F16, Q8_0 for Q8_0)
        const ggml_type q_type = is_tiled(tc) ? GGML_TYPE_F32 : tc.kv_type;
        convert(q_type, td.q, tc.d, td.q_rt);
    }

    return td;
}

static void upload(ggml_tensor * t, const std::vector<float> & x, int64_t n_per_row) {
    std::vector<float> rt;
    const std::vector<uint8_t> buf = convert(t->type, x, n_per_row, rt);
    GGML_ASSERT(buf.size() == ggml_nbytes(t));
    ggml_backend_tensor_set(t, buf.data(), 0, buf.size());
}

// runs the op on the CPU backend and returns its output
static std::vector<float> run(const test_case & tc, const test_data & td, bias_mode mode) {
    ggml_init_params ip = { ggml_tensor_overhead()*16 + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(ip);

    ggml_tensor * mask = nullptr;
    if (tc.mask_type != GGML_TYPE_COUNT) {
        mask = ggml_new_tensor_4d(ctx, tc.mask_type, tc.n_kv, tc.n_rows, 1, tc.n_stream);
    }

    ggml_tensor * q = nullptr, * k = nullptr, * v = nullptr, * kq = nullptr, * out = nullptr;
    if (tc.flash) {
        q   = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, tc.d, tc.n_rows, tc.n_head,    tc.n_stream);
        k   = ggml_new_tensor_4d(ctx, tc.kv_type,    tc.d, tc.n_kv,   tc.n_head_kv, tc.n_stream);
        v   = ggml_new_tensor_4d(ctx, tc.kv_type,    tc.d, tc.n_kv,   tc.n_head_kv, tc.n_stream);
        out = ggml_flash_attn_ext(ctx, q, k, v, mask, tc.scale, tc.max_bias, tc.softcap);
        ggml_prec_set_acc(out, GGML_PREC_F32);
    } else {
        kq  = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, tc.n_kv, tc.n_rows, tc.n_head, tc.n_stream);
        out = ggml_soft_max_ext(ctx, kq, mask, tc.scale, tc.max_bias);
    }

    ggml_tensor * bias = nullptr, * idx = nullptr;
    if (mode != BIAS_NONE) {
        bias = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, tc.n_head);
        idx  = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, tc.n_rows, tc.n_idx_streams);
        if (tc.flash) {
            ggml_flash_attn_ext_add_kv_bias(out, bias, idx);
        } else {
            ggml_soft_max_add_kv_bias(out, bias, idx);
        }
    }

    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);

    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, g_backend);
    GGML_ASSERT(buf);

    if (tc.flash) {
        upload(q, td.q, tc.d);
        upload(k, td.k, tc.d);
        upload(v, td.v, tc.d);
    } else {
        upload(kq, td.kq, tc.n_kv);
    }
    if (mask) {
        upload(mask, td.mask, tc.n_kv);
    }
    if (mode != BIAS_NONE) {
        const std::vector<float> b = mode == BIAS_ZERO ? std::vector<float>(tc.n_head, 0.0f) : td.bias;
        ggml_backend_tensor_set(bias, b.data(), 0, ggml_nbytes(bias));
        ggml_backend_tensor_set(idx, td.idx.data(), 0, ggml_nbytes(idx));
    }

    GGML_ASSERT(ggml_backend_graph_compute(g_backend, gf) == GGML_STATUS_SUCCESS);

    std::vector<float> res(ggml_nelements(out));
    ggml_backend_tensor_get(out, res.data(), 0, ggml_nbytes(out));

    ggml_backend_buffer_free(buf);
    ggml_free(ctx);

    return res;
}

static double alibi_slope(const test_case & tc, int64_t h) {
    if (tc.max_bias <= 0.0f) {
        return 1.0;
    }
    const int64_t n_head_log2 = 1ll << (int64_t) std::floor(std::log2((double) tc.n_head));
    const double m0 = std::pow(2.0, -(double) tc.max_bias/n_head_log2);
    const double m1 = std::pow(2.0, -(double) tc.max_bias/2.0/n_head_log2);
    return h < n_head_log2 ? std::pow(m0, h + 1) : std::pow(m1, 2*(h - n_head_log2) + 1);
}

// naive reference: same layout as the op output
static std::vector<double> reference(const test_case & tc, const test_data & td) {
    const int64_t n_out = tc.flash ? tc.d*tc.n_head*tc.n_rows*tc.n_stream : tc.n_kv*tc.n_rows*tc.n_head*tc.n_stream;
    std::vector<double> res(n_out, 0.0);
    std::vector<double> s(tc.n_kv);

    for (int64_t i3 = 0; i3 < tc.n_stream; i3++) {
        for (int64_t h = 0; h < tc.n_head; h++) {
            const int64_t hk = h/(tc.n_head/std::max<int64_t>(tc.n_head_kv, 1));
            for (int64_t i1 = 0; i1 < tc.n_rows; i1++) {
                const int32_t c_b = td.idx[i1 + (i3 % tc.n_idx_streams)*tc.n_rows];
                double s_max = -INFINITY;
                for (int64_t c = 0; c < tc.n_kv; c++) {
                    double x = 0.0;
                    if (tc.flash) {
                        const float * q = td.q_rt.data() + ((i3*tc.n_head + h)*tc.n_rows + i1)*tc.d;
                        const float * k = td.k_rt.data() + ((i3*tc.n_head_kv + hk)*tc.n_kv + c)*tc.d;
                        for (int64_t i = 0; i < tc.d; i++) {
                            x += (double) q[i]*k[i];
                        }
                    } else {
                        x = td.kq[((i3*tc.n_head + h)*tc.n_rows + i1)*tc.n_kv + c];
                    }
                    x *= tc.scale;
                    if (tc.softcap != 0.0f) {
                        x = tc.softcap*std::tanh(x/tc.softcap);
                    }
                    if (!td.mask_rt.empty()) {
                        const double m = td.mask_rt[(i3*tc.n_rows + i1)*tc.n_kv + c];
                        x = std::isinf(m) ? -INFINITY : x + alibi_slope(tc, h)*m;
                    }
                    if (c == c_b) {
                        x += td.bias[h];
                    }
                    s[c]  = x;
                    s_max = std::max(s_max, x);
                }
                double sum = 0.0;
                for (int64_t c = 0; c < tc.n_kv; c++) {
                    s[c] = std::exp(s[c] - s_max);
                    sum += s[c];
                }
                if (tc.flash) {
                    double * o = res.data() + ((i3*tc.n_rows + i1)*tc.n_head + h)*tc.d;
                    for (int64_t c = 0; c < tc.n_kv; c++) {
                        const float * v = td.v_rt.data() + ((i3*tc.n_head_kv + hk)*tc.n_kv + c)*tc.d;
                        for (int64_t i = 0; i < tc.d; i++) {
                            o[i] += s[c]/sum*v[i];
                        }
                    }
                } else {
                    double * o = res.data() + ((i3*tc.n_head + h)*tc.n_rows + i1)*tc.n_kv;
                    for (int64_t c = 0; c < tc.n_kv; c++) {
                        o[c] = s[c]/sum;
                    }
                }
            }
        }
    }
    return res;
}

static int n_pass = 0;
static int n_fail = 0;

static void report(const std::string & name, const char * what, bool ok, const char * fmt, double a, double b) {
    printf("%-56s %-7s ", name.c_str(), what);
    printf(fmt, a, b);
    printf(" %s\n", ok ? "PASS" : "FAIL");
    (ok ? n_pass : n_fail)++;
}

// a backend that does not implement the kv bias must not get the node: ggml_backend_dev_supports_op rejects
// SOFT_MAX/FLASH_ATTN_EXT with a kv bias on every device that does not declare the capability caps.kv_bias (set by
// the CPU, Vulkan and CUDA backends), so the scheduler runs them on the CPU. GPU devices are faked here: their own
// supports_op accepts everything, as a backend that knows nothing of the bias would, and their get_props fills the
// caps it knows as every backend does (an aggregate initialiser without kv_bias) or declares the kv bias too.
// Registry names do not matter.
static enum ggml_backend_dev_type fake_type_gpu(ggml_backend_dev_t) { return GGML_BACKEND_DEVICE_TYPE_GPU; }
static enum ggml_backend_dev_type fake_type_cpu(ggml_backend_dev_t) { return GGML_BACKEND_DEVICE_TYPE_CPU; }
static void fake_props(ggml_backend_dev_t, struct ggml_backend_dev_props * props) {
    props->caps = { /* .async = */ true, /* .host_buffer = */ true, /* .buffer_from_host_ptr = */ false,
                    /* .events = */ true, /* .mmap_support = */ true };
}
static void fake_props_kv_bias(ggml_backend_dev_t dev, struct ggml_backend_dev_props * props) {
    fake_props(dev, props);
    props->caps.kv_bias = true;
}
static bool fake_supports_op(ggml_backend_dev_t, const struct ggml_tensor *) { return true; }
static bool fake_supports_op_no_soft_max(ggml_backend_dev_t, const struct ggml_tensor * op) {
    return op->op != GGML_OP_SOFT_MAX;
}
static const char * fake_reg_name(ggml_backend_reg_t reg) { return (const char *) reg->context; }

static void test_backend_guard() {
    ggml_init_params ip = { 1 << 20, nullptr, true };
    ggml_context * ctx = ggml_init(ip);

    ggml_tensor * kq   = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 32, 4, 2, 1);
    ggml_tensor * q    = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 64, 4, 2, 1);
    ggml_tensor * k    = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, 64, 32, 1, 1);
    ggml_tensor * bias = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 2);
    ggml_tensor * idx  = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 4, 1);

    ggml_tensor * sm_plain = ggml_soft_max_ext(ctx, kq, nullptr, 1.0f, 0.0f);
    ggml_tensor * sm_bias  = ggml_soft_max_ext(ctx, kq, nullptr, 1.0f, 0.0f);
    ggml_soft_max_add_kv_bias(sm_bias, bias, idx);
    ggml_tensor * fa_plain = ggml_flash_attn_ext(ctx, q, k, k, nullptr, 1.0f, 0.0f, 0.0f);
    ggml_tensor * fa_bias  = ggml_flash_attn_ext(ctx, q, k, k, nullptr, 1.0f, 0.0f, 0.0f);
    ggml_flash_attn_ext_add_kv_bias(fa_bias, bias, idx);

    ggml_backend_device gpu = {};
    gpu.iface.get_type    = fake_type_gpu;
    gpu.iface.get_props   = fake_props;
    gpu.iface.supports_op = fake_supports_op;
    ggml_backend_device cpu = gpu;
    cpu.iface.get_type    = fake_type_cpu;

    const bool ok =
        ggml_backend_dev_supports_op(&gpu, sm_plain) && !ggml_backend_dev_supports_op(&gpu, sm_bias) &&
        ggml_backend_dev_supports_op(&gpu, fa_plain) && !ggml_backend_dev_supports_op(&gpu, fa_bias);
    report("backend guard: kv bias rejected on a device without caps.kv_bias", "guard", ok, "", 0.0, 0.0);

    // the device type does not matter either: a CPU-type device that does not declare it is refused too
    const bool ok_cpu_type = ggml_backend_dev_supports_op(&cpu, sm_plain) &&
        !ggml_backend_dev_supports_op(&cpu, sm_bias) && !ggml_backend_dev_supports_op(&cpu, fa_bias);
    report("backend guard: kv bias rejected on a CPU-type device without it", "guard", ok_cpu_type, "", 0.0, 0.0);

    // the CPU backend declares it and gets the nodes
    ggml_backend_dev_t cpu_dev = ggml_backend_get_device(g_backend);
    ggml_backend_dev_props cpu_props;
    ggml_backend_dev_get_props(cpu_dev, &cpu_props);
    const bool ok_cpu = cpu_props.caps.kv_bias && ggml_backend_dev_supports_op(cpu_dev, sm_bias) &&
        ggml_backend_dev_supports_op(cpu_dev, fa_bias);
    report("backend guard: kv bias passed to the CPU backend", "guard", ok_cpu, "", 0.0, 0.0);

    // a device that declares it gets the nodes, then its own supports_op decides
    ggml_backend_device gpu_kvb = gpu;
    gpu_kvb.iface.get_props = fake_props_kv_bias;
    ggml_backend_device gpu_kvb_no_sm = gpu_kvb;
    gpu_kvb_no_sm.iface.supports_op = fake_supports_op_no_soft_max;
    const bool ok_declared =
        ggml_backend_dev_supports_op(&gpu_kvb, sm_bias) && ggml_backend_dev_supports_op(&gpu_kvb, fa_bias) &&
        !ggml_backend_dev_supports_op(&gpu_kvb_no_sm, sm_bias) && ggml_backend_dev_supports_op(&gpu_kvb_no_sm, fa_bias);
    report("backend guard: kv bias passed to a device with caps.kv_bias", "guard", ok_declared, "", 0.0, 0.0);

    // registry names play no part: a device of any backend, "Vulkan" and "CUDA" included, gets the node exactly
    // when it declares the capability
    for (const char * name : { "Metal", "SYCL", "OpenCL", "ROCm", "MUSA", "RPC", "CANN", "WebGPU", "BLAS",
                               "Vulkan", "CUDA" }) {
        ggml_backend_reg reg = {};
        reg.iface.get_name = fake_reg_name;
        reg.context        = (void *) name;
        for (const bool declared : { false, true }) {
            ggml_backend_device dev = declared ? gpu_kvb : gpu;
            dev.reg = &reg;
            const bool ok_named =
                ggml_backend_dev_supports_op(&dev, sm_plain) && ggml_backend_dev_supports_op(&dev, fa_plain) &&
                ggml_backend_dev_supports_op(&dev, sm_bias) == declared &&
                ggml_backend_dev_supports_op(&dev, fa_bias) == declared;
            report(std::string("backend guard: kv bias ") + (declared ? "passed to " : "rejected on ") + name +
                   (declared ? " with caps.kv_bias" : " without caps.kv_bias"), "guard", ok_named, "", 0.0, 0.0);
        }
    }

    // clearing the bias (NULL) empties the slots again
    ggml_soft_max_add_kv_bias(sm_bias, nullptr, nullptr);
    ggml_flash_attn_ext_add_kv_bias(fa_bias, nullptr, nullptr);
    const bool cleared = ggml_backend_dev_supports_op(&gpu, sm_bias) && ggml_backend_dev_supports_op(&gpu, fa_bias);
    report("backend guard: a cleared kv bias is accepted again", "guard", cleared, "", 0.0, 0.0);

    ggml_free(ctx);
}

static void run_case(const test_case & tc, uint32_t seed) {
    const test_data td = make_data(tc, seed);

    const std::vector<float> out_bias = run(tc, td, BIAS_SET);
    const std::vector<float> out_zero = run(tc, td, BIAS_ZERO);
    const std::vector<float> out_none = run(tc, td, BIAS_NONE);
    const std::vector<double> ref     = reference(tc, td);

    // 1. against the reference
    double err_abs = 0.0, err_rel = 0.0;
    for (size_t i = 0; i < ref.size(); i++) {
        const double e = std::fabs(out_bias[i] - ref[i]);
        err_abs = std::max(err_abs, std::isnan(e) ? INFINITY : e);
        err_rel = std::max(err_rel, std::isnan(e) ? INFINITY : e/(std::fabs(ref[i]) + 1e-6));
    }
    const double err = tc.flash ? err_abs : err_rel;
    report(tc.name, "ref", err <= tc.tol, tc.flash ? "max_abs_err=%.3e tol=%.1e" : "max_rel_err=%.3e tol=%.1e", err, tc.tol);

    // 2. an all-zero bias gives the output without bias, bit for bit
    const bool same = memcmp(out_zero.data(), out_none.data(), out_none.size()*sizeof(float)) == 0;
    report(tc.name, "zero", same, "bitwise_equal=%.0f (expect %.0f)", same ? 1.0 : 0.0, 1.0);

    // 3. the bias changes the output, by well more than the tolerance (else check 1 could not see a missing bias)
    double diff = 0.0;
    for (size_t i = 0; i < out_none.size(); i++) {
        diff = std::max(diff, (double) std::fabs(out_bias[i] - out_none[i]));
    }
    const double min_diff = tc.flash ? 3.0*tc.tol : 1e-3;
    report(tc.name, "effect", diff > min_diff, "max|bias-none|=%.3e min=%.1e", diff, min_diff);
}

int main() {
    g_backend = ggml_backend_cpu_init();
    GGML_ASSERT(g_backend);
    ggml_backend_cpu_set_n_threads(g_backend, 2);

    const ggml_type F32 = GGML_TYPE_F32, F16 = GGML_TYPE_F16, Q8 = GGML_TYPE_Q8_0, NONE = GGML_TYPE_COUNT;
    const float sc = 0.125f; // 1/sqrt(64)

    const std::vector<test_case> cases = {
        // name                                                   flash   d  n_kv rows head hkv strm idxs  kv   mask   scale max_bias cap  idx0  tol
        { "soft_max  kv=37  rows=11 h=4 s=1/1 mask=f32",           false,  0,  37, 11, 4, 0, 1, 1, F32, F32,  0.1f, 0.0f,  0.0f, -2, 1e-5 },
        { "soft_max  kv=50  rows=4  h=2 s=1/1 no mask",            false,  0,  50,  4, 2, 0, 1, 1, F32, NONE, 0.5f, 0.0f,  0.0f, -2, 1e-5 },
        { "soft_max  kv=256 rows=7  h=4 s=3/3 mask=f16 alibi",     false,  0, 256,  7, 4, 0, 3, 3, F32, F16,  0.1f, 8.0f,  0.0f, -2, 1e-5 },
        { "soft_max  kv=64  rows=5  h=3 s=3/1 mask=f32 alibi",     false,  0,  64,  5, 3, 0, 3, 1, F32, F32,  1.0f, 8.0f,  0.0f, -2, 1e-5 },
        { "soft_max  kv=200 rows=9  h=4 s=2/2 mask=f16 alibi",     false,  0, 200,  9, 4, 0, 2, 2, F32, F16,  0.3f, 4.0f,  0.0f, -2, 1e-5 },
        // one_chunk: 1 < n_rows < 64 (or n_kv < 512), or quantized K/V
        { "fa chunk  kv=113 rows=3  h=4/1 s=3/3 f16",              true,  64, 113,  3, 4, 1, 3, 3, F16, F16,  sc,   0.0f,  0.0f, -2, 2e-3 },
        { "fa chunk  kv=113 rows=3  h=4/2 s=3/1 f32 softcap",      true,  64, 113,  3, 4, 2, 3, 1, F32, F16,  sc,   0.0f, 20.0f, -2, 1e-4 },
        { "fa chunk  kv=113 rows=1  h=4/2 s=1/1 f16 (kv<512)",     true,  64, 113,  1, 4, 2, 1, 1, F16, F16,  sc,   0.0f,  0.0f, 77, 2e-3 },
        { "fa chunk  kv=97  rows=5  h=4/4 s=3/3 f16 alibi",        true,  64,  97,  5, 4, 4, 3, 3, F16, F16,  sc,   8.0f,  0.0f, -2, 2e-3 },
        { "fa chunk  kv=113 rows=3  h=4/2 s=3/3 q8_0",             true,  64, 113,  3, 4, 2, 3, 3, Q8,  F16,  sc,   0.0f,  0.0f, -2, 1e-2 },
        { "fa chunk  kv=256 rows=70 h=4/1 s=1/1 q8_0 softcap",     true,  64, 256, 70, 4, 1, 1, 1, Q8,  F16,  sc,   0.0f, 30.0f, -2, 1e-2 },
        { "fa chunk  kv=113 rows=3  h=4/1 s=2/1 f16 no mask",      true,  64, 113,  3, 4, 1, 2, 1, F16, NONE, sc,   0.0f,  0.0f, -2, 2e-3 },
        // split-KV decode: n_rows == 1, n_stream == 1, F16/F32, n_kv >= 512 (2 threads: chunks [0, 300) and [300, 600))
        { "fa split  kv=600 rows=1  h=4/1 s=1/1 f16 col=450",      true,  64, 600,  1, 4, 1, 1, 1, F16, F16,  sc,   0.0f,  0.0f, 450, 2e-3 },
        { "fa split  kv=600 rows=1  h=4/2 s=1/1 f32 softcap col=5", true, 64, 600,  1, 4, 2, 1, 1, F32, F16,  sc,   0.0f, 30.0f,  5, 1e-4 },
        { "fa split  kv=513 rows=1  h=4/4 s=1/1 f16 col=256",      true,  64, 513,  1, 4, 4, 1, 1, F16, F16,  sc,   0.0f,  0.0f, 256, 2e-3 },
        // tiled: n_rows >= 64, F16/F32 (Q tiles of 64 rows, KV tiles of 64 columns)
        { "fa tiled  kv=150 rows=70 h=4/2 s=3/1 f16",              true,  64, 150, 70, 4, 2, 3, 1, F16, F16,  sc,   0.0f,  0.0f, -2, 2e-3 },
        { "fa tiled  kv=200 rows=70 h=4/1 s=3/3 f32 softcap",      true,  64, 200, 70, 4, 1, 3, 3, F32, F16,  sc,   0.0f, 30.0f, -2, 1e-4 },
        { "fa tiled  kv=150 rows=64 h=4/4 s=1/1 f16 alibi",        true,  64, 150, 64, 4, 4, 1, 1, F16, F16,  sc,   8.0f,  0.0f, -2, 2e-3 },
    };

    uint32_t seed = 1234;
    for (const test_case & tc : cases) {
        run_case(tc, seed++);
    }

    test_backend_guard();

    ggml_backend_free(g_backend);

    printf("%d passed, %d failed\n", n_pass, n_fail);

    return n_fail == 0 ? 0 : 1;
}
