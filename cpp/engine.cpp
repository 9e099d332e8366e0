#include "engine.h"

#include <stdexcept>

#include "gguf.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <mutex>

namespace zt {

// ---------------------------------------------------------------------------------------------
// logging: llama.cpp's INFO/DEBUG output is hidden; errors and the first-token bias warnings are
// shown (ZT_GGUF_LOG=debug shows everything)

static void log_callback(ggml_log_level level, const char * text, void * /*user_data*/) {
    static const bool verbose = [] {
        const char * v = std::getenv("ZT_GGUF_LOG");
        return v && std::strcmp(v, "debug") == 0;
    }();
    static ggml_log_level last = GGML_LOG_LEVEL_NONE;
    if (level != GGML_LOG_LEVEL_CONT) {
        last = level;
    }
    const bool show = verbose || last == GGML_LOG_LEVEL_ERROR ||
        (last == GGML_LOG_LEVEL_WARN && std::strstr(text, "first-token") != nullptr);
    if (show) {
        std::fputs(text, stderr);
    }
}

static void backend_init() {
    static std::once_flag once;
    std::call_once(once, [] {
        llama_log_set(log_callback, nullptr);
        llama_backend_init();
    });
}

static std::string meta_str(const llama_model * m, const char * key) {
    char buf[512];
    const int32_t n = llama_model_meta_val_str(m, key, buf, sizeof(buf));
    return n < 0 ? std::string() : std::string(buf);
}

// ---------------------------------------------------------------------------------------------
// model

model::model(const std::string & path, int32_t n_gpu_layers) {
    backend_init();

    {
        std::ifstream f(path, std::ios::binary);
        if (!f) {
            throw error(path + ": cannot open the file");
        }
        char magic[4] = {};
        f.read(magic, 4);
        if (f.gcount() != 4 || std::memcmp(magic, "GGUF", 4) != 0) {
            throw error(path + ": not a GGUF file");
        }
    }

    // read the architecture first, so that a load failure can name it
    std::string arch;
    {
        gguf_init_params gp = { /*.no_alloc =*/ true, /*.ctx =*/ nullptr };
        gguf_context * g = gguf_init_from_file(path.c_str(), gp);
        if (!g) {
            throw error(path + ": invalid or truncated GGUF file");
        }
        const int64_t kid = gguf_find_key(g, "general.architecture");
        if (kid >= 0 && gguf_get_kv_type(g, kid) == GGUF_TYPE_STRING) {
            arch = gguf_get_val_str(g, kid);
        }
        gguf_free(g);
    }

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = n_gpu_layers < 0 ? -1 : n_gpu_layers;
    model_ = llama_model_load_from_file(path.c_str(), mp);
    if (!model_) {
        throw error(path + ": llama.cpp cannot load this model" +
                (arch.empty() ? std::string(" (no general.architecture)") : " (architecture '" + arch + "')"));
    }
    vocab_ = llama_model_get_vocab(model_);

    info_.arch        = arch;
    info_.name        = meta_str(model_, "general.name");
    info_.n_layer     = llama_model_n_layer(model_);
    info_.n_ftb       = llama_model_n_attn_ftb(model_);
    info_.n_head      = info_.n_layer > 0 ? info_.n_ftb / info_.n_layer : 0;
    info_.n_head_kv   = llama_model_n_head_kv(model_);
    info_.n_embd      = llama_model_n_embd(model_);
    info_.n_vocab     = llama_vocab_n_tokens(vocab_);
    info_.n_ctx_train = llama_model_n_ctx_train(model_);
    info_.add_bos     = llama_vocab_get_add_bos(vocab_);
    info_.bos         = llama_vocab_bos(vocab_);
    info_.eos         = llama_vocab_eos(vocab_);

    // llama.cpp offloads to every GPU device of the build (the default device list of llama_model_params)
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        const enum ggml_backend_dev_type t = ggml_backend_dev_type(dev);
        if (t == GGML_BACKEND_DEVICE_TYPE_GPU || t == GGML_BACKEND_DEVICE_TYPE_IGPU) {
            info_.gpu_devices.push_back(ggml_backend_dev_name(dev));
        }
    }
    if (info_.gpu_devices.empty() || n_gpu_layers == 0) {
        info_.gpu_devices.clear();
        info_.n_gpu_layers = 0;
    } else {
        info_.n_gpu_layers = n_gpu_layers < 0 ? info_.n_layer : std::min(n_gpu_layers, info_.n_layer);
    }

    if (llama_model_has_encoder(model_) || info_.n_ftb <= 0) {
        llama_model_free(model_);
        model_ = nullptr;
        throw error(path + ": unsupported model (architecture '" + arch + "'): zt-gguf needs a decoder-only attention model " +
                "with at most 1048576 (layer, head) pairs");
    }
}

