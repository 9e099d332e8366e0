"""zt_gguf.first_token.warning: on synthetic first tokens, then on prompts tokenized by the real Qwen2.5-Coder
0.5B (no BOS) and Gemma 3 270M (BOS) through the engine."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import pytest

from zt_gguf import models, tasks
from zt_gguf.engine import Model
from zt_gguf.first_token import warning

TEXT = {1: "Review", 2: "The", 3: "I", 4: "\n", 5: "A", 6: "It"}


def _text(token: int) -> str:
    return TEXT[token]


def test_a_model_with_bos_gets_none_without_reading_the_tokens() -> None:
    def never() -> Iterator[int]:
        raise AssertionError("first tokens read although the model adds a BOS token")
        yield 0

    assert warning(True, never(), _text) is None


@pytest.mark.parametrize("firsts", [[], [1], [2, 2, 2, 2]], ids=["none", "one", "shared"])
def test_a_shared_first_token_gets_none(firsts: list[int]) -> None:
    assert warning(False, iter(firsts), _text) is None


def test_different_first_tokens_get_one_line_with_counts_and_advice() -> None:
    firsts = [2] * 5 + [3] * 3 + [4] * 2 + [5, 6]  # 12 items, 5 distinct first tokens
    msg = warning(False, iter(firsts), _text)
    assert msg is not None and "\n" not in msg
    assert "no BOS token" in msg and "the 12 prompts start with 5 different tokens" in msg
    # the three most common, most common first, as text (a newline token escaped), with their counts
    assert "('The' (5), 'I' (3), '\\n' (2) and 2 more)" in msg
    assert (
        "the same fixed first line" in msg
        and "Task: sentiment" in msg
        and "--chat (the model's chat template)" in msg
    )


def test_shown_and_ties() -> None:
    msg = warning(False, [5, 6], _text, shown=5)
    assert msg is not None and "2 different tokens ('A' (1), 'It' (1))" in msg and "more" not in msg


# --- through the engine, on real models -------------------------------------------------------------------

N_ITEMS = 40


@pytest.fixture(scope="module")
def sst2() -> list[tasks.Item]:
    """The demo task's items: every prompt is "Review: {text}\\nSentiment:"."""
    return tasks.load_task(tasks.demo_task_path(), max_items=N_ITEMS).items


def _reviews(items: list[tasks.Item]) -> list[str]:
    """The review texts alone (each prompt without its "Review: " line start)."""
    out = [it.prompt.removeprefix("Review: ") for it in items]
    assert all(p != it.prompt for p, it in zip(out, items))
    return out


def test_qwen_prompts_starting_differently_get_the_warning(sst2: list[tasks.Item]) -> None:
    model = Model(models.get("qwen2.5-coder-0.5b"))
    assert not model.add_bos

    def check(prompts: list[str]) -> str | None:
        tokens = [model.tokenize(p) for p in prompts]
        return warning(model.add_bos, (t[0] for t in tokens), lambda t: model.detokenize([t]))

    reviews = _reviews(sst2)
    msg = check(reviews)
    assert msg is not None
    # the count and the most common first token, recounted from the review texts' first tokens
    counts = collections.Counter(model.tokenize(p)[0] for p in reviews)
    assert len(counts) > 1 and f"start with {len(counts)} different tokens" in msg
    assert repr(model.detokenize([counts.most_common(1)[0][0]])) in msg
    # the same texts behind a fixed first line, and the demo task's own "Review: " prompts: no warning
    assert check(["Task: sentiment\n" + p for p in reviews]) is None
    assert check([it.prompt for it in sst2]) is None


def test_gemma_adds_bos_so_position_0_is_shared(sst2: list[tasks.Item]) -> None:
    model = Model(models.get("gemma-3-270m"))
    reviews = _reviews(sst2)
    assert model.add_bos and {model.tokenize(p)[0] for p in reviews} == {model.bos}
    assert warning(model.add_bos, (model.tokenize(p)[0] for p in reviews), str) is None
