// Fuzz target: the first-token attention bias of the patched llama.cpp, through the PUBLIC API only (llama.h,
// gguf.h).
//
// One input (bytes) -> one GGUF file, made from a small valid seed model (tiny llama, or tiny deci with per-layer
// head counts) by one of:
//   - a metadata edit with the gguf API: the bias key absent, a FLOAT32 array of the right length, one value
//     more or less, empty, huge, NaN/inf/raw float bits, or the wrong type (scalar, INT32/FLOAT64/BOOL/STRING
//     array, string); per-layer head counts, block_count or key_length changed; a stale key of another arch;
//     optionally the resulting file truncated
//   - byte flips in the seed's metadata
//   - the input bytes after a GGUF header
// -> llama_model_load_from_file -> if it loads: a context (flash attention on or off, 1 or 2 sequences, unified
// KV or not), a 2-token decode, 1-3 llama_set_attn_ftb calls with lengths, NULL and values from the input, a
// decode again.
//
// Checked (a failed check aborts, so the driver and libFuzzer count it as a crash):
//   - a file the gguf parser refuses is refused by the loader (never loaded);
//   - when the metadata are readable by the rules the loader uses, the bias a context starts with is exactly
//     the stored one clamped to [-100, 100] if the key is a FLOAT32 array of n_attn finite values (n_attn =
//     n_layer*max(n_head), or 0 above 2^20 values: the loader allows no bias for such head counts),
//     and off otherwise; an unusable key gives exactly one "ignoring the first-token attention bias" log line,
//     a usable one one "first-token attention bias: N values" line and an absent one none;
//   - llama_model_n_attn_ftb() == n_attn;
//   - llama_get_attn_ftb writes at most n values (a buffer of exactly n under AddressSanitizer);
//   - llama_set_attn_ftb returns 0 (NULL, or the right length and finite values: the bias becomes the clamped
//     values), -1 (wrong length) or -2 (a non-finite value), and leaves the bias unchanged on an error;
//   - llama_decode of a valid batch returns 0 and the logits are finite.
// Memory errors and undefined behaviour are AddressSanitizer's and UBSan's to report (build with
// -fsanitize=address,undefined and run with halt_on_error=1).
//
// Known findings (each reproduced with cpp/fuzz/load_decode.cpp; see benchmarks/results/fuzz.json). Inputs that
// reach one are counted and not loaded, so that a run goes on (ZT_FUZZ_SKIP_KNOWN=0 loads them: a crash):
//   K1 (upstream, stock llama.cpp too) {arch}.block_count 0 or > 512: GGML_ASSERT in load_hparams, an abort
//      instead of a refused load.
//   K2 (upstream, stock too) a llama-arch file with unequal per-layer head_count_kv: GGML_ASSERT in
//      ggml_set_rows at context creation. Not generated for the llama seed.
//   K3 (upstream, stock too) two equal token strings in tokenizer.ggml.tokens: GGML_ASSERT in llama_vocab's
//      load. Not generated (byte flips skip the tokenizer's keys).
//   K4 (this patch, fixed) a llama-arch file with unequal per-layer head_count values and a bias on aborted:
//      the bias view had hparams.n_head(il) values while the llama graph's Q has layer 0's head count. The
//      view now takes its length from Q; such files are loaded and checked like any other.
//   K5 (upstream, stock too; found 2026-12-06 by the 1,000,000 run) a norm epsilon below 0 or NaN
//      ({arch}.attention.layer_norm_rms_epsilon flipped to -1.9e20): the model loads, and the first decode hits
//      GGML_ASSERT(eps >= 0.0f) in ggml-cpu's rms_norm. gguf_meta refuses such files.
//   K6 (upstream, stock too; found 2026-12-06) {arch}.attention.head_count_kv flipped to 2147483650: the KV
//      width n_head_kv * head size is computed in uint32 and wraps to 32, the tensors' real width, so the
//      model loads, and the graph's ggml_reshape_3d asserts. gguf_meta refuses such files.
//   K7 (upstream, stock too; found 2026-12-06) {arch}.rope.freq_base not a positive finite number (flipped to
//      -5.2e38): the model loads and decodes, and every logit is NaN. Not a crash; gguf_meta refuses such files.
//   U1 (upstream ggml, UBSan) gguf.cpp loads a key/value's type byte into `enum gguf_type` before checking it:
//      "load of value N, which is not a valid value for type 'gguf_type'"; suppressed by cpp/fuzz/ubsan.supp.
//   U2 (upstream llama.cpp, UBSan) general.file_type is loaded into `enum llama_ftype` unchecked
//      (llama-model-loader.cpp print_info, llama-model.cpp): not flipped here.
//
// Seeds: the environment variable ZT_FUZZ_SEEDS (paths separated by ':'); ZT_FUZZ_WORK: a folder for the
// files when memfd_create is unavailable. The driver (fuzz_driver.cpp) sets both; with libFuzzer set them
// yourself.
#include "gguf.h"
#include "llama.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerInitialize(int * argc, char *** argv);
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size);
extern "C" void zt_fuzz_print_stats(FILE * out);

namespace {

// --- input bytes -----------------------------------------------------------------------------------------------

struct provider {
    const uint8_t * p;
    size_t n;