model::~model() {
    if (model_) {
        llama_model_free(model_);
    }
}

std::vector<llama_token> model::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    // the key: both flags, then the text
    std::string key(1, (char) ('0' + (add_special ? 1 : 0) + (parse_special ? 2 : 0)));
    key += text;
    {
        std::lock_guard<std::mutex> lock(tokenize_mutex_);
        auto it = tokenize_cache_.find(key);
        if (it != tokenize_cache_.end()) {
            return it->second;
        }
    }
    std::vector<llama_token> res = tokenize_uncached(text, add_special, parse_special);
    const size_t bytes = key.size() + res.size() * sizeof(llama_token) + 64;
    std::lock_guard<std::mutex> lock(tokenize_mutex_);
    if (tokenize_cache_bytes_ + bytes > tokenize_cache_max_bytes) {
        tokenize_cache_.clear();
        tokenize_cache_bytes_ = 0;
    }
    if (tokenize_cache_.emplace(std::move(key), res).second) {
        tokenize_cache_bytes_ += bytes;
    }
    return res;
}

size_t model::tokenize_cache_size() const {
    std::lock_guard<std::mutex> lock(tokenize_mutex_);
    return tokenize_cache_.size();
}

void model::clear_tokenize_cache() const {
    std::lock_guard<std::mutex> lock(tokenize_mutex_);
    tokenize_cache_.clear();
    tokenize_cache_bytes_ = 0;
}

std::vector<llama_token> model::tokenize_uncached(const std::string & text, bool add_special, bool parse_special) const {
    std::vector<llama_token> res(text.size() + 8);
    int32_t n = 0;
    try {
        n = llama_tokenize(vocab_, text.data(), (int32_t) text.size(), res.data(), (int32_t) res.size(), add_special, parse_special);
        if (n < 0) {
            res.resize(-n);
            n = llama_tokenize(vocab_, text.data(), (int32_t) text.size(), res.data(), (int32_t) res.size(), add_special, parse_special);
        }
    } catch (const std::out_of_range &) {
        // an SPM vocabulary without the <0xXX> byte tokens cannot spell a character it has no token for
        throw error("tokenization failed: the vocabulary has no token for a byte of the text (no <0xXX> byte tokens)");
    }
    if (n < 0) {
        throw error("tokenization failed");
    }
    res.resize(n);
    return res;
}

std::string model::token_to_piece(llama_token token) const {
    char buf[256];
    int32_t n = llama_token_to_piece(vocab_, token, buf, sizeof(buf), 0, false);
    if (n < 0) {
        std::string big(-n, '\0');
        n = llama_token_to_piece(vocab_, token, big.data(), (int32_t) big.size(), 0, false);
        return n < 0 ? std::string() : big.substr(0, n);
    }
    return std::string(buf, n);
}

std::string model::detokenize(const std::vector<llama_token> & tokens) const {
    std::string res;
    for (llama_token t : tokens) {
        res += token_to_piece(t);
    }
    return res;
}

bool model::is_eog(llama_token token) const {
    return llama_vocab_is_eog(vocab_, token);
}

// ---------------------------------------------------------------------------------------------
// logits helpers

struct dist_stats {
    double lse;     // log-sum-exp over the vocabulary
    double entropy; // nats
    llama_token argmax;
};

// exp(x) for x <= 0 in float: Cody-Waite reduction by ln 2 and the Cephes polynomial (about 2 ulp), with
// arithmetic only, so that the loops below vectorise (std::exp is a libm call per element)
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x; // exp(-87) is still a normal float; smaller terms do not change a sum
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; // round to nearest
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t) n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

// max, sum of exp(x - max) and sum of exp(x - max)*(x - max) over a row: 16 float lanes, which the compiler
// vectorises, folded into doubles every 1024 values to bound the rounding of long rows
struct row_sums {
    float  max;
    double sum;
    double sum_px;
};

static constexpr int32_t LANES = 16;

static float row_max(const float * x, int32_t n) {
    float m[LANES];
    std::fill(m, m + LANES, -INFINITY);
    int32_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        for (int32_t l = 0; l < LANES; ++l) {
            m[l] = m[l] > x[i + l] ? m[l] : x[i + l];
        }
    }
    float res = *std::max_element(m, m + LANES);
    for (; i < n; ++i) {
        res = std::max(res, x[i]);
    }
    return res;
}

