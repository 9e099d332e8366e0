// Reproduce a fuzz finding against any libllama (stock or patched; stock llama.h API only): load a GGUF, make
// a context and decode 2 tokens. Exit code 0: loaded and decoded; 1: refused with an error (a clean
// outcome); a crash (abort, signal) is the finding.
//
//   g++ -std=c++17 -I third_party/llama.cpp/include -I third_party/llama.cpp/ggml/include \
//       cpp/fuzz/load_decode.cpp -o load_decode -L LIBDIR -lllama -lggml -lggml-base -Wl,-rpath,LIBDIR
//   ./load_decode model.gguf
#include "llama.h"

#include <cstdio>

int main(int argc, char ** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s MODEL.gguf\n", argv[0]);
        return 2;
    }
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        std::printf("refused: the model did not load\n");
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 64;
    cp.n_batch = 16;
    cp.n_ubatch = 16;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        std::printf("refused: no context\n");
        llama_model_free(model);
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    llama_token tokens[2] = { llama_vocab_bos(vocab) >= 0 ? llama_vocab_bos(vocab) : 0, 5 };
    const int32_t rc = llama_decode(ctx, llama_batch_get_one(tokens, 2));
    std::printf("%s: llama_decode returned %d\n", rc == 0 ? "ok" : "refused", rc);
    llama_free(ctx);
    llama_model_free(model);
    return rc == 0 ? 0 : 1;
}