    uint8_t u8() {
        if (n == 0) {
            return 0;
        }
        --n;
        return *p++;
    }
    uint32_t u32() {
        uint32_t v = 0;
        for (int i = 0; i < 4; ++i) {
            v = (v << 8) | u8();
        }
        return v;
    }
    // an integer in [lo, hi]
    uint32_t range(uint32_t lo, uint32_t hi) {
        if (hi <= lo) {
            return lo;
        }
        const uint64_t span = (uint64_t) hi - lo + 1;
        const uint32_t r = span <= 256 ? u8() : u32();
        return lo + (uint32_t) (r % span);
    }
    bool one_in(uint32_t k) { return range(0, k - 1) == 0; }
    float raw_float() {
        const uint32_t bits = u32();
        float f;
        std::memcpy(&f, &bits, sizeof(f));
        return f;
    }
    // a value drawn to hit the interesting cases often
    float value() {
        switch (u8() % 12) {
            case 0: return std::numeric_limits<float>::quiet_NaN();
            case 1: return std::numeric_limits<float>::infinity();
            case 2: return -std::numeric_limits<float>::infinity();
            case 3: return raw_float();
            case 4: return (u8() & 1 ? 1.0f : -1.0f) * std::ldexp(1.0f, (int) range(0, 140) - 10); // up to 2^130
            case 5: return std::numeric_limits<float>::denorm_min();
            case 6: return -0.0f;
            case 7: return (u8() & 1 ? 1.0f : -1.0f) * 100.0f;
            default: return ((float) u8() - 128.0f) / 16.0f; // [-8, 8)
        }
    }
};

// --- logging ---------------------------------------------------------------------------------------------------

std::vector<std::string> g_log;  // lines of this run
std::string g_partial;

bool g_skip_known = true;  // ZT_FUZZ_SKIP_KNOWN=0: run the inputs of known findings too (to reproduce them)
bool g_verbose = false;  // ZT_FUZZ_VERBOSE=1: every input's description and llama.cpp's log on stderr

void log_cb(ggml_log_level /*level*/, const char * text, void * /*user*/) {
    if (g_verbose) {
        std::fputs(text, stderr);
    }
    g_partial += text;
    size_t pos;
    while ((pos = g_partial.find('\n')) != std::string::npos) {
        if (g_log.size() < 4000) {
            g_log.push_back(g_partial.substr(0, pos));
        }
        g_partial.erase(0, pos + 1);
    }
}

// lines containing needle and not without
int count_log(const char * needle, const char * without = nullptr) {
    int n = 0;
    for (const auto & line : g_log) {
        n += line.find(needle) != std::string::npos && (!without || line.find(without) == std::string::npos);
    }
    return n;
}

std::string g_what;  // a description of the current input, for failure messages

[[noreturn]] void fail(const char * file, int line, const char * cond, const char * fmt, ...) {
    std::fprintf(stderr, "\nfuzz check failed at %s:%d: %s\n  input: %s\n  ", file, line, cond, g_what.c_str());
    va_list ap;
    va_start(ap, fmt);
    std::vfprintf(stderr, fmt, ap);
    va_end(ap);
    std::fprintf(stderr, "\n  last log lines:\n");
    const size_t from = g_log.size() > 25 ? g_log.size() - 25 : 0;
    for (size_t i = from; i < g_log.size(); ++i) {
        std::fprintf(stderr, "    %s\n", g_log[i].c_str());
    }
    std::fflush(stderr);
    std::abort();
}

#define CHECK(cond, ...) \
    do { \
        if (!(cond)) { \
            fail(__FILE__, __LINE__, #cond, __VA_ARGS__); \
        } \
    } while (0)

// --- statistics ------------------------------------------------------------------------------------------------

struct stats_t {
    uint64_t runs = 0;
    uint64_t gguf_refused = 0;        // the gguf parser refused the file
    uint64_t known_k1 = 0;            // skipped: known finding K1 (see known_finding_of)
    uint64_t known_k2 = 0;            // skipped: known finding K2
    uint64_t known_k5 = 0;            // skipped: known finding K5 (a negative or NaN norm epsilon)
    uint64_t known_k6 = 0;            // skipped: known finding K6 (KV head count x head size past 2^32)
    uint64_t known_k7 = 0;            // skipped: known finding K7 (a rope base that gives NaN logits)
    uint64_t model_refused = 0;       // parsed, but llama.cpp refused the model
    uint64_t loaded = 0;
    uint64_t loaded_bias_on = 0;      // a stored bias was applied
    uint64_t loaded_bias_ignored = 0; // a bias key was present and ignored
    uint64_t loaded_no_key = 0;
    uint64_t per_layer_heads = 0;     // loaded with unequal per-layer head counts
    uint64_t ctx_refused = 0;
    uint64_t set_ok = 0;
    uint64_t set_off = 0;
    uint64_t set_wrong_length = 0;
    uint64_t set_not_finite = 0;
    uint64_t decodes = 0;
    uint64_t decodes_refused = 0;     // a batch llama.cpp refused with an error code (never a crash)
} g_stats;

// --- seeds -----------------------------------------------------------------------------------------------------

struct seed_model {
    std::string path;
    std::vector<uint8_t> bytes;
    size_t data_offset = 0;  // start of the tensor data section
    std::string arch;
    uint32_t n_layer = 0;
    // byte ranges byte flips go to: the header and every key/value but the tokenizer's (flipping the
    // vocabulary reaches upstream asserts of the tokenizer, e.g. duplicate tokens, not the bias) and
    // general.file_type (U2)
    std::vector<std::pair<size_t, size_t>> flip_ranges;
    size_t flip_bytes = 0;
};

// the byte ranges of a little-endian GGUF's header and non-tokenizer key/values (the seed is valid)
std::vector<std::pair<size_t, size_t>> flip_ranges_of(const std::vector<uint8_t> & b) {
    auto u64 = [&](size_t off) { uint64_t v; std::memcpy(&v, b.data() + off, 8); return v; };
    auto u32 = [&](size_t off) { uint32_t v; std::memcpy(&v, b.data() + off, 4); return v; };
    static const size_t scalar_size[] = { 1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8 };  // by gguf_type
    std::vector<std::pair<size_t, size_t>> out = { { 0, 24 } };
    size_t off = 24;
    const uint64_t n_kv = u64(16);
    for (uint64_t i = 0; i < n_kv; ++i) {
        const size_t start = off;
        const uint64_t klen = u64(off);
        const std::string key((const char *) b.data() + off + 8, klen);
        off += 8 + klen;
        const uint32_t type = u32(off);
        off += 4;
        auto skip = [&](uint32_t t) {
            if (t == GGUF_TYPE_STRING) {
                off += 8 + u64(off);
            } else {
                off += scalar_size[t];
            }
        };
        if (type == GGUF_TYPE_ARRAY) {
            const uint32_t sub = u32(off);
            const uint64_t n = u64(off + 4);
            off += 12;
            for (uint64_t j = 0; j < n; ++j) {
                skip(sub);
            }
        } else {
            skip(type);
        }
        // not general.file_type either: upstream reads it into `enum llama_ftype` unchecked (finding U2)
        if (key.rfind("tokenizer.", 0) != 0 && key != "general.file_type") {
            out.emplace_back(start, off);
        }
    }
    return out;
}

std::vector<seed_model> g_seeds;
std::string g_work;
bool g_initialized = false;

std::vector<uint8_t> read_file(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void init_once() {
    if (g_initialized) {
        return;
    }
    g_initialized = true;
    g_skip_known = !(std::getenv("ZT_FUZZ_SKIP_KNOWN") && std::strcmp(std::getenv("ZT_FUZZ_SKIP_KNOWN"), "0") == 0);
    g_verbose = std::getenv("ZT_FUZZ_VERBOSE") && std::strcmp(std::getenv("ZT_FUZZ_VERBOSE"), "1") == 0;
    llama_log_set(log_cb, nullptr);
    llama_backend_init();
    const char * seeds = std::getenv("ZT_FUZZ_SEEDS");
    const char * work = std::getenv("ZT_FUZZ_WORK");
    g_work = work ? work : "/tmp";
    std::string all = seeds ? seeds : "";
    size_t start = 0;
    while (start <= all.size()) {
        const size_t end = std::min(all.find(':', start), all.size());
        const std::string path = all.substr(start, end - start);
        start = end + 1;
        if (path.empty()) {
            continue;
        }
        seed_model s;
        s.path = path;
        s.bytes = read_file(path);
        gguf_init_params gp = { /*.no_alloc =*/ true, /*.ctx =*/ nullptr };
        gguf_context * g = gguf_init_from_file(path.c_str(), gp);
        if (!g || s.bytes.empty()) {
            std::fprintf(stderr, "fuzz: cannot read the seed model %s\n", path.c_str());
            std::exit(2);
        }
        s.data_offset = gguf_get_data_offset(g);
        s.arch = gguf_get_val_str(g, gguf_find_key(g, "general.architecture"));
        s.n_layer = gguf_get_val_u32(g, gguf_find_key(g, (s.arch + ".block_count").c_str()));
        s.flip_ranges = flip_ranges_of(s.bytes);
        for (const auto & [a, b] : s.flip_ranges) {
            s.flip_bytes += b - a;
        }
        gguf_free(g);
        g_seeds.push_back(std::move(s));
    }
    if (g_seeds.empty()) {
        std::fprintf(stderr, "fuzz: set ZT_FUZZ_SEEDS to the seed GGUF models (paths separated by ':')\n");
        std::exit(2);
    }
}

// --- the file under test ---------------------------------------------------------------------------------------

// the bytes as a file: a memfd (no disk I/O) or a file in the work folder
struct temp_file {
    int fd = -1;
    std::string path;

    explicit temp_file(const std::vector<uint8_t> & bytes) {
#ifdef MFD_CLOEXEC
        fd = memfd_create("zt-fuzz.gguf", MFD_CLOEXEC);
#endif
        if (fd >= 0) {
            path = "/proc/self/fd/" + std::to_string(fd);
        } else {
            path = g_work + "/zt-fuzz-" + std::to_string(getpid()) + ".gguf";
            fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
            CHECK(fd >= 0, "cannot create %s", path.c_str());
        }
        size_t done = 0;
        while (done < bytes.size()) {
            const ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
            CHECK(w > 0, "write failed");
            done += (size_t) w;
        }
    }
    ~temp_file() {
        ::close(fd);
        if (path.rfind("/proc/self/fd/", 0) != 0) {
            ::unlink(path.c_str());
        }
    }
};

std::string bias_key(const std::string & arch) { return arch + ".attention.first_token_bias"; }

void set_array_or_scalar(gguf_context * g, const std::string & key, provider & in, uint32_t n_layer, uint32_t max_value,
                         bool arrays = true) {
    if (!arrays || in.one_in(3)) {
        gguf_set_val_u32(g, key.c_str(), in.range(0, max_value));
        return;
    }
    uint32_t n = n_layer;
    if (in.one_in(6)) {
        n = in.range(0, n_layer + 2);  // a wrong length now and then
    }
    std::vector<uint32_t> v(n);
    for (auto & x : v) {
        x = in.one_in(16) ? in.u32() : in.range(0, max_value);
    }
    gguf_set_arr_data(g, key.c_str(), in.one_in(5) ? GGUF_TYPE_INT32 : GGUF_TYPE_UINT32, v.data(), v.size());
}

// the seed with its metadata edited as the input says
std::vector<uint8_t> edited_model(const seed_model & seed, provider & in) {
    gguf_init_params gp = { /*.no_alloc =*/ true, /*.ctx =*/ nullptr };
    gguf_context * g = gguf_init_from_file(seed.path.c_str(), gp);
    CHECK(g != nullptr, "the seed %s does not parse", seed.path.c_str());
    const std::string arch = seed.arch;
    const std::string key = bias_key(arch);
    const uint32_t n_layer = seed.n_layer;

    // the hyperparameters the bias length depends on
    uint32_t n_head_max = 0;
    {
        const int64_t kid = gguf_find_key(g, (arch + ".attention.head_count").c_str());
        if (gguf_get_kv_type(g, kid) == GGUF_TYPE_ARRAY) {
            const uint32_t * h = (const uint32_t *) gguf_get_arr_data(g, kid);
            for (size_t i = 0; i < gguf_get_arr_n(g, kid); ++i) {
                n_head_max = std::max(n_head_max, h[i]);
            }
        } else {
            n_head_max = gguf_get_val_u32(g, kid);
        }
    }
    if (in.one_in(4)) {
        g_what += " head_count";
        set_array_or_scalar(g, arch + ".attention.head_count", in, n_layer, 8);
    }
    if (in.one_in(5)) {
        g_what += " head_count_kv";
        // per-layer KV head counts only where the architecture has them: the llama graph with unequal ones hits
        // an upstream GGML_ASSERT in ggml_set_rows (stock llama.cpp too; reported separately)
        set_array_or_scalar(g, arch + ".attention.head_count_kv", in, n_layer, 4, arch != "llama");
    }
    if (in.one_in(10)) {
        g_what += " block_count";
        gguf_set_val_u32(g, (arch + ".block_count").c_str(), in.one_in(4) ? in.u32() : in.range(0, n_layer + 2));
    }
    if (in.one_in(12)) {
        g_what += " key_length";
        gguf_set_val_u32(g, (arch + ".attention.key_length").c_str(), in.range(0, 64));
    }

    const size_t n_exp = (size_t) n_layer*n_head_max;
    const uint8_t kind = in.u8() % 16;
    gguf_remove_key(g, key.c_str());
    if (kind == 0) {
        g_what += " bias:absent";
    } else if (kind <= 8) {
        size_t n = n_exp;
        switch (in.u8() % 10) {
            case 0: n = n_exp - 1; break;
            case 1: n = n_exp + 1; break;
            case 2: n = 0; break;
            case 3: n = 1; break;
            case 4: n = in.range(0, 4096); break;
            // 16 MiB (rare: the loader formats every value of a key for its log line, seconds under ASan) / 256 KiB
            case 5: n = in.one_in(64) ? (size_t) 1 << 22 : (size_t) 1 << 16; break;
            default: break;
        }
        std::vector<float> v(n);
        const uint8_t how = in.u8() % 4;
        for (size_t i = 0; i < n; ++i) {
            if (i >= 4096 && in.n == 0) {
                v[i] = (float) (i % 7) - 3.0f;  // the input is used up: cheap finite values
            } else if (how == 0) {
                v[i] = in.raw_float();
            } else if (how <= 2) {
                v[i] = ((float) in.u8() - 128.0f) / 32.0f;
            } else {
                v[i] = in.value();
            }
        }
        g_what += " bias:f32[" + std::to_string(n) + "]";
        gguf_set_arr_data(g, key.c_str(), GGUF_TYPE_FLOAT32, v.data(), v.size());
    } else if (kind == 9) {
        g_what += " bias:f32-scalar";
        gguf_set_val_f32(g, key.c_str(), in.value());
    } else if (kind == 10) {
        g_what += " bias:i32[]";
        std::vector<int32_t> v(n_exp);
        for (auto & x : v) {
            x = (int32_t) in.u32();
        }
        gguf_set_arr_data(g, key.c_str(), GGUF_TYPE_INT32, v.data(), v.size());
    } else if (kind == 11) {
        g_what += " bias:f64[]";
        std::vector<double> v(n_exp);
        for (auto & x : v) {
            x = in.value();
        }
        gguf_set_arr_data(g, key.c_str(), GGUF_TYPE_FLOAT64, v.data(), v.size());
    } else if (kind == 12) {
        g_what += " bias:bool[]";
        std::vector<int8_t> v(n_exp);
        for (auto & x : v) {
            x = (int8_t) (in.u8() & 1);
        }
        gguf_set_arr_data(g, key.c_str(), GGUF_TYPE_BOOL, v.data(), v.size());
    } else if (kind == 13) {
        g_what += " bias:str[]";
        std::vector<std::string> s(n_exp);
        std::vector<const char *> p(n_exp);
        for (size_t i = 0; i < n_exp; ++i) {
            s[i] = std::to_string(in.value());
            p[i] = s[i].c_str();
        }
        gguf_set_arr_str(g, key.c_str(), p.data(), p.size());
    } else if (kind == 14) {
        g_what += " bias:string";
        gguf_set_val_str(g, key.c_str(), "0.5");
    } else {
        g_what += " bias:u8[]";
        std::vector<uint8_t> v(n_exp);
        for (auto & x : v) {
            x = in.u8();
        }
        gguf_set_arr_data(g, key.c_str(), GGUF_TYPE_UINT8, v.data(), v.size());
    }
    if (in.one_in(8)) {
        g_what += " stale-key";
        const float v[2] = { 1.0f, 2.0f };
        gguf_set_arr_data(g, "other.attention.first_token_bias", GGUF_TYPE_FLOAT32, v, 2);
    }

    // the new metadata, then the seed's tensor data unchanged (tensor offsets are relative to the data section)
    std::vector<uint8_t> out(gguf_get_meta_size(g));
    gguf_get_meta_data(g, out.data());
    gguf_free(g);
    out.insert(out.end(), seed.bytes.begin() + (ptrdiff_t) seed.data_offset, seed.bytes.end());
    return out;
}

// --- what the loader must do with a file -----------------------------------------------------------------------

struct expectation {
    bool parses = false;            // gguf_init_from_file accepts it
    int known_finding = 0;          // the file reaches a known crash (see known_finding_of): not loaded
    bool known = false;             // the hyperparameters are readable by the loader's rules
    size_t n_attn = 0;              // n_layer * max n_head
    bool heads_differ = false;
    enum { NONE, VALID, INVALID } bias = NONE;
    std::vector<float> values;      // VALID: the clamped values
};

// head counts as llama_model_loader::get_key_or_arr reads them: one UINT32, or an array of n_layer UINT32/INT32;
// missing: 0 (out keeps its size n_layer); false if the loader would refuse the key
bool per_layer(const gguf_context * g, const std::string & key, uint32_t n_layer, std::vector<uint32_t> & out) {
    out.resize(n_layer, 0);
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) {
        return true;
    }
    if (gguf_get_kv_type(g, id) == GGUF_TYPE_UINT32) {
        std::fill(out.begin(), out.end(), gguf_get_val_u32(g, id));
        return true;
    }
    if (gguf_get_kv_type(g, id) == GGUF_TYPE_ARRAY && gguf_get_arr_n(g, id) == n_layer &&
        (gguf_get_arr_type(g, id) == GGUF_TYPE_UINT32 || gguf_get_arr_type(g, id) == GGUF_TYPE_INT32)) {
        const uint32_t * h = (const uint32_t *) gguf_get_arr_data(g, id);
        std::copy(h, h + n_layer, out.begin());
        return true;
    }
    return false;
}

bool read_u32_key(const gguf_context * g, const std::string & key, uint32_t & out) {
    const int64_t kid = gguf_find_key(g, key.c_str());
    if (kid < 0 || gguf_get_kv_type(g, kid) != GGUF_TYPE_UINT32) {
        return false;
    }
    out = gguf_get_val_u32(g, kid);
    return true;
}

expectation expect_of(const std::string & path) {
    expectation e;
    gguf_init_params gp = { /*.no_alloc =*/ true, /*.ctx =*/ nullptr };
    gguf_context * g = gguf_init_from_file(path.c_str(), gp);
    if (!g) {
        return e;
    }
    e.parses = true;
    const int64_t arch_id = gguf_find_key(g, "general.architecture");
    if (arch_id < 0 || gguf_get_kv_type(g, arch_id) != GGUF_TYPE_STRING) {
        gguf_free(g);
        return e;
    }
    const std::string arch = gguf_get_val_str(g, arch_id);
    uint32_t n_layer = 0;
    if (!read_u32_key(g, arch + ".block_count", n_layer) || n_layer == 0 || n_layer > 512) {
        if (gguf_find_key(g, (arch + ".block_count").c_str()) >= 0 && (n_layer == 0 || n_layer > 512)) {
            e.known_finding = 1;
        }
        gguf_free(g);
        return e;
    }
    std::vector<uint32_t> heads, heads_kv;
    if (!per_layer(g, arch + ".attention.head_count", n_layer, heads)) {
        gguf_free(g);
        return e;
    }
    heads_kv = heads;  // the loader's default
    const bool kv_ok = per_layer(g, arch + ".attention.head_count_kv", n_layer, heads_kv);
    auto differ = [](const std::vector<uint32_t> & v) {
        return !v.empty() && *std::min_element(v.begin(), v.end()) != *std::max_element(v.begin(), v.end());
    };
    if (arch == "llama" && kv_ok && differ(heads_kv)) {
        e.known_finding = 2;
    }
    // K5: a norm epsilon below 0 or NaN reaches GGML_ASSERT(eps >= 0.0f) in the first decode
    for (const char * k : { ".attention.layer_norm_rms_epsilon", ".attention.layer_norm_epsilon" }) {
        const int64_t id = gguf_find_key(g, (arch + k).c_str());
        if (id >= 0 && gguf_get_kv_type(g, id) == GGUF_TYPE_FLOAT32 && !(gguf_get_val_f32(g, id) >= 0.0f)) {
            e.known_finding = 5;
        }
    }
    // K7: a rope frequency base that is not a positive finite number: the model loads and decodes, and every
    // logit is NaN (nothing checks it upstream)
    for (const char * k : { ".rope.freq_base", ".rope.freq_base_swa" }) {
        const int64_t id = gguf_find_key(g, (arch + k).c_str());
        if (id >= 0 && gguf_get_kv_type(g, id) == GGUF_TYPE_FLOAT32) {
            const float base = gguf_get_val_f32(g, id);
            if (!(std::isfinite(base) && base > 0.0f)) {
                e.known_finding = 7;
            }
        }
    }
    // K6: the KV width n_head_kv * head size is computed in uint32: past 2^32 it wraps to a width the tensors
    // have, and the graph's reshape asserts
    {
        uint32_t n_embd = 0, k_len = 0, v_len = 0;
        read_u32_key(g, arch + ".embedding_length", n_embd);
        for (uint32_t il = 0; kv_ok && il < n_layer; ++il) {
            const uint32_t dflt = heads[il] ? n_embd / heads[il] : 0;
            const uint64_t k = read_u32_key(g, arch + ".attention.key_length", k_len) ? k_len : dflt;
            const uint64_t v = read_u32_key(g, arch + ".attention.value_length", v_len) ? v_len : dflt;
            if ((uint64_t) heads_kv[il] * std::max(k, v) > UINT32_MAX || (uint64_t) heads[il] * std::max(k, v) > UINT32_MAX) {
                e.known_finding = 6;
            }
        }
    }
    e.known = true;
    const uint32_t n_head_max = heads.empty() ? 0 : *std::max_element(heads.begin(), heads.end());
    e.heads_differ = differ(heads);
    e.n_attn = (size_t) n_layer*n_head_max;
    if (e.n_attn > (size_t) (1 << 20)) {
        e.n_attn = 0;  // LLAMA_MAX_ATTN_FTB: no bias for head counts no real model has
    }

    const int64_t kid = gguf_find_key(g, bias_key(arch).c_str());
    if (kid >= 0) {
        e.bias = expectation::INVALID;
        if (e.n_attn > 0 && gguf_get_kv_type(g, kid) == GGUF_TYPE_ARRAY && gguf_get_arr_type(g, kid) == GGUF_TYPE_FLOAT32 &&
            gguf_get_arr_n(g, kid) == e.n_attn) {
            const float * v = (const float *) gguf_get_arr_data(g, kid);
            if (std::all_of(v, v + e.n_attn, [](float x) { return std::isfinite(x); })) {
                e.bias = expectation::VALID;
                e.values.resize(e.n_attn);
                for (size_t i = 0; i < e.n_attn; ++i) {
                    e.values[i] = std::min(100.0f, std::max(-100.0f, v[i]));
                }
            }
        }
    }
    gguf_free(g);
    return e;
}

// --- the context under test ------------------------------------------------------------------------------------

std::vector<float> get_bias(llama_context * ctx, int32_t n_attn) {
    const int32_t n = llama_get_attn_ftb(ctx, nullptr, 0);
    CHECK(n == 0 || n == n_attn, "llama_get_attn_ftb returned %d, n_attn_ftb is %d", n, n_attn);
    std::vector<float> out((size_t) n);
    if (n > 0) {
        // a buffer of exactly n values: AddressSanitizer catches a write past it
        std::vector<float> * heap = new std::vector<float>((size_t) n);
        CHECK(llama_get_attn_ftb(ctx, heap->data(), heap->size()) == n, "llama_get_attn_ftb changed its length");
        out = *heap;
        delete heap;
        // a shorter buffer: only that much is written
        const size_t k = (size_t) n / 2;
        std::vector<float> part(k + 1, 12345.0f);
        CHECK(llama_get_attn_ftb(ctx, part.data(), k) == n, "llama_get_attn_ftb(k) returned another length");
        CHECK(part[k] == 12345.0f, "llama_get_attn_ftb wrote past the %zu values it was given", k);
        CHECK(std::equal(part.begin(), part.begin() + (ptrdiff_t) k, out.begin()), "partial copy differs");
    }
    for (float x : out) {
        CHECK(std::isfinite(x) && x >= -100.0f && x <= 100.0f, "a bias value %g is outside [-100, 100]", x);
    }
    return out;
}

bool same(const std::vector<float> & a, const std::vector<float> & b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// decode n_tokens tokens of n_seqs sequences (positions from pos0); true if llama_decode returned 0
bool decode(llama_context * ctx, const llama_vocab * vocab, provider & in, int n_seqs, int n_tokens, int pos0) {
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    llama_batch batch = llama_batch_init(n_tokens * n_seqs, 0, 1);
    for (int s = 0; s < n_seqs; ++s) {
        for (int i = 0; i < n_tokens; ++i) {
            const int j = batch.n_tokens++;
            const llama_token bos = llama_vocab_bos(vocab);
            batch.token[j] = (i == 0 && pos0 == 0 && bos >= 0) ? bos : (llama_token) in.range(0, (uint32_t) n_vocab - 1);
            batch.pos[j] = pos0 + i;
            batch.n_seq_id[j] = 1;
            batch.seq_id[j][0] = s;
            batch.logits[j] = i == n_tokens - 1;
        }
    }
    const int32_t rc = llama_decode(ctx, batch);
    ++g_stats.decodes;
    bool ok = rc == 0;
    if (ok) {
        for (int s = 0; s < n_seqs; ++s) {
            const float * logits = llama_get_logits_ith(ctx, (s + 1) * n_tokens - 1);
            CHECK(logits != nullptr, "no logits after a successful decode");
            for (int32_t t = 0; t < n_vocab; ++t) {
                CHECK(std::isfinite(logits[t]), "logit %d of sequence %d is %g", t, s, logits[t]);
            }
        }
    } else {
        ++g_stats.decodes_refused;
    }
    llama_batch_free(batch);
    return ok;
}

void exercise_context(llama_model * model, provider & in, const expectation & e) {
    const int32_t n_attn = llama_model_n_attn_ftb(model);
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 64;
    cp.n_batch = 16;
    cp.n_ubatch = 16;
    cp.n_seq_max = in.one_in(3) ? 2 : 1;
    cp.kv_unified = in.one_in(2);
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    cp.no_perf = true;
    cp.flash_attn_type = in.one_in(2) ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        ++g_stats.ctx_refused;
        return;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);

    std::vector<float> cur = get_bias(ctx, n_attn);
    if (e.known) {
        if (e.bias == expectation::VALID) {
            CHECK(same(cur, e.values), "the context's bias (%zu values) is not the stored one (%zu values)", cur.size(), e.values.size());
        } else {
            CHECK(cur.empty(), "a bias of %zu values is on, but the stored key is %s", cur.size(),
                  e.bias == expectation::NONE ? "absent" : "unusable");
        }
    }
    const bool valid_model = e.known && e.n_attn > 0;
    const int n_seqs = (int) cp.n_seq_max;
    bool ok = decode(ctx, vocab, in, n_seqs, 2, 0);
    CHECK(ok || !valid_model, "llama_decode of 2 tokens failed");

    const int n_set = 1 + (int) in.range(0, 2);
    for (int k = 0; k < n_set; ++k) {
        const uint8_t how = in.u8() % 8;
        if (how == 0) {
            CHECK(llama_set_attn_ftb(ctx, nullptr, in.range(0, 100)) == 0, "llama_set_attn_ftb(NULL) failed");
            CHECK(get_bias(ctx, n_attn).empty(), "the bias is still on after llama_set_attn_ftb(NULL)");
            cur.clear();
            ++g_stats.set_off;
            continue;
        }
        size_t n = n_attn > 0 ? (size_t) n_attn : 0;
        if (how == 1) {
            n = n + 1;
        } else if (how == 2) {
            n = n > 0 ? n - 1 : 1;
        } else if (how == 3) {
            n = in.range(0, 64);
        }
        // the values in a heap buffer of exactly n floats
        float * values = new float[n ? n : 1];
        bool finite = true;
        for (size_t i = 0; i < n; ++i) {
            values[i] = how == 4 ? in.raw_float() : how == 5 ? in.value() : ((float) in.u8() - 128.0f) / 8.0f;
            finite = finite && std::isfinite(values[i]);
        }
        const int32_t want = (n_attn <= 0 || n != (size_t) n_attn) ? -1 : (finite ? 0 : -2);
        const int32_t rc = llama_set_attn_ftb(ctx, values, n);
        CHECK(rc == want, "llama_set_attn_ftb(%zu values, finite=%d) returned %d, expected %d", n, (int) finite, rc, want);
        const std::vector<float> now = get_bias(ctx, n_attn);
        if (rc == 0) {
            std::vector<float> clamped(values, values + n);
            for (auto & x : clamped) {
                x = std::min(100.0f, std::max(-100.0f, x));
            }
            CHECK(same(now, clamped), "the bias read back differs from the values set");
            cur = clamped;
            ++g_stats.set_ok;
        } else {
            CHECK(same(now, cur), "a refused llama_set_attn_ftb changed the bias");
            ++(rc == -1 ? g_stats.set_wrong_length : g_stats.set_not_finite);
        }
        delete[] values;
    }

    llama_memory_clear(llama_get_memory(ctx), true);
    if (in.one_in(4)) {
        // a sequence that does not start at position 0 (no first-token cell): refused or run, never a crash
        decode(ctx, vocab, in, 1, 3, (int) in.range(1, 40));
    } else {
        ok = decode(ctx, vocab, in, n_seqs, 1 + (int) in.range(0, 6), 0);
        CHECK(ok || !valid_model, "llama_decode after the setter calls failed");
    }
    llama_free(ctx);
}

} // namespace

extern "C" int LLVMFuzzerInitialize(int * /*argc*/, char *** /*argv*/) {
    init_once();
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    init_once();
    ++g_stats.runs;
    g_log.clear();
    g_partial.clear();
    provider in{ data, size };

    const seed_model & seed = g_seeds[in.u8() % g_seeds.size()];
    const uint8_t mode = in.u8() % 10;
    g_what = seed.arch + " mode " + std::to_string(mode) + ":";
    std::vector<uint8_t> bytes;
    if (mode <= 6) {
        bytes = edited_model(seed, in);
        if (mode == 6) {
            const size_t cut = in.range(0, (uint32_t) bytes.size());
            g_what += " truncated@" + std::to_string(cut);
            bytes.resize(cut);
        }
    } else if (mode <= 8) {
        bytes = seed.bytes;
        const int n_flips = 1 + (int) in.range(0, 7);
        for (int i = 0; i < n_flips; ++i) {
            // the k-th byte of the flip ranges
            size_t k = in.range(0, (uint32_t) seed.flip_bytes - 1), at = 0;
            for (const auto & [a, b] : seed.flip_ranges) {
                if (k < b - a) {
                    at = a + k;
                    break;
                }
                k -= b - a;
            }
            bytes[at] = mode == 7 ? (uint8_t) (bytes[at] ^ (1u << (in.u8() % 8))) : in.u8();
            g_what += " flip@" + std::to_string(at);
        }
    } else {
        const uint8_t header[8] = { 'G', 'G', 'U', 'F', 3, 0, 0, 0 };
        bytes.assign(header, header + 8);
        bytes.insert(bytes.end(), in.p, in.p + in.n);
        in.n = 0;
        g_what += " raw";
    }

    if (g_verbose) {
        std::fprintf(stderr, "fuzz input: %s (%zu bytes)\n", g_what.c_str(), bytes.size());
    }
    temp_file file(bytes);
    const expectation e = expect_of(file.path);
    g_log.clear();
    if (e.known_finding && g_skip_known) {
        // a known crash (known_finding_of), reported separately: not loaded, so that the run goes on
        ++(e.known_finding == 1 ? g_stats.known_k1 : e.known_finding == 2 ? g_stats.known_k2
           : e.known_finding == 5 ? g_stats.known_k5 : e.known_finding == 6 ? g_stats.known_k6 : g_stats.known_k7);
        return 0;
    }

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(file.path.c_str(), mp);
    if (!e.parses) {
        CHECK(model == nullptr, "a file the gguf parser refuses was loaded");
        ++g_stats.gguf_refused;
        return 0;
    }
    if (!model) {
        ++g_stats.model_refused;
        return 0;
    }
    ++g_stats.loaded;

    const int n_ignored = count_log("ignoring the first-token attention bias");
    const int n_applied = count_log("first-token attention bias: ", "ignoring");
    if (e.known) {
        CHECK((size_t) llama_model_n_attn_ftb(model) == e.n_attn, "llama_model_n_attn_ftb = %d, expected %zu",
              llama_model_n_attn_ftb(model), e.n_attn);
        if (e.bias == expectation::VALID) {
            CHECK(n_applied == 1 && n_ignored == 0, "a usable bias gave %d applied and %d ignored log lines", n_applied, n_ignored);
            ++g_stats.loaded_bias_on;
        } else if (e.bias == expectation::INVALID) {
            CHECK(n_ignored == 1 && n_applied == 0, "an unusable bias gave %d ignored and %d applied log lines", n_ignored, n_applied);
            ++g_stats.loaded_bias_ignored;
        } else {
            CHECK(n_ignored == 0 && n_applied == 0, "no bias key, yet %d/%d bias log lines", n_ignored, n_applied);
            ++g_stats.loaded_no_key;
        }
        g_stats.per_layer_heads += e.heads_differ;
    }
    exercise_context(model, in, e);
    llama_model_free(model);
    return 0;
}

extern "C" void zt_fuzz_print_stats(FILE * out) {
    const auto & s = g_stats;
    std::fprintf(out, "stat runs %" PRIu64 "\n", s.runs);
    std::fprintf(out, "stat gguf_refused %" PRIu64 "\n", s.gguf_refused);
    std::fprintf(out, "stat skipped_known_k1_block_count %" PRIu64 "\n", s.known_k1);
    std::fprintf(out, "stat skipped_known_k2_llama_per_layer_kv_heads %" PRIu64 "\n", s.known_k2);
    std::fprintf(out, "stat skipped_known_k5_norm_eps %" PRIu64 "\n", s.known_k5);
    std::fprintf(out, "stat skipped_known_k6_kv_width_overflow %" PRIu64 "\n", s.known_k6);
    std::fprintf(out, "stat skipped_known_k7_rope_base_nan_logits %" PRIu64 "\n", s.known_k7);
    std::fprintf(out, "stat model_refused %" PRIu64 "\n", s.model_refused);
    std::fprintf(out, "stat loaded %" PRIu64 "\n", s.loaded);
    std::fprintf(out, "stat loaded_bias_on %" PRIu64 "\n", s.loaded_bias_on);
    std::fprintf(out, "stat loaded_bias_ignored %" PRIu64 "\n", s.loaded_bias_ignored);
    std::fprintf(out, "stat loaded_no_key %" PRIu64 "\n", s.loaded_no_key);
    std::fprintf(out, "stat loaded_per_layer_heads %" PRIu64 "\n", s.per_layer_heads);
    std::fprintf(out, "stat ctx_refused %" PRIu64 "\n", s.ctx_refused);
    std::fprintf(out, "stat set_ok %" PRIu64 "\n", s.set_ok);
    std::fprintf(out, "stat set_off %" PRIu64 "\n", s.set_off);
    std::fprintf(out, "stat set_wrong_length %" PRIu64 "\n", s.set_wrong_length);
    std::fprintf(out, "stat set_not_finite %" PRIu64 "\n", s.set_not_finite);
    std::fprintf(out, "stat decodes %" PRIu64 "\n", s.decodes);
    std::fprintf(out, "stat decodes_refused %" PRIu64 "\n", s.decodes_refused);
}