template <bool with_px>
static row_sums row_exp_sums(const float * x, int32_t n) {
    const float mx = row_max(x, n);
    double sum = 0.0, sum_px = 0.0;
    int32_t i = 0;
    while (i + LANES <= n) {
        float s[LANES] = {}, sp[LANES] = {};
        const int32_t end = std::min(n - n % LANES, i + 1024);
        for (; i < end; i += LANES) {
            for (int32_t l = 0; l < LANES; ++l) {
                const float d = std::max(x[i + l] - mx, -87.0f); // a -inf logit adds 0, not 0 * -inf
                const float e = exp_nonpos(d);
                s[l] += e;
                if (with_px) {
                    sp[l] += e * d;
                }
            }
        }
        for (int32_t l = 0; l < LANES; ++l) {
            sum += s[l];
            sum_px += sp[l];
        }
    }
    for (; i < n; ++i) {
        const float d = std::max(x[i] - mx, -87.0f);
        const float e = exp_nonpos(d);
        sum += e;
        sum_px += (double) e * d;
    }
    return { mx, sum, sum_px };
}

static dist_stats full_stats(const float * x, int32_t n) {
    const row_sums r = row_exp_sums<true>(x, n);
    // the first maximum, as a scan would find it (0 for a row without one: NaN logits)
    const float * it = std::find(x, x + n, r.max);
    const llama_token am = it == x + n ? 0 : (llama_token) (it - x);
    return { r.max + std::log(r.sum), std::log(r.sum) - r.sum_px / r.sum, am };
}

// the greedy token under a logit bias (sorted by token): the first maximum of x[t] + bias(t)
static llama_token biased_argmax(const float * x, int32_t n, const std::vector<std::pair<llama_token, float>> & bias) {
    auto biased = [&](llama_token t) {
        auto it = std::lower_bound(bias.begin(), bias.end(), std::make_pair(t, -INFINITY));
        return it != bias.end() && it->first == t ? it : bias.end();
    };
    llama_token am = -1;
    float best = -INFINITY;
    for (int32_t t = 0; t < n; ++t) {
        if (x[t] > best || am < 0) {
            const auto it = biased(t);
            const float v = it == bias.end() ? x[t] : x[t] + it->second;
            if (v > best || am < 0) {
                best = v;
                am = t;
            }
        }
    }
    // a biased token whose raw logit was not above the running maximum may still win with its bias
    for (const auto & [t, b] : bias) {
        if (t >= 0 && t < n && (x[t] + b > best || (x[t] + b == best && t < am))) {
            best = x[t] + b;
            am = t;
        }
    }
    return am < 0 ? 0 : am;
}

static size_t common_prefix(const std::vector<llama_token> & a, const std::vector<llama_token> & b) {
    size_t i = 0;
    while (i < a.size() && i < b.size() && a[i] == b[i]) {
        ++i;
    }
    return i;
}

static std::string lower(std::string s) {
    for (char & c : s) {
        c = (char) std::tolower((unsigned char) c);
    }
    return s;
}

// ---------------------------------------------------------------------------------------------
// context

// a run of consecutive tokens of one sequence; on_logits(j, logits) is called for each j in outputs
struct context::segment {
    llama_seq_id seq;
    llama_pos    pos0;
    const llama_token * tokens;
    int32_t      n;
    std::vector<int32_t> outputs; // ascending positions within the segment that need logits
    std::function<void(int32_t, const float *)> on_logits;
};

// the tokenized item and its results
struct context::plan {
    const score_item * item;
    item_score * out;
    std::vector<llama_token> prompt;              // P
    std::vector<std::vector<llama_token>> whole;  // W_c = tokenize(prompt + choice_c)
    int32_t branch = 0;                           // b: the choices branch after P[:b] (b < |P| on a token merge)
    llama_seq_id seq = -1;
    std::vector<llama_seq_id> choice_seq;         // -1 when the choice is a single token after b
    int32_t n_cells = 0;                          // KV cells the item needs beyond the shared prefix
    bool generating = false;
};

