// zt-gguf scoring engine: batched multiple-choice scoring over the public llama.h API.
//
// Items (a prompt and its choices) are scored as separate sequences of one unified KV cache:
// a prefix shared by every item of a call is evaluated once and copied (seq_cp shares the cells),
// each prompt is evaluated once and every choice branches from it, logits are computed only
// where they are read, and the last token of a choice is never evaluated.
#pragma once

#include "llama.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace zt {

struct error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct model_info {
    std::string arch;
    std::string name;
    int32_t n_layer    = 0;
    int32_t n_head     = 0; // max number of query heads over the layers (the bias row stride)
    int32_t n_head_kv  = 0;
    int32_t n_embd     = 0;
    int32_t n_vocab    = 0;
    int32_t n_ctx_train = 0;
    int32_t n_ftb      = 0; // length of the first-token bias: n_layer*n_head
    bool    add_bos    = false;
    llama_token bos    = LLAMA_TOKEN_NULL;
    llama_token eos    = LLAMA_TOKEN_NULL;
    int32_t n_gpu_layers = 0;          // layers offloaded (0: CPU only)
    std::vector<std::string> gpu_devices; // the GPU devices llama.cpp offloads to (none: CPU build or -ngl 0)
};

// where the attention nodes of the last llama_decode ran: per device, the SOFT_MAX / FLASH_ATTN_EXT nodes
// and how many of them carried the first-token bias
struct attention_placement {
    std::string device;
    int32_t n_nodes  = 0;
    int32_t n_biased = 0;
};

class model {
public:
    // n_gpu_layers: layers to offload to a GPU backend (llama.cpp's -ngl); negative: all of them. Without a
    // GPU backend in the build (or with no device) everything runs on the CPU whatever the value.
    explicit model(const std::string & path, int32_t n_gpu_layers = -1);
    ~model();

    model(const model &) = delete;
    model & operator=(const model &) = delete;

    const model_info & info() const { return info_; }
    llama_model * get() const { return model_; }
    const llama_vocab * vocab() const { return vocab_; }

    // the model's own BOS rule applies when add_special is true. Results are remembered (the vocabulary does not
    // change once loaded, and a search scores the same items dozens of times), keyed by the text and both flags;
    // past tokenize_cache_max_bytes of remembered tokens the cache starts afresh.
    std::vector<llama_token> tokenize(const std::string & text, bool add_special, bool parse_special = true) const;
    // the same without the cache (what the cache is checked against)
    std::vector<llama_token> tokenize_uncached(const std::string & text, bool add_special, bool parse_special) const;
    size_t tokenize_cache_size() const;  // texts remembered
    void clear_tokenize_cache() const;
    static constexpr size_t tokenize_cache_max_bytes = 64u << 20;
    std::string token_to_piece(llama_token token) const;
    std::string detokenize(const std::vector<llama_token> & tokens) const;
    bool is_eog(llama_token token) const;

private:
    llama_model * model_ = nullptr;
    const llama_vocab * vocab_ = nullptr;
    model_info info_;

    mutable std::mutex tokenize_mutex_;
    mutable std::unordered_map<std::string, std::vector<llama_token>> tokenize_cache_;
    mutable size_t tokenize_cache_bytes_ = 0;
};

struct context_params {
    int32_t n_ctx      = 4096; // KV cells shared by all sequences of a scoring group
    int32_t n_batch    = 512;
    int32_t n_ubatch   = 512;
    int32_t n_threads  = 2;
    int32_t n_seq_max  = 64;
    int32_t flash_attn = -1;   // -1 auto, 0 off, 1 on
    bool    kv_f32     = false; // F32 instead of F16 K/V cache (exact reference comparisons)
    int32_t n_outputs_max = 0;  // logits per llama_decode at most; 0: 256 MiB worth of them
};

struct score_item {
    std::string prompt;
    std::vector<std::string> choices;
};

