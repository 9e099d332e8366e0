"""The scoring engine (zt_gguf._core through zt_gguf.engine) against an independent computation.

The independent computation is the plainest use of llama.cpp: one sequence at a time from an empty cache
(Context.logits), its full logits turned into log-softmax in NumPy (float64). The engine instead packs many
items into one batch as separate sequences, evaluates a prefix shared by all items once, branches the choices
from the prompt with seq_cp, evaluates only the logits it reads and never the last token of a choice.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from zt_gguf.engine import AttentionPlacement, Context, EngineError, Model, describe_attention, fit_n_ctx
from zt_gguf.tasks import Item
from zt_gguf.testing import make_tiny_gemma3, make_tiny_llama

# the same float32 operations on other batch shapes (other matmul tiling): measured ~1e-6
ATOL = 2e-4
WORDS = "the a of and to in is it that was for on hello world cat dog sat mat one two three".split()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _items(rng: np.random.Generator, n: int, prefix: str = "") -> list[Item]:
    items = []
    for i in range(n):
        prompt = prefix + " ".join(rng.choice(WORDS, size=int(rng.integers(2, 9))))
        k = int(rng.integers(2, 5))
        choices = tuple(
            dict.fromkeys(" " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))) for _ in range(k))
        )
        if len(choices) < 2:
            choices = (" cat", " dog")
        items.append(Item(prompt=prompt, choices=choices, answer=0, id=str(i)))
    return items


def _reference_scores(model: Model, alone: Context, item: Item, n_gen: int) -> dict:
    """Scores of one item from single-sequence decodes only."""
    prompt = model.tokenize(item.prompt)
    wholes = [model.tokenize(item.prompt + c) for c in item.choices]
    branch = min(
        min(
            len(prompt),
            next((i for i, (a, b) in enumerate(zip(prompt, w)) if a != b), min(len(prompt), len(w))),
        )
        for w in wholes
    )
    logprobs = []
    for w in wholes:
        lp = _log_softmax(alone.logits(w))
        logprobs.append(sum(lp[j - 1, w[j]] for j in range(branch, len(w))))
    last = _log_softmax(alone.logits(prompt))[-1]
    entropy = float(-(np.exp(last) * last).sum())
    gen: list[int] = []
    for _ in range(n_gen):
        logits = alone.logits(prompt + gen)[-1]
        gen.append(int(np.argmax(logits)))
    return {"logprob": np.array(logprobs), "entropy": entropy, "gen": gen}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("m") / "tiny.gguf", n_layer=3, seed=3).path


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gemma3(tmp_path_factory.mktemp("g") / "gemma.gguf", sliding_window=4, seed=5).path


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("biased", [False, True])
def test_batched_scores_equal_single_sequence_decodes(tiny: Path, flash_attn: bool, biased: bool) -> None:
    model = Model(tiny)
    rng = np.random.default_rng(0)
    # a shared prefix (evaluated once), items of 2-4 choices of 1-3 tokens, more items than fit one group
    items = _items(rng, 24, prefix="the cat sat on the mat and the dog sat on the mat ")
    bias = rng.uniform(-1.5, 1.5, size=model.bias_shape).astype(np.float32) if biased else None

    # n_seq_max 16 and n_ctx 256 force several groups
    # n_outputs_max 5: a decode stops adding tokens once it holds 5 positions whose logits are read
    ctx = Context(
        model,
        n_ctx=256,
        n_batch=64,
        n_ubatch=32,
        n_seq_max=16,
        flash_attn=flash_attn,
        n_threads=1,
        n_outputs_max=5,
    )
    alone = Context(model, n_ctx=256, n_seq_max=2, flash_attn=flash_attn, n_threads=1)
    ctx.set_bias(bias)
    alone.set_bias(bias)
    got = ctx.score(items, n_gen=3)

    atol = ATOL if not flash_attn else 2e-2  # FA on the CPU: F16 K/V and accumulation
    for item, s in zip(items, got):
        ref = _reference_scores(model, alone, item, n_gen=3)
        np.testing.assert_allclose(s.choice_logprob, ref["logprob"], atol=atol * 4, rtol=0)
        assert s.entropy_full == pytest.approx(ref["entropy"], abs=atol * 4)
        if not flash_attn:
            assert s.gen_tokens == ref["gen"]
    stats = ctx.stats
    # shared prefix, prompt once per item, last choice tokens never evaluated
    assert stats["n_decoded"] < stats["n_item_tokens"] / 2


def test_bias_changes_scores_and_zero_bias_is_identity(tiny: Path) -> None:
    model = Model(tiny)
    items = _items(np.random.default_rng(1), 8)
    ctx = Context(model, n_threads=1)
    off = ctx.score(items)
    ctx.set_bias(np.zeros(model.bias_shape, np.float32))
    zero = ctx.score(items)
    for a, b in zip(off, zero):
        assert np.array_equal(a.choice_logprob, b.choice_logprob)
    ctx.set_bias(np.full(model.bias_shape, 1.0, np.float32))
    on = ctx.score(items)
    assert max(np.abs(a.choice_logprob - b.choice_logprob).max() for a, b in zip(off, on)) > 1e-2


def test_bias_through_engine_equals_bias_in_gguf(tmp_path: Path) -> None:
    bias = np.random.default_rng(2).uniform(-1, 1, size=(2, 4)).astype(np.float32)
    plain = Model(make_tiny_llama(tmp_path / "plain.gguf", seed=7).path)
    tuned = Model(make_tiny_llama(tmp_path / "tuned.gguf", seed=7, biases=bias).path)
    items = _items(np.random.default_rng(3), 10)

    c_tuned = Context(tuned, n_threads=1)
    np.testing.assert_array_equal(c_tuned.get_bias(), bias)  # the stored bias is on by default
    c_plain = Context(plain, n_threads=1)
    assert c_plain.get_bias() is None
    c_plain.set_bias(bias)
    for a, b in zip(c_plain.score(items, n_gen=2), c_tuned.score(items, n_gen=2)):
        np.testing.assert_array_equal(a.choice_logprob, b.choice_logprob)
        assert a.gen_tokens == b.gen_tokens
    c_tuned.set_bias(None)
    assert c_tuned.get_bias() is None


def test_set_bias_clears_the_cache(tiny: Path) -> None:
    model = Model(tiny)
    items = _items(np.random.default_rng(4), 6, prefix="the cat sat on the mat ")
    b1 = np.full(model.bias_shape, -1.0, np.float32)
    b2 = np.full(model.bias_shape, 1.0, np.float32)
    ctx = Context(model, n_threads=1)
    ctx.set_bias(b1)
    ctx.score(items)  # the shared prefix is now cached under b1
    ctx.set_bias(b2)
    reused = ctx.score(items)
    fresh = Context(model, n_threads=1)
    fresh.set_bias(b2)
    for a, b in zip(reused, fresh.score(items)):
        np.testing.assert_allclose(a.choice_logprob, b.choice_logprob, atol=1e-6, rtol=0)


def test_prefix_reused_across_calls(tiny: Path) -> None:
    model = Model(tiny)
    items = _items(np.random.default_rng(5), 12, prefix="the cat sat on the mat and the dog sat ")
    ctx = Context(model, n_threads=1)
    whole = ctx.score(items)
    ctx.reset_stats()
    parts = ctx.score(items[:6]) + ctx.score(items[6:])
    for a, b in zip(whole, parts):
        np.testing.assert_allclose(a.choice_logprob, b.choice_logprob, atol=ATOL, rtol=0)


def test_token_merge_at_the_prompt_boundary(tiny: Path) -> None:
    """A prompt ending "he" + the choice "llo" tokenizes to "▁hello": the choices branch before the merge."""
    model = Model(tiny)
    prompt, choices = "the cat is he", ("llo", " cat")
    p = model.tokenize(prompt)
    w = model.tokenize(prompt + choices[0])
    assert w[: len(p) - 1] == p[:-1] and w[len(p) - 1] != p[-1]  # a real merge
    alone = Context(model, n_threads=1)
    ref = _reference_scores(model, alone, Item(prompt, choices, 0, "m"), n_gen=2)
    got = Context(model, n_threads=1).score([Item(prompt, choices, 0, "m")], n_gen=2)[0]
    np.testing.assert_allclose(got.choice_logprob, ref["logprob"], atol=ATOL, rtol=0)
    assert got.gen_tokens == ref["gen"]
    assert got.entropy_full == pytest.approx(ref["entropy"], abs=ATOL)


def test_sliding_window_model_batched_equals_alone(tiny_gemma: Path) -> None:
    model = Model(tiny_gemma)
    rng = np.random.default_rng(6)
    items = _items(rng, 10, prefix="one two three the cat sat ")  # longer than the window of 4
    bias = rng.uniform(-1, 1, size=model.bias_shape).astype(np.float32)
    ctx = Context(model, n_threads=1, flash_attn=False)
    alone = Context(model, n_threads=1, flash_attn=False, n_seq_max=2)
    ctx.set_bias(bias)
    alone.set_bias(bias)
    for item, s in zip(items, ctx.score(items, n_gen=2)):
        ref = _reference_scores(model, alone, item, n_gen=2)
        np.testing.assert_allclose(s.choice_logprob, ref["logprob"], atol=1e-3, rtol=0)


def test_generation_stops_at_a_stop_string(tiny: Path) -> None:
    model = Model(tiny)
    ctx = Context(model, n_threads=1)
    for prompt in ("the cat sat on the", "hello world it was", "one two three and", "the dog is in the"):
        item = Item(prompt, (" mat", " dog"), 0, "s")
        full = ctx.score([item], n_gen=8)[0]
        words = re.findall(r"[a-z]{2,}", full.gen_text.lower())
        if len(full.gen_tokens) < 8 or not words:
            continue
        stopped = ctx.score([item], n_gen=8, gen_stop=[words[0]])[0]
        n = len(stopped.gen_tokens)
        assert stopped.gen_tokens == full.gen_tokens[:n]
        assert words[0] in stopped.gen_text.lower()
        assert words[0] not in model.detokenize(stopped.gen_tokens[: n - 1]).lower()  # it stopped at once
        return
    pytest.skip("the tiny model generated no word in 8 tokens for any prompt")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_errors_are_exceptions_not_crashes(tmp_path: Path, tiny: Path) -> None:
    with pytest.raises(EngineError, match="cannot open"):
        Model(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(EngineError, match="not a GGUF"):
        Model(tmp_path / "text.gguf")
    data = tiny.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(EngineError):
        Model(tmp_path / "cut.gguf")

    model = Model(tiny)
    ctx = Context(model, n_ctx=64, n_threads=1)
    with pytest.raises(EngineError, match="n_ctx"):
        ctx.score([Item(" ".join(["hello world"] * (ctx.n_ctx + 8)), (" a", " b"), 0, "long")])
    with pytest.raises(EngineError, match="no choices"):
        ctx.score([Item("the cat", (), None, "e")])
    with pytest.raises(EngineError, match="empty"):
        ctx.score([Item("the cat", ("", " dog"), None, "e")])
    with pytest.raises(ValueError, match="shape"):
        ctx.set_bias(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="finite"):
        ctx.set_bias(np.full(model.bias_shape, np.nan, np.float32))
    # the context still works after the errors
    assert len(ctx.score([Item("the cat", (" sat", " dog"), 0, "ok")])) == 1
    # 4 multi-token choices need 1 + 4 sequences besides the shared one: too many for n_seq_max 4
    few = Context(model, n_ctx=64, n_threads=1, n_seq_max=4)
    with pytest.raises(EngineError, match="6 sequences .* n_seq_max 4"):
        few.score([Item("the cat", (" sat down", " dog ran", " hello cat", " mat one"), 0, "many")])


def test_fit_n_ctx_sizes_the_cache_to_the_items(tmp_path: Path) -> None:
    """The fitted context: 512 for a few short items; for longer ones at least the cells of the per_call
    largest (prompt, every choice, n_gen), a multiple of 256, at most 4096 and never below the largest item;
    capped by the training context. Scoring with it works: every item fits."""
    model = Model(make_tiny_llama(tmp_path / "t.gguf", n_ctx_train=8192).path)
    short = [Item("the cat sat", (" on", " mat"), 0, str(i)) for i in range(3)]
    assert fit_n_ctx(model, short, 32) == 512
    words = "hello world the cat sat on a mat and".split()
    texts = [" ".join(words[(i + j) % len(words)] for j in range(60 + i)) for i in range(40)]
    long_items = [Item(t, (" dog ran", " one two three"), 0, str(i)) for i, t in enumerate(texts)]
    cells = sorted(
        (
            len(model.tokenize(it.prompt))
            + sum(len(model.tokenize(it.prompt + c)) - len(model.tokenize(it.prompt)) for c in it.choices)
            + 4
            for it in long_items
        ),
        reverse=True,
    )
    n = fit_n_ctx(model, long_items, 8, n_gen=4)
    assert n % 256 == 0 and sum(cells[:8]) <= n < sum(cells[:8]) + 256 + 512
    assert fit_n_ctx(model, long_items * 3, 64, n_gen=4) == 4096
    huge = [Item(" ".join(words * 600), (" a", " b"), 0, "huge")]
    assert fit_n_ctx(model, huge, 32) >= len(model.tokenize(huge[0].prompt)) + 64
    small = Model(make_tiny_llama(tmp_path / "s.gguf", n_ctx_train=1024).path)
    assert fit_n_ctx(small, huge, 32) == 1024
    ctx = Context(model, n_ctx=n, n_threads=1)
    assert len(ctx.score(long_items[:8], n_gen=4)) == 8


def test_logit_bias_and_next_token_figures_against_single_sequence_decodes(tiny: Path) -> None:
    """With a logit bias every greedy step is argmax(logits + bias) of the single-sequence logits (what
    llama.cpp's --logit-bias does); the reported log-probs stay the model's; choice_next_logprob and
    other_next_logprob are the log-softmax of the prompt's last logits at the choices' first tokens and the
    largest over every other token."""
    model = Model(tiny)
    rng = np.random.default_rng(31)
    items = _items(rng, 12)
    ctx = Context(model, n_threads=1)
    alone = Context(model, n_threads=1)
    plain = ctx.score(items, n_gen=4)
    # bias the plain continuation's second-ranked first tokens up, so that the bias changes the output
    firsts = []
    for it in items[:3]:
        logits = alone.logits(model.tokenize(it.prompt))[-1]
        firsts.append(int(np.argsort(logits)[-2]))
    lb = [(t, 3.0) for t in dict.fromkeys(firsts)] + [(int(plain[0].gen_tokens[0]), -1.5)]
    biased = ctx.score(items, n_gen=4, logit_bias=lb)
    vec = np.zeros(model.n_vocab)
    for t, b in lb:
        vec[t] += b
    changed = 0
    for it, p, s in zip(items, plain, biased):
        prompt = model.tokenize(it.prompt)
        gen: list[int] = []
        for _ in range(4):
            gen.append(int(np.argmax(alone.logits(prompt + gen)[-1].astype(np.float64) + vec)))
        assert s.gen_tokens == gen[: len(s.gen_tokens)] and len(s.gen_tokens) >= 1
        changed += s.gen_tokens != p.gen_tokens
        np.testing.assert_allclose(s.choice_logprob, p.choice_logprob, atol=ATOL)  # the model's own
        last = _log_softmax(alone.logits(prompt))[-1]
        wholes = [model.tokenize(it.prompt + c) for c in it.choices]
        starts = {w[len(prompt)] for w in wholes if w[: len(prompt)] == prompt and len(w) > len(prompt)}
        for c, w in enumerate(wholes):
            if w[: len(prompt)] == prompt and len(w) > len(prompt):
                assert p.choice_next_token[c] == w[len(prompt)]
                assert p.choice_next_logprob[c] == pytest.approx(last[w[len(prompt)]], abs=ATOL)
            else:
                assert p.choice_next_token[c] == -1 and p.choice_next_logprob[c] == -np.inf
        others = np.delete(last, sorted(starts))
        assert p.other_next_logprob == pytest.approx(others.max(), abs=ATOL)
    assert changed >= 3
    with pytest.raises(EngineError, match="outside the vocabulary"):
        ctx.score(items[:1], n_gen=2, logit_bias=[(model.n_vocab, 1.0)])


def test_gpu_layers_on_a_cpu_build_and_the_attention_report(tiny: Path) -> None:
    with pytest.raises(ValueError, match="gpu_layers"):
        Model(tiny, gpu_layers=-2)
    cpu = Model(tiny, gpu_layers=0)
    assert cpu.n_gpu_layers == 0 and cpu.gpu_devices == []
    ctx = Context(cpu)
    assert ctx.probe_attention(
        np.full(cpu.bias_shape, 0.5, np.float32), Item("a cat", (" sat", " dog"), 0, "0")
    ) == ("CPU (no GPU offload)")
    assert ctx.get_bias() is not None  # the probe leaves its biases set

    class Offloaded:  # what describe_attention reads of a model with offloaded layers
        n_gpu_layers, gpu_devices = 3, ["Vulkan0"]

    fake: Any = Offloaded()
    assert describe_attention(fake, []).startswith("not recorded yet (3 layers offloaded to Vulkan0)")
    where = [AttentionPlacement("CPU", 1, 0), AttentionPlacement("Vulkan0", 5, 5)]
    assert describe_attention(fake, where) == (
        "Vulkan0 (5 of 6 attention nodes, 5 with the bias), CPU (1 of 6 attention nodes)"
    )


def test_tokenize_cache_equals_fresh_tokenization(tiny: Path) -> None:
    """Model.tokenize remembers its results per (text, add_special, parse_special): every answer equals a
    fresh tokenization by another Model of the same file, whatever the order of the flags (a text holding
    "<s>" tokenizes differently with and without special-token parsing, and the cache keeps both); scores
    are bit for bit the same from a cold and a warm cache."""
    model, fresh = Model(tiny), Model(tiny)
    texts = ["the cat sat", "<s>the cat</s>", "the cat <s>", "", "café ☕ the", "the cat sat" * 40]
    flags = [(a, p) for a in (True, False) for p in (True, False)]
    assert model.tokenize("<s>the", True, True) != model.tokenize("<s>the", True, False)
    for round_ in range(3):  # cold, warm, warm in another order
        order = flags if round_ < 2 else flags[::-1]
        for text in texts if round_ < 2 else texts[::-1]:
            for a, p in order:
                assert model.tokenize(text, a, p) == fresh.tokenize_uncached(text, a, p), (text, a, p)
    assert model.tokenize_cache_size == len(texts) * len(flags) + 2  # and the two "<s>the" above
    model.clear_tokenize_cache()
    assert model.tokenize_cache_size == 0

    items = [
        Item("the cat sat on", (" the mat", " a mat"), 0, "a"),
        Item("<s>one two", (" three", " four five"), 1, "b"),
    ]
    ctx = Context(model, n_threads=1)
    cold = [s.choice_logprob.tolist() for s in ctx.score(items)]
    assert model.tokenize_cache_size == 2 + 4  # the prompts, and each prompt with each choice
    assert [s.choice_logprob.tolist() for s in ctx.score(items)] == cold
    assert [s.choice_logprob.tolist() for s in Context(fresh, n_threads=1).score(items)] == cold