context::context(model & m, const context_params & params) : model_(m), params_(params) {
    backend_init();

    if (params.n_ctx < 16 || params.n_batch < 2 || params.n_ubatch < 1 || params.n_seq_max < 2 || params.n_threads < 1) {
        throw error("invalid context parameters");
    }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = params.n_ctx;
    cp.n_batch         = params.n_batch;
    cp.n_ubatch        = std::min(params.n_ubatch, params.n_batch);
    // LLAMA_MAX_SEQ is 256, and llama.cpp needs n_batch >= n_seq_max (one output per sequence)
    cp.n_seq_max       = std::min({ params.n_seq_max, (int32_t) 256, params.n_batch });
    cp.n_threads       = params.n_threads;
    cp.n_threads_batch = params.n_threads;
    cp.flash_attn_type = params.flash_attn < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO :
                         params.flash_attn == 0 ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_ENABLED;
    cp.kv_unified      = true; // sequences share the cells of a common prefix (seq_cp)
    cp.swa_full        = true; // shared prefixes must not be pruned from the sliding-window cache
    cp.no_perf         = true;
    if (params.kv_f32) {
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
    }
    if (m.info().n_gpu_layers > 0) {
        // record where the attention nodes run (asks only: no node's data is waited for)
        cp.cb_eval           = eval_callback;
        cp.cb_eval_user_data = this;
    }

    ctx_ = llama_init_from_model(m.get(), cp);
    if (!ctx_) {
        throw error("cannot create a llama.cpp context (n_ctx " + std::to_string(params.n_ctx) + ")");
    }
    // llama.cpp may adjust them (n_batch <= n_ctx, n_ctx padded)
    params_.n_seq_max = (int32_t) llama_n_seq_max(ctx_);
    params_.n_ctx     = (int32_t) llama_n_ctx(ctx_);
    params_.n_batch   = (int32_t) llama_n_batch(ctx_);
    params_.n_ubatch  = (int32_t) llama_n_ubatch(ctx_);
    batch_ = llama_batch_init(params_.n_batch, 0, 1);
    max_outputs_ = params.n_outputs_max > 0 ? params.n_outputs_max :
        std::max<int32_t>(16, std::min<int32_t>(params_.n_batch, (int32_t) ((256u << 20) / (4u*(uint32_t) m.info().n_vocab))));
}

bool context::eval_callback(struct ggml_tensor * t, bool ask, void * user_data) {
    if (!ask || (t->op != GGML_OP_SOFT_MAX && t->op != GGML_OP_FLASH_ATTN_EXT)) {
        return false;
    }
    auto * self = (context *) user_data;
    const bool biased = t->op == GGML_OP_SOFT_MAX ? t->src[3] != nullptr : t->src[5] != nullptr;
    ggml_backend_dev_t dev = t->buffer ? ggml_backend_buft_get_device(ggml_backend_buffer_get_type(t->buffer)) : nullptr;
    const std::string name = dev ? ggml_backend_dev_name(dev) : "CPU";
    auto it = std::find_if(self->placement_.begin(), self->placement_.end(),
                           [&](const attention_placement & p) { return p.device == name; });
    if (it == self->placement_.end()) {
        self->placement_.push_back({ name, 0, 0 });
        it = self->placement_.end() - 1;
    }
    it->n_nodes++;
    it->n_biased += biased;
    return false;
}

std::vector<attention_placement> context::attention_devices() const {
    if (model_.info().n_gpu_layers == 0) {
        return { { "CPU", 0, 0 } };
    }
    return placement_;
}

context::~context() {
    llama_batch_free(batch_);
    if (ctx_) {
        llama_free(ctx_);
    }
}

void context::clear() {
    llama_memory_clear(llama_get_memory(ctx_), true);
    prefix_.clear();
}

void context::set_bias(const std::vector<float> & bias) {
    const int32_t rc = llama_set_attn_ftb(ctx_, bias.empty() ? nullptr : bias.data(), bias.size());
    if (rc == -1) {
        throw error("bias has " + std::to_string(bias.size()) + " values, the model needs n_layer*n_head = " +
                std::to_string(model_.info().n_ftb));
    }
    if (rc != 0) {
        throw error("bias has a non-finite value");
    }
    // the cached K/V were computed with the previous bias
    clear();
}

std::vector<float> context::get_bias() const {
    const int32_t n = llama_get_attn_ftb(ctx_, nullptr, 0);
    std::vector<float> res(std::max(n, 0));
    if (n > 0) {
        llama_get_attn_ftb(ctx_, res.data(), res.size());
    }
    return res;
}