struct score_options {
    int32_t n_gen = 1;                   // greedy tokens generated after the prompt (0: none)
    std::vector<std::string> gen_stop;   // stop generating an item once its text contains one (case-insensitive)
    bool parse_special = true;           // tokenize special-token text in prompts (as llama.cpp tools do)
    // added to these tokens' logits before every greedy choice of the generation (llama.cpp's --logit-bias);
    // the reported log-probabilities are those of the model, without it
    std::vector<std::pair<llama_token, float>> logit_bias;
};

struct item_score {
    std::vector<double>  choice_logprob;  // sum of log p(choice tokens | prompt)
    std::vector<int32_t> choice_n_tokens;
    std::vector<double>  choice_first_logprob; // log p(first choice token | prompt)
    std::vector<uint8_t> choice_greedy;  // 1 when every choice token is its row's most likely token
    double entropy_full    = 0.0; // entropy (nats) of the next-token distribution after the prompt
    double entropy_choices = 0.0; // the same, renormalised over the choices' distinct first tokens
    // the token each choice continues the whole prompt with (-1 on a token merge) and its log p after the
    // prompt; the largest log p of any token that starts no choice (what a logit bias on the choices'
    // first tokens must beat for the greedy continuation to start a choice)
    std::vector<llama_token> choice_next_token;
    std::vector<double> choice_next_logprob;
    double other_next_logprob = 0.0;
    std::vector<llama_token> gen_tokens;
    std::string gen_text;
    int32_t n_prompt_tokens = 0;
};

struct score_stats {
    int64_t n_decoded   = 0; // tokens evaluated by llama_decode
    int64_t n_outputs   = 0; // positions whose logits were computed
    int64_t n_item_tokens = 0; // prompt + every choice, as written (what a naive scorer would evaluate)
    int32_t n_calls     = 0; // llama_decode calls
    double  t_decode_s  = 0.0; // in llama_decode
    double  t_score_s   = 0.0; // in score(), all of it (decode, tokenization, the work on the logits rows)
    double  t_tokenize_s = 0.0; // in score()'s tokenization (the model's cache included)
    int32_t n_score     = 0; // score() calls
};

class context {
public:
    context(model & m, const context_params & params);
    ~context();

    context(const context &) = delete;
    context & operator=(const context &) = delete;

    // biases: n_layer*n_head values in logit units (ln gamma), layer-major; empty turns the bias off.
    // the KV cache is cleared, so no token evaluated with other biases is ever reused
    void set_bias(const std::vector<float> & bias);
    std::vector<float> get_bias() const; // empty if off

    std::vector<item_score> score(const std::vector<score_item> & items, const score_options & opt);

    // logits of every position of one sequence, evaluated alone from an empty cache: [n_tokens][n_vocab]
    std::vector<float> logits(const std::vector<llama_token> & tokens);

    const score_stats & stats() const { return stats_; }
    void reset_stats() { stats_ = {}; }

    // where the attention of the last llama_decode ran (recorded only when layers are offloaded to a GPU;
    // otherwise one CPU entry counting nothing)
    std::vector<attention_placement> attention_devices() const;

    const context_params & params() const { return params_; }
    const model & get_model() const { return model_; }

private:
    struct segment;
    struct plan;

    void clear();
    void decode_segments(std::vector<segment> & segs);
    void run_group(const std::vector<plan *> & group, int32_t n_prefix, const score_options & opt);

    model & model_;
    llama_context * ctx_ = nullptr;
    context_params params_;
    llama_batch batch_{};
    int32_t max_outputs_ = 64; // logits computed by one llama_decode at most (bounds the output buffer)
    score_stats stats_;

    static bool eval_callback(struct ggml_tensor * t, bool ask, void * user_data);
    std::vector<attention_placement> placement_;

    // decoded tokens of seq 0 (the prefix shared by the current call), kept across groups
    std::vector<llama_token> prefix_;
};

} // namespace zt
