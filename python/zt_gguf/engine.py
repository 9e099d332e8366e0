"""The Python face of the scoring engine (zt_gguf._core): the only module that imports it.

model = Model("model.gguf")
ctx = Context(model, n_threads=2)
ctx.set_bias(np.zeros((model.n_layer, model.n_head), np.float32))
scores = ctx.score(items, n_gen=4)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _core, gguf_meta
from .first_token import warning
from .tasks import Item

EngineError = _core.EngineError


@dataclass
class Scores:
    """Scores of one item: the choices' log-likelihoods, the greedy continuation and entropies."""

    choice_logprob: np.ndarray  # float64 [n_choices], sum of log p(choice tokens | prompt)
    choice_n_tokens: np.ndarray  # int32 [n_choices]
    choice_first_logprob: np.ndarray  # float64 [n_choices], log p(first choice token | prompt)
    entropy_full: float  # nats, next-token distribution after the prompt, full vocabulary
    entropy_choices: float  # nats, the same renormalised over the choices' distinct first tokens
    gen_text: str
    gen_tokens: list[int] = field(default_factory=list)
    n_prompt_tokens: int = 0
    # the token each choice continues the whole prompt with (-1 on a token merge), its log p after the
    # prompt (-inf then), and the largest log p of a token that starts no choice
    choice_next_token: np.ndarray | None = None  # int32 [n_choices]
    choice_next_logprob: np.ndarray | None = None  # float64 [n_choices]
    other_next_logprob: float = float("nan")
    # every choice token is the most likely token at its place (lm-evaluation-harness's is_greedy)
    choice_greedy: np.ndarray | None = None  # bool [n_choices]


DEFAULT_N_CTX = 4096
N_CTX_MIN = 512
N_CTX_STEP = 256


