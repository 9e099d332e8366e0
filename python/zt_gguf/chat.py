"""--chat: every prompt sent as a user message through the model's own chat template.

The formatting is llama.cpp's (engine.Model.apply_chat_template: the common chat code that llama-server's
/v1/chat/completions runs, with its defaults), never a copy in Python, so a calibration with --chat sees the
tokens the server sees. The assistant's turn starts right after the template's generation prompt, so the
choices and reference answers lose their leading whitespace (" positive" is scored as "positive").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from .engine import Model
from .errors import UserError
from .tasks import Item, Task


class ChatError(UserError, ValueError):
    """--chat on a model that cannot format chat prompts."""


def check_chat(model: Model) -> None:
    if not model.chat_template:
        raise ChatError(
            f"{model.path}: the model has no chat template (tokenizer.chat_template), so --chat cannot "
            "format its prompts; drop --chat"
        )


def chat_prompt(model: Model, prompt: str, system: str | None = None) -> str:
    """One prompt as the user's message (after an optional system message), ready for the reply."""
    messages = ([("system", system)] if system else []) + [("user", prompt)]
    return model.apply_chat_template(messages, add_generation_prompt=True)


def chat_items(model: Model, items: Sequence[Item], system: str | None = None) -> list[Item]:
    """The items with chat-formatted prompts; choices and references without their leading whitespace."""
    check_chat(model)
    return [
        replace(
            it,
            prompt=chat_prompt(model, it.prompt, system),
            choices=tuple(c.lstrip() for c in it.choices),
            references=tuple(r.lstrip() for r in it.references),
        )
        for it in items
    ]


def chat_task(model: Model, task: Task, system: str | None = None) -> Task:
    """The task with every prompt (and Contextual Calibration's content-free prompts) chat-formatted."""
    content_free = None
    if task.content_free:
        content_free = {cf: chat_prompt(model, p, system) for cf, p in task.content_free.items()}
    return replace(task, items=chat_items(model, task.items, system), content_free=content_free)
