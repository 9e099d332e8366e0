// pybind11 module zt_gguf._core: a thin face of the scoring engine (engine.h); the GIL is released
// while llama.cpp works.
#include "chat_template.h"
#include "engine.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace {

std::vector<float> bias_from_array(const zt::model_info & info, const py::array_t<float, py::array::c_style | py::array::forcecast> & a) {
    const bool shape_ok = (a.ndim() == 2 && a.shape(0) == info.n_layer && a.shape(1) == info.n_head) ||
                          (a.ndim() == 1 && a.shape(0) == info.n_ftb);
    if (!shape_ok) {
        std::string shape;
        for (py::ssize_t i = 0; i < a.ndim(); ++i) {
            shape += (i ? ", " : "") + std::to_string(a.shape(i));
        }
        throw py::value_error("bias has shape (" + shape + "), the model needs (" + std::to_string(info.n_layer) +
                ", " + std::to_string(info.n_head) + ") = (n_layer, n_head)");
    }
    return std::vector<float>(a.data(), a.data() + a.size());
}

// token pieces may split a multi-byte character: decode with replacement instead of raising
py::str utf8(const std::string & s) {
    return py::reinterpret_steal<py::str>(PyUnicode_DecodeUTF8(s.data(), (py::ssize_t) s.size(), "replace"));
}

} // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "zt-gguf engine: batched multiple-choice scoring through the patched llama.cpp";

    // the engine's errors are about what the user gave (a model file, an item, a context size): they join
    // zt_gguf's error family (zt_gguf.errors.EngineErrorBase: UserError and RuntimeError)
    py::object base = py::module_::import("zt_gguf.errors").attr("EngineErrorBase");
    py::register_exception<zt::error>(m, "EngineError", base);

    py::class_<zt::model_info>(m, "ModelInfo")
        .def_readonly("arch", &zt::model_info::arch)
        .def_readonly("name", &zt::model_info::name)
        .def_readonly("n_layer", &zt::model_info::n_layer)
        .def_readonly("n_head", &zt::model_info::n_head)
        .def_readonly("n_head_kv", &zt::model_info::n_head_kv)
        .def_readonly("n_embd", &zt::model_info::n_embd)
        .def_readonly("n_vocab", &zt::model_info::n_vocab)
        .def_readonly("n_ctx_train", &zt::model_info::n_ctx_train)
        .def_readonly("n_ftb", &zt::model_info::n_ftb)
        .def_readonly("add_bos", &zt::model_info::add_bos)
        .def_readonly("bos", &zt::model_info::bos)
        .def_readonly("eos", &zt::model_info::eos)
        .def_readonly("n_gpu_layers", &zt::model_info::n_gpu_layers)
        .def_readonly("gpu_devices", &zt::model_info::gpu_devices);

    py::class_<zt::model>(m, "Model")
        .def(py::init<const std::string &, int32_t>(), py::arg("path"), py::arg("n_gpu_layers") = -1,
             py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("info", &zt::model::info, py::return_value_policy::reference_internal)
        .def("tokenize", &zt::model::tokenize, py::arg("text"), py::arg("add_special") = true, py::arg("parse_special") = true)
        .def("tokenize_uncached", &zt::model::tokenize_uncached, py::arg("text"), py::arg("add_special") = true,
             py::arg("parse_special") = true)
        .def_property_readonly("tokenize_cache_size", &zt::model::tokenize_cache_size)
        .def("clear_tokenize_cache", &zt::model::clear_tokenize_cache)
        .def("token_to_piece", [](const zt::model & m, llama_token t) { return utf8(m.token_to_piece(t)); }, py::arg("token"))
        .def("detokenize", [](const zt::model & m, const std::vector<llama_token> & tokens) {
                 return utf8(m.detokenize(tokens));
             }, py::arg("tokens"))
        .def_property_readonly("chat_template", [](const zt::model & m) {
                 return utf8(zt::chat_template_source(m.get()));
             })
        .def("apply_chat_template", [](const zt::model & m, const std::vector<std::pair<std::string, std::string>> & messages,
                                       bool add_generation_prompt) {
                 return utf8(zt::apply_chat_template(m.get(), messages, add_generation_prompt));
             }, py::arg("messages"), py::arg("add_generation_prompt") = true);

    py::class_<zt::item_score>(m, "ItemScore")
        .def_readonly("choice_logprob", &zt::item_score::choice_logprob)
        .def_readonly("choice_n_tokens", &zt::item_score::choice_n_tokens)
        .def_readonly("choice_first_logprob", &zt::item_score::choice_first_logprob)
        .def_readonly("choice_greedy", &zt::item_score::choice_greedy)
        .def_readonly("entropy_full", &zt::item_score::entropy_full)
        .def_readonly("entropy_choices", &zt::item_score::entropy_choices)
        .def_readonly("choice_next_token", &zt::item_score::choice_next_token)
        .def_readonly("choice_next_logprob", &zt::item_score::choice_next_logprob)
        .def_readonly("other_next_logprob", &zt::item_score::other_next_logprob)
        .def_readonly("gen_tokens", &zt::item_score::gen_tokens)
        .def_property_readonly("gen_text", [](const zt::item_score & s) { return utf8(s.gen_text); })
        .def_readonly("n_prompt_tokens", &zt::item_score::n_prompt_tokens);

    py::class_<zt::context>(m, "Context")
        .def(py::init([](zt::model & model, int32_t n_ctx, int32_t n_batch, int32_t n_ubatch, int32_t n_threads,
                         int32_t n_seq_max, int32_t flash_attn, bool kv_f32, int32_t n_outputs_max) {
                 zt::context_params p;
                 p.n_ctx      = n_ctx;
                 p.n_batch    = n_batch;
                 p.n_ubatch   = n_ubatch;
                 p.n_threads  = n_threads;
                 p.n_seq_max  = n_seq_max;
                 p.flash_attn = flash_attn;
                 p.kv_f32     = kv_f32;
                 p.n_outputs_max = n_outputs_max;
                 py::gil_scoped_release release;
                 return new zt::context(model, p);
             }),
             py::arg("model"), py::arg("n_ctx") = 4096, py::arg("n_batch") = 512, py::arg("n_ubatch") = 512,
             py::arg("n_threads") = 2, py::arg("n_seq_max") = 64, py::arg("flash_attn") = -1, py::arg("kv_f32") = false,
             py::arg("n_outputs_max") = 0,
             py::keep_alive<1, 2>())
        .def_property_readonly("n_ctx", [](const zt::context & c) { return c.params().n_ctx; })
        .def_property_readonly("n_batch", [](const zt::context & c) { return c.params().n_batch; })
        .def_property_readonly("n_threads", [](const zt::context & c) { return c.params().n_threads; })
        .def_property_readonly("flash_attn", [](const zt::context & c) { return c.params().flash_attn; })
        .def("attention_devices", [](const zt::context & c) {
                 py::list res;
                 for (const zt::attention_placement & p : c.attention_devices()) {
                     res.append(py::make_tuple(p.device, p.n_nodes, p.n_biased));
                 }
                 return res;
             })
        .def("set_bias", [](zt::context & c, const py::array_t<float, py::array::c_style | py::array::forcecast> & bias) {
                 std::vector<float> v = bias_from_array(c.get_model().info(), bias);
                 py::gil_scoped_release release;
                 c.set_bias(v);
             }, py::arg("bias"))
        .def("clear_bias", [](zt::context & c) {
                 py::gil_scoped_release release;
                 c.set_bias({});
             })
        .def("get_bias", [](const zt::context & c) -> py::object {
                 const std::vector<float> v = c.get_bias();
                 if (v.empty()) {
                     return py::none();
                 }
                 return py::array_t<float>(v.size(), v.data());
             })
        .def("score", [](zt::context & c, const std::vector<std::string> & prompts,
                         const std::vector<std::vector<std::string>> & choices, int32_t n_gen,
                         const std::vector<std::string> & gen_stop, bool parse_special,
                         const std::vector<std::pair<llama_token, float>> & logit_bias) {
                 if (prompts.size() != choices.size()) {
                     throw py::value_error("prompts and choices differ in length");
                 }
                 std::vector<zt::score_item> items(prompts.size());
                 for (size_t i = 0; i < prompts.size(); ++i) {
                     items[i].prompt  = prompts[i];
                     items[i].choices = choices[i];
                 }
                 zt::score_options opt;
                 opt.n_gen         = n_gen;
                 opt.gen_stop      = gen_stop;
                 opt.parse_special = parse_special;
                 opt.logit_bias    = logit_bias;
                 py::gil_scoped_release release;
                 return c.score(items, opt);
             }, py::arg("prompts"), py::arg("choices"), py::arg("n_gen") = 1,
             py::arg("gen_stop") = std::vector<std::string>(), py::arg("parse_special") = true,
             py::arg("logit_bias") = std::vector<std::pair<llama_token, float>>())
        .def("logits", [](zt::context & c, const std::vector<llama_token> & tokens) {
                 const int32_t n_vocab = c.get_model().info().n_vocab;
                 std::vector<float> v;
                 {
                     py::gil_scoped_release release;
                     v = c.logits(tokens);
                 }
                 py::array_t<float> a({ (py::ssize_t) tokens.size(), (py::ssize_t) n_vocab });
                 std::copy(v.begin(), v.end(), a.mutable_data());
                 return a;
             }, py::arg("tokens"))
        .def_property_readonly("stats", [](const zt::context & c) {
                 const zt::score_stats & s = c.stats();
                 py::dict d;
                 d["n_decoded"]     = s.n_decoded;
                 d["n_outputs"]     = s.n_outputs;
                 d["n_item_tokens"] = s.n_item_tokens;
                 d["n_calls"]       = s.n_calls;
                 d["t_decode_s"]    = s.t_decode_s;
                 d["t_score_s"]     = s.t_score_s;
                 d["t_tokenize_s"]  = s.t_tokenize_s;
                 d["n_score"]       = s.n_score;
                 return d;
             })
        .def("reset_stats", &zt::context::reset_stats);
}