def fit_n_ctx(model: Model, items: Sequence[Item], per_call: int, n_gen: int = 0) -> int:
    """KV cells for scoring items per_call at a time: the per_call largest items' cells (prompt, the tokens
    of every choice, n_gen generated), rounded up to 256, within [512, 4096], and at least the largest item's
    (up to the model's training context). The KV cache is allocated whole (4096 cells are 512 MiB for an 8B
    model), so a small task should not pay for a large context; more cells only group more items a decode."""
    cells = []
    for it in items:  # tokenized as the engine's scoring does, so that its cache holds them already
        p = model.tokenize(it.prompt, model.add_bos)
        extra = sum(max(1, len(model.tokenize(it.prompt + c, model.add_bos)) - len(p)) for c in it.choices)
        cells.append(len(p) + extra + n_gen)
    if not cells:
        return N_CTX_MIN
    cells.sort(reverse=True)
    n = min(max(sum(cells[:per_call]), N_CTX_MIN), DEFAULT_N_CTX)
    n = max(n, cells[0] + 64)
    if model.n_ctx_train > 0:
        n = min(n, max(model.n_ctx_train, N_CTX_MIN))
    return -(-n // N_CTX_STEP) * N_CTX_STEP


@dataclass(frozen=True)
class AttentionPlacement:
    """The attention nodes (SOFT_MAX / FLASH_ATTN_EXT) of one decode that ran on one device."""

    device: str
    n_nodes: int
    n_biased: int


def describe_attention(model: Model, placements: Sequence[AttentionPlacement]) -> str:
    """One line: where attention ran, e.g. "Vulkan0 (18 of 18 attention nodes, 18 with the bias)"."""
    if model.n_gpu_layers == 0:
        return "CPU (no GPU offload)"
    total = sum(p.n_nodes for p in placements)
    if total == 0:
        return f"not recorded yet ({model.n_gpu_layers} layers offloaded to {', '.join(model.gpu_devices)})"
    parts = [
        f"{p.device} ({p.n_nodes} of {total} attention nodes"
        + (f", {p.n_biased} with the bias)" if p.n_biased else ")")
        for p in sorted(placements, key=lambda p: -p.n_nodes)
    ]
    return ", ".join(parts)


class Model:
    """A GGUF model loaded by the patched llama.cpp.

    gpu_layers: layers offloaded to a GPU backend (llama.cpp's -ngl); None (the default) offloads all of them
    when the build has a GPU backend (Vulkan, CUDA) with a device, 0 keeps everything on the CPU.
    """

    def __init__(self, path: str | os.PathLike[str], gpu_layers: int | None = None):
        self.path = Path(path)
        if gpu_layers is not None and gpu_layers < 0:
            raise ValueError(f"gpu_layers must be >= 0 (or None for all), not {gpu_layers}")
        if self.path.is_file():  # (a missing path: the engine's own "cannot open" error)
            try:  # what would make llama.cpp abort instead of refusing the file
                gguf_meta.check_model(self.path)
            except gguf_meta.GGUFMetaError as e:
                raise EngineError(str(e)) from None
        try:
            self._m = _core.Model(str(self.path), -1 if gpu_layers is None else gpu_layers)
        except _core.EngineError as e:
            raise EngineError(str(e)) from None
        info = self._m.info
        self.arch: str = info.arch
        self.name: str = info.name
        self.n_layer: int = info.n_layer
        self.n_head: int = info.n_head
        self.n_head_kv: int = info.n_head_kv
        self.n_embd: int = info.n_embd
        self.n_vocab: int = info.n_vocab
        self.n_ctx_train: int = info.n_ctx_train
        self.add_bos: bool = info.add_bos
        self.bos: int = info.bos
        self.eos: int = info.eos
        self.n_gpu_layers: int = info.n_gpu_layers
        self.gpu_devices: list[str] = list(info.gpu_devices)

    @property
    def bias_shape(self) -> tuple[int, int]:
        return (self.n_layer, self.n_head)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Tokens of text; with add_special the model's own BOS rule applies. Remembered per (text, flags):
        the engine's scoring tokenizes the same items on every call."""
        return self._m.tokenize(text, add_special, parse_special)

    def tokenize_uncached(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """tokenize() without the cache."""
        return self._m.tokenize_uncached(text, add_special, parse_special)

    @property
    def tokenize_cache_size(self) -> int:
        """Texts whose tokens are remembered."""
        return int(self._m.tokenize_cache_size)

    def clear_tokenize_cache(self) -> None:
        self._m.clear_tokenize_cache()

    @property
    def chat_template(self) -> str:
        """The chat template of the GGUF (tokenizer.chat_template; "" when it has none)."""
        return self._m.chat_template

    def apply_chat_template(
        self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """(role, content) messages formatted by llama.cpp's chat code as llama-server formats a
        /v1/chat/completions request with its defaults; EngineError when the model has no template."""
        return self._m.apply_chat_template([(str(r), str(c)) for r, c in messages], add_generation_prompt)

    def detokenize(self, tokens: Iterable[int]) -> str:
        return self._m.detokenize(list(tokens))


def _locate(message: str, items: Sequence[Item]) -> str:
    """The engine's "item I ..." message with item I's FILE:LINE instead of its index in this call."""
    m = re.match(r"item (\d+)\b:? ?(.*)", message, re.S)
    if m and int(m.group(1)) < len(items) and items[int(m.group(1))].where:
        return f"{items[int(m.group(1))].where}: the item {m.group(2)}"
    return message


class Context:
    """A llama.cpp context that scores items; its KV cache never outlives a bias change."""

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_batch: int = 512,
        n_ubatch: int = 512,
        n_threads: int = 2,
        n_seq_max: int = 64,
        flash_attn: bool | None = None,
        kv_f32: bool = False,
        n_outputs_max: int = 0,
    ):
        self.model = model
        fa = -1 if flash_attn is None else int(bool(flash_attn))
        try:
            self._c = _core.Context(
                model._m,
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=n_ubatch,
                n_threads=n_threads,
                n_seq_max=n_seq_max,
                flash_attn=fa,
                kv_f32=kv_f32,
                n_outputs_max=n_outputs_max,
            )
        except _core.EngineError as e:
            raise EngineError(str(e)) from None

    @property
    def n_ctx(self) -> int:
        return self._c.n_ctx

    @property
    def stats(self) -> dict[str, float]:
        return dict(self._c.stats)

    def attention_devices(self) -> list[AttentionPlacement]:
        """Where the attention nodes of the last decode ran, per device (recorded when layers are
        offloaded)."""
        return [AttentionPlacement(d, n, b) for d, n, b in self._c.attention_devices()]

    def probe_attention(self, bias: np.ndarray | None, item: Item) -> str:
        """Where attention runs with these biases: one item scored under them, described by
        :func:`describe_attention`. The context keeps the biases (its KV cache is cleared, as by set_bias)."""
        self.set_bias(bias)
        self.score([item], n_gen=1)
        return describe_attention(self.model, self.attention_devices())

    def reset_stats(self) -> None:
        self._c.reset_stats()

    def set_bias(self, bias: np.ndarray | None) -> None:
        """Set the first-token biases ([n_layer, n_head], logit units); None turns them off."""
        if bias is None:
            self._c.clear_bias()
            return
        bias = np.asarray(bias, dtype=np.float32)
        if bias.shape != self.model.bias_shape:
            raise ValueError(f"bias has shape {bias.shape}, the model needs {self.model.bias_shape}")
        if not np.all(np.isfinite(bias)):
            raise ValueError("bias has a non-finite value")
        self._c.set_bias(np.ascontiguousarray(bias))

    def get_bias(self) -> np.ndarray | None:
        b = self._c.get_bias()
        return None if b is None else np.asarray(b, dtype=np.float32).reshape(self.model.bias_shape)

    def score(
        self,
        items: Sequence[Item],
        *,
        n_gen: int = 1,
        gen_stop: Sequence[str] = (),
        parse_special: bool = True,
        logit_bias: Sequence[tuple[int, float]] = (),
    ) -> list[Scores]:
        """Score items (prompt + choices): one Scores per item, in order.

        logit_bias: (token, bias) pairs added to the logits before every greedy choice of the generation, as
        llama.cpp's --logit-bias does; the log-probabilities reported are the model's own."""
        prompts = [it.prompt for it in items]
        choices = [list(it.choices) for it in items]
        try:
            raw = self._c.score(
                prompts,
                choices,
                n_gen=n_gen,
                gen_stop=list(gen_stop),
                parse_special=parse_special,
                logit_bias=[(int(t), float(b)) for t, b in logit_bias],
            )
        except _core.EngineError as e:
            raise EngineError(_locate(str(e), items)) from None
        return [
            Scores(
                choice_logprob=np.asarray(r.choice_logprob, dtype=np.float64),
                choice_n_tokens=np.asarray(r.choice_n_tokens, dtype=np.int32),
                choice_first_logprob=np.asarray(r.choice_first_logprob, dtype=np.float64),
                entropy_full=r.entropy_full,
                entropy_choices=r.entropy_choices,
                gen_text=r.gen_text,
                gen_tokens=list(r.gen_tokens),
                n_prompt_tokens=r.n_prompt_tokens,
                choice_next_token=np.asarray(r.choice_next_token, dtype=np.int32),
                choice_next_logprob=np.asarray(r.choice_next_logprob, dtype=np.float64),
                other_next_logprob=float(r.other_next_logprob),
                choice_greedy=np.asarray(r.choice_greedy, dtype=bool),
            )
            for r in raw
        ]

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [n_tokens, n_vocab] of one sequence evaluated alone from an empty cache."""
        try:
            return self._c.logits(list(tokens))
        except _core.EngineError as e:
            raise EngineError(str(e)) from None


def first_token_warning(model: Model, items: Sequence[Item]) -> str | None:
    """zt_gguf.first_token's warning for these prompts on this model (None: position 0 is one token)."""
    firsts = (toks[0] for toks in (model.tokenize(it.prompt) for it in items) if toks)
    return warning(model.add_bos, firsts, lambda t: model.detokenize([t]))
