"""Position 0 of models without a BOS token: the warning when a task's prompts start with different tokens.

ZeroTuning's bias acts on the attention to position 0. A model that adds a BOS token (Gemma) has the same
token there in every item. A model that adds none (Qwen2.5, SmolLM2: ``tokenizer.ggml.add_bos_token`` false)
has whatever token the prompt starts with, so when the prompts do not all start with the same token the bias
acts on a different sink per item. :func:`warning` says so, and what to do: start every prompt with the same
fixed line in the template (a header such as ``Task: sentiment``), or use ``--chat`` (the model's chat
template, whose first token is the same for every item).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable

__all__ = ["SHOWN", "warning"]

SHOWN = 3  # the most common first tokens named in the warning


def warning(
    add_bos: bool,
    first_tokens: Iterable[int],
    token_text: Callable[[int], str],
    *,
    shown: int = SHOWN,
) -> str | None:
    """None when position 0 is the same token in every item (the model adds a BOS token, or every prompt
    starts with the same token), else a one-line warning naming how many distinct first tokens the prompts
    have (the most common ones as text, with their counts) and what to do about it.

    first_tokens: each item's first prompt token id (the prompt tokenized as it is scored, without a BOS);
    it is not consumed when add_bos is true, so a generator that tokenizes the prompts costs nothing then.
    token_text: a token id's text (e.g. ``lambda t: model.detokenize([t])``), for the message."""
    if add_bos:
        return None
    counts = collections.Counter(first_tokens)
    if len(counts) <= 1:
        return None
    n_items = sum(counts.values())
    common = ", ".join(f"{token_text(t)!r} ({n})" for t, n in counts.most_common(shown))
    more = f" and {len(counts) - shown} more" if len(counts) > shown else ""
    return (
        f"the model adds no BOS token and the {n_items} prompts start with {len(counts)} different tokens "
        f"({common}{more}), so position 0, where the bias acts, is a different token per item; start every "
        "prompt with the same fixed first line in the template (e.g. a header such as 'Task: sentiment\\n'), "
        "or use --chat (the model's chat template)"
    )