void context::decode_segments(std::vector<segment> & segs) {
    struct pending {
        size_t seg;
        int32_t j;
        int32_t idx;
    };
    std::vector<pending> outs;

    size_t si = 0;
    int32_t off = 0;
    while (si < segs.size()) {
        batch_.n_tokens = 0;
        outs.clear();
        while (si < segs.size() && batch_.n_tokens < params_.n_batch && (int32_t) outs.size() < max_outputs_) {
            segment & s = segs[si];
            int32_t take = std::min(s.n - off, params_.n_batch - batch_.n_tokens);
            // cap the logits of one decode (n_outputs x n_vocab floats: 1 GiB for 1000 outputs of a 262k vocab)
            {
                auto first = std::lower_bound(s.outputs.begin(), s.outputs.end(), off);
                const int32_t room = max_outputs_ - (int32_t) outs.size();
                if (s.outputs.end() - first > room) {
                    take = std::min(take, *(first + room) - off);
                }
            }
            auto it = std::lower_bound(s.outputs.begin(), s.outputs.end(), off);
            for (int32_t j = off; j < off + take; ++j) {
                const int32_t k = batch_.n_tokens++;
                const bool want = it != s.outputs.end() && *it == j;
                if (want) {
                    ++it;
                    outs.push_back({ si, j, k });
                }
                batch_.token[k]     = s.tokens[j];
                batch_.pos[k]       = s.pos0 + j;
                batch_.n_seq_id[k]  = 1;
                batch_.seq_id[k][0] = s.seq;
                batch_.logits[k]    = want;
            }
            off += take;
            if (off == s.n) {
                ++si;
                off = 0;
            }
        }
        if (batch_.n_tokens == 0) {
            break;
        }

        const auto t0 = std::chrono::steady_clock::now();
        placement_.clear();
        const int32_t rc = llama_decode(ctx_, batch_);
        stats_.t_decode_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (rc != 0) {
            throw error("llama_decode failed (" + std::to_string(rc) + "): the KV cache is full or the batch is invalid");
        }
        stats_.n_decoded += batch_.n_tokens;
        stats_.n_outputs += (int64_t) outs.size();
        stats_.n_calls   += 1;

        for (const pending & p : outs) {
            const float * logits = llama_get_logits_ith(ctx_, p.idx);
            if (!logits) {
                throw error("llama.cpp returned no logits");
            }
            segs[p.seg].on_logits(p.j, logits);
        }
    }
}

std::vector<float> context::logits(const std::vector<llama_token> & tokens) {
    if (tokens.empty()) {
        throw error("no tokens");
    }
    if ((int32_t) tokens.size() > params_.n_ctx) {
        throw error(std::to_string(tokens.size()) + " tokens do not fit the context of " + std::to_string(params_.n_ctx));
    }
    const int32_t n_vocab = model_.info().n_vocab;
    for (llama_token t : tokens) {
        if (t < 0 || t >= n_vocab) {
            throw error("token id " + std::to_string(t) + " is out of the vocabulary");
        }
    }

    clear();
    std::vector<float> res(tokens.size() * (size_t) n_vocab);
    std::vector<segment> segs(1);
    segs[0].seq    = 0;
    segs[0].pos0   = 0;
    segs[0].tokens = tokens.data();
    segs[0].n      = (int32_t) tokens.size();
    for (int32_t j = 0; j < segs[0].n; ++j) {
        segs[0].outputs.push_back(j);
    }
    segs[0].on_logits = [&](int32_t j, const float * x) {
        std::copy(x, x + n_vocab, res.begin() + (size_t) j * n_vocab);
    };
    decode_segments(segs);
    clear();
    return res;
}

