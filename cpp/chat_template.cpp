// zt-gguf: prompts formatted with a model's own chat template (see chat_template.h)
#include "chat_template.h"

#include "engine.h"

#include "chat.h" // llama.cpp's common/chat.h

#include <exception>

namespace zt {

std::string chat_template_source(const llama_model * model) {
    const char * tmpl = llama_model_chat_template(model, /* name */ nullptr);
    return tmpl ? std::string(tmpl) : std::string();
}

std::string apply_chat_template(const llama_model * model,
                                const std::vector<std::pair<std::string, std::string>> & messages,
                                bool add_generation_prompt) {
    if (chat_template_source(model).empty()) {
        throw error("the model has no chat template (tokenizer.chat_template)");
    }
    try {
        // as llama-server sets its chat parameters up with its defaults (tools/server/server-context.cpp)
        common_chat_templates_ptr tmpls = common_chat_templates_init(model, /* chat_template_override */ "");
        common_chat_templates_inputs inputs;
        inputs.use_jinja             = true;
        inputs.add_generation_prompt = add_generation_prompt;
        inputs.enable_thinking       = common_chat_templates_support_enable_thinking(tmpls.get());
        inputs.reasoning_format      = COMMON_REASONING_FORMAT_DEEPSEEK;
        for (const auto & [role, content] : messages) {
            common_chat_msg msg;
            msg.role    = role;
            msg.content = content;
            inputs.messages.push_back(std::move(msg));
        }
        return common_chat_templates_apply(tmpls.get(), inputs).prompt;
    } catch (const error &) {
        throw;
    } catch (const std::exception & e) {
        throw error(std::string("the model's chat template cannot be applied: ") + e.what());
    }
}

} // namespace zt
