// zt-gguf: prompts formatted with a model's own chat template, by llama.cpp's common chat code (the code
// llama-server's /v1/chat/completions runs), so a calibration with --chat sees exactly what the server sends.
#pragma once

#include "llama.h"

#include <string>
#include <utility>
#include <vector>

namespace zt {

// the model's chat template from its GGUF ("" when it has none)
std::string chat_template_source(const llama_model * model);

// messages (role, content) formatted as llama-server formats a chat request with its defaults (jinja, the
// generation prompt added, thinking as the template supports it); throws zt::error without a template
std::string apply_chat_template(const llama_model * model,
                                const std::vector<std::pair<std::string, std::string>> & messages,
                                bool add_generation_prompt = true);

} // namespace zt