std::vector<item_score> context::score(const std::vector<score_item> & items, const score_options & opt) {
    using clock = std::chrono::steady_clock;
    // the call's time goes into stats_ however it ends
    struct timer {
        score_stats & stats;
        clock::time_point t0 = clock::now();
        ~timer() {
            stats.t_score_s += std::chrono::duration<double>(clock::now() - t0).count();
            stats.n_score += 1;
        }
    } score_timer{ stats_ };
    std::vector<item_score> results(items.size());
    if (items.empty()) {
        return results;
    }
    if (opt.n_gen < 0) {
        throw error("n_gen must be >= 0");
    }

    const bool add_bos = model_.info().add_bos;

    // tokenize; the branch point is where every choice's tokens part from the prompt's
    const clock::time_point t_tok = clock::now();
    std::vector<plan> plans(items.size());
    for (size_t i = 0; i < items.size(); ++i) {
        const score_item & it = items[i];
        plan & p = plans[i];
        p.item = &it;
        p.out  = &results[i];
        if (it.choices.empty()) {
            throw error("item " + std::to_string(i) + ": no choices");
        }
        p.prompt = model_.tokenize(it.prompt, add_bos, opt.parse_special);
        if (p.prompt.empty()) {
            throw error("item " + std::to_string(i) + ": the prompt has no tokens");
        }
        p.branch = (int32_t) p.prompt.size();
        for (size_t c = 0; c < it.choices.size(); ++c) {
            if (it.choices[c].empty()) {
                throw error("item " + std::to_string(i) + ": choice " + std::to_string(c) + " is empty");
            }
            p.whole.push_back(model_.tokenize(it.prompt + it.choices[c], add_bos, opt.parse_special));
            p.branch = std::min<int32_t>(p.branch, (int32_t) common_prefix(p.prompt, p.whole.back()));
        }
        if (p.branch == 0) {
            throw error("item " + std::to_string(i) + ": the prompt and its choices share no token");
        }
        for (size_t c = 0; c < p.whole.size(); ++c) {
            if ((int32_t) p.whole[c].size() <= p.branch) {
                throw error("item " + std::to_string(i) + ": choice " + std::to_string(c) + " adds no token to the prompt");
            }
        }
        {
            int32_t need = (int32_t) p.prompt.size() + std::max(0, opt.n_gen - 1);
            for (const auto & w : p.whole) {
                need += std::max(0, (int32_t) w.size() - 1 - p.branch);
            }
            if (need > params_.n_ctx) {
                throw error("item " + std::to_string(i) + " needs " + std::to_string(need) +
                        " tokens of context, more than n_ctx " + std::to_string(params_.n_ctx));
            }
        }
        p.out->n_prompt_tokens = (int32_t) p.prompt.size();
        p.out->choice_logprob.assign(it.choices.size(), 0.0);
        p.out->choice_first_logprob.assign(it.choices.size(), 0.0);
        p.out->choice_greedy.assign(it.choices.size(), 1);
        p.out->choice_n_tokens.resize(it.choices.size());
        for (size_t c = 0; c < p.whole.size(); ++c) {
            p.out->choice_n_tokens[c] = (int32_t) p.whole[c].size() - p.branch;
            // a plain scorer evaluates the prompt and the choice for every choice
            stats_.n_item_tokens += (int64_t) p.whole[c].size();
        }
    }
    stats_.t_tokenize_s += std::chrono::duration<double>(clock::now() - t_tok).count();

    // the prefix shared by every item is evaluated once in seq 0 (each item keeps at least one token of its own)
    size_t g = plans[0].branch - 1;
    for (const plan & p : plans) {
        g = std::min<size_t>(g, p.branch - 1);
        g = std::min(g, common_prefix(plans[0].prompt, p.prompt));
    }
    std::vector<llama_token> shared(plans[0].prompt.begin(), plans[0].prompt.begin() + g);

    llama_memory_t mem = llama_get_memory(ctx_);
    for (llama_seq_id s = 1; s < params_.n_seq_max; ++s) {
        llama_memory_seq_rm(mem, s, -1, -1);
    }
    {
        // keep what seq 0 already holds of it (the same prefix in an earlier call with the same bias)
        const size_t keep = common_prefix(prefix_, shared);
        if (keep < prefix_.size()) {
            if (!llama_memory_seq_rm(mem, 0, (llama_pos) keep, -1)) {
                clear();
            }
        }
        const size_t have = std::min(keep, prefix_.size());
        prefix_.resize(have);
        if ((int32_t) g + 1 > params_.n_ctx) {
            throw error("the shared prompt prefix does not fit the context");
        }
        if (have < g) {
            std::vector<segment> segs(1);
            segs[0].seq    = 0;
            segs[0].pos0   = (llama_pos) have;
            segs[0].tokens = shared.data() + have;
            segs[0].n      = (int32_t) (g - have);
            segs[0].on_logits = [](int32_t, const float *) {};
            decode_segments(segs);
        }
        prefix_ = shared;
    }

    // group the items so that a group fits the KV cache and the sequence ids
    const int32_t n_gen_extra = std::max(0, opt.n_gen - 1);
    const int32_t cell_budget = params_.n_ctx - (int32_t) g;
    std::vector<plan *> group;
    int32_t cells = 0, seqs = 0;
    for (size_t i = 0; i < plans.size(); ++i) {
        plan & p = plans[i];
        int32_t need = (int32_t) p.prompt.size() - (int32_t) g + n_gen_extra;
        int32_t nseq = 1;
        for (const auto & w : p.whole) {
            const int32_t feed = (int32_t) w.size() - 1 - p.branch;
            if (feed > 0) {
                need += feed;
                nseq += 1;
            }
        }
        p.n_cells = need;
        if (need > cell_budget) {
            throw error("item " + std::to_string(i) + " needs " + std::to_string(need + (int32_t) g) +
                    " tokens of context, more than n_ctx " + std::to_string(params_.n_ctx) + " allows");
        }
        if (nseq > params_.n_seq_max - 1) {
            throw error("item " + std::to_string(i) + " needs " + std::to_string(nseq + 1) +
                    " sequences (the shared prefix, its prompt and one per choice), more than n_seq_max " +
                    std::to_string(params_.n_seq_max) + " allows");
        }
        if (!group.empty() && (cells + need > cell_budget || seqs + nseq > params_.n_seq_max - 1)) {
            run_group(group, (int32_t) g, opt);
            group.clear();
            cells = 0;
            seqs = 0;
        }
        group.push_back(&p);
        cells += need;
        seqs  += nseq;
    }
    if (!group.empty()) {
        run_group(group, (int32_t) g, opt);
    }

    return results;
}

void context::run_group(const std::vector<plan *> & group, int32_t g, const score_options & opt) {
    llama_memory_t mem = llama_get_memory(ctx_);
    const int32_t n_vocab = model_.info().n_vocab;

    std::vector<std::string> stops;
    for (const auto & s : opt.gen_stop) {
        if (!s.empty()) {
            stops.push_back(lower(s));
        }
    }
    // sorted by token, one entry a token (the biases of a token named twice add up, as in llama.cpp)
    std::vector<std::pair<llama_token, float>> logit_bias;
    for (const auto & [t, b] : opt.logit_bias) {
        if (t < 0 || t >= n_vocab) {
            throw error("logit bias for token " + std::to_string(t) + ", outside the vocabulary [0, " +
                    std::to_string(n_vocab) + ")");
        }
        if (!std::isfinite(b)) {
            throw error("logit bias for token " + std::to_string(t) + " is not finite");
        }
        logit_bias.emplace_back(t, b);
    }
    std::sort(logit_bias.begin(), logit_bias.end());
    {
        std::vector<std::pair<llama_token, float>> merged;
        for (const auto & e : logit_bias) {
            if (!merged.empty() && merged.back().first == e.first) {
                merged.back().second += e.second;
            } else {
                merged.push_back(e);
            }
        }
        logit_bias.swap(merged);
    }

    // the next-token distribution after the whole prompt: entropies and the first generated token
    auto on_prompt_end = [&](plan & p, const float * x) {
        const dist_stats st = full_stats(x, n_vocab);
        p.out->entropy_full = st.entropy;

        std::vector<llama_token> firsts;
        p.out->choice_next_token.assign(p.whole.size(), -1);
        p.out->choice_next_logprob.assign(p.whole.size(), -INFINITY);
        for (size_t c = 0; c < p.whole.size(); ++c) {
            const auto & w = p.whole[c];
            // on a token merge (b < |P|) the first choice token is not a continuation of the full prompt
            if ((int32_t) w.size() > (int32_t) p.prompt.size() && common_prefix(p.prompt, w) == p.prompt.size()) {
                const llama_token t = w[p.prompt.size()];
                firsts.push_back(t);
                p.out->choice_next_token[c] = t;
                p.out->choice_next_logprob[c] = (double) x[t] - st.lse;
            }
        }
        std::sort(firsts.begin(), firsts.end());
        firsts.erase(std::unique(firsts.begin(), firsts.end()), firsts.end());
        {
            float other = -INFINITY;
            for (int32_t t = 0; t < n_vocab; ++t) {
                if (x[t] > other && !std::binary_search(firsts.begin(), firsts.end(), t)) {
                    other = x[t];
                }
            }
            p.out->other_next_logprob = (double) other - st.lse;
        }
        if (firsts.size() > 1) {
            std::vector<float> sub;
            for (llama_token t : firsts) {
                sub.push_back(x[t]);
            }
            p.out->entropy_choices = full_stats(sub.data(), (int32_t) sub.size()).entropy;
        }

        if (opt.n_gen > 0) {
            p.out->gen_tokens.push_back(logit_bias.empty() ? st.argmax : biased_argmax(x, n_vocab, logit_bias));
            p.generating = true;
        }
    };

    auto gen_done = [&](plan & p) {
        const llama_token t = p.out->gen_tokens.back();
        if (model_.is_eog(t)) {
            return true;
        }
        p.out->gen_text += model_.token_to_piece(t);
        if ((int32_t) p.out->gen_tokens.size() >= opt.n_gen) {
            return true;
        }
        const std::string low = lower(p.out->gen_text);
        for (const auto & s : stops) {
            if (low.find(s) != std::string::npos) {
                return true;
            }
        }
        return false;
    };

    // sequence ids
    llama_seq_id next_seq = 1;
    for (plan * p : group) {
        p->seq = next_seq++;
        p->choice_seq.assign(p->whole.size(), -1);
        for (size_t c = 0; c < p->whole.size(); ++c) {
            if ((int32_t) p->whole[c].size() - 1 - p->branch > 0) {
                p->choice_seq[c] = next_seq++;
            }
        }
        if (g > 0) {
            llama_memory_seq_cp(mem, 0, p->seq, 0, g);
        }
    }

    // 1. each prompt up to the branch point; its last logits predict every choice's first token
    {
        std::vector<segment> segs;
        for (plan * p : group) {
            segment s;
            s.seq    = p->seq;
            s.pos0   = g;
            s.tokens = p->prompt.data() + g;
            s.n      = p->branch - g;
            s.outputs = { s.n - 1 };
            s.on_logits = [&, p](int32_t, const float * x) {
                const row_sums r = row_exp_sums<false>(x, n_vocab);
                const double lse = r.max + std::log(r.sum);
                for (size_t c = 0; c < p->whole.size(); ++c) {
                    const double lp = (double) x[p->whole[c][p->branch]] - lse;
                    p->out->choice_logprob[c]       = lp;
                    p->out->choice_first_logprob[c] = lp;
                    p->out->choice_greedy[c]        = x[p->whole[c][p->branch]] >= r.max;
                }
                if (p->branch == (int32_t) p->prompt.size()) {
                    on_prompt_end(*p, x);
                }
            };
            segs.push_back(std::move(s));
        }
        decode_segments(segs);
    }

    // 2. the choices branch from the prompt (all but their last token are evaluated); on a token merge,
    //    the rest of the prompt for the generation
    {
        std::vector<segment> segs;
        for (plan * p : group) {
            for (size_t c = 0; c < p->whole.size(); ++c) {
                if (p->choice_seq[c] < 0) {
                    continue;
                }
                llama_memory_seq_cp(mem, p->seq, p->choice_seq[c], 0, p->branch);
                const auto & w = p->whole[c];
                segment s;
                s.seq    = p->choice_seq[c];
                s.pos0   = p->branch;
                s.tokens = w.data() + p->branch;
                s.n      = (int32_t) w.size() - 1 - p->branch;
                for (int32_t j = 0; j < s.n; ++j) {
                    s.outputs.push_back(j);
                }
                s.on_logits = [&, p, c](int32_t j, const float * x) {
                    const auto & wc = p->whole[c];
                    const row_sums r = row_exp_sums<false>(x, n_vocab);
                    const double lp = (double) x[wc[p->branch + j + 1]] - (r.max + std::log(r.sum));
                    p->out->choice_logprob[c] += lp;
                    if (x[wc[p->branch + j + 1]] < r.max) {
                        p->out->choice_greedy[c] = 0;
                    }
                };
                segs.push_back(std::move(s));
            }
            if (p->branch < (int32_t) p->prompt.size()) {
                segment s;
                s.seq    = p->seq;
                s.pos0   = p->branch;
                s.tokens = p->prompt.data() + p->branch;
                s.n      = (int32_t) p->prompt.size() - p->branch;
                s.outputs = { s.n - 1 };
                s.on_logits = [&, p](int32_t, const float * x) { on_prompt_end(*p, x); };
                segs.push_back(std::move(s));
            }
        }
        decode_segments(segs);
    }

    // 3. greedy generation, one token per generating item per step
    for (plan * p : group) {
        if (p->generating && gen_done(*p)) {
            p->generating = false;
        }
    }
    while (true) {
        std::vector<segment> segs;
        for (plan * p : group) {
            if (!p->generating) {
                continue;
            }
            segment s;
            s.seq    = p->seq;
            s.pos0   = (llama_pos) (p->prompt.size() + p->out->gen_tokens.size() - 1);
            s.tokens = &p->out->gen_tokens.back();
            s.n      = 1;
            s.outputs = { 0 };
            s.on_logits = [&, p](int32_t, const float * x) {
                if (!logit_bias.empty()) {
                    p->out->gen_tokens.push_back(biased_argmax(x, n_vocab, logit_bias));
                    return;
                }
                llama_token am = 0;
                for (int32_t t = 1; t < n_vocab; ++t) {
                    if (x[t] > x[am]) {
                        am = t;
                    }
                }
                p->out->gen_tokens.push_back(am);
            };
            segs.push_back(std::move(s));
        }
        if (segs.empty()) {
            break;
        }
        // the segments point into gen_tokens, which on_logits grows: copy the tokens first
        std::vector<llama_token> toks(segs.size());
        for (size_t k = 0; k < segs.size(); ++k) {
            toks[k] = *segs[k].tokens;
            segs[k].tokens = &toks[k];
        }
        decode_segments(segs);
        for (plan * p : group) {
            if (p->generating && gen_done(*p)) {
                p->generating = false;
            }
        }
    }

    for (plan * p : group) {
        llama_memory_seq_rm(mem, p->seq, -1, -1);
        for (llama_seq_id s : p->choice_seq) {
            if (s >= 0) {
                llama_memory_seq_rm(mem, s, -1, -1);
            }
        }
    }
}

} // namespace zt
