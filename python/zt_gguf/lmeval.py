"""lm-evaluation-harness on the scoring engine: the lm-eval model ``zt-gguf`` (``zt-gguf lm-eval``).

    zt-gguf lm-eval tuned.gguf -- --tasks my_task --include_path tasks/ --output_path out/
    lm_eval --model zt-gguf --model_args model=tuned.gguf,no_bias=True ...   (after zt_gguf.lmeval.register())

lm-eval (PyPI ``lm-eval``) has no entry point for models, so ``zt-gguf lm-eval`` registers the class, then
hands the rest of its arguments to lm-eval's own command line. The requests are scored by the batched engine:
loglikelihood requests that share a context become one item whose choices are their continuations (the
context is evaluated once, the continuations branch from it), as ``calibrate`` scores its items.

What a request is scored as, the same as lm-eval's ``gguf`` model against our llama-server: the context and
the continuation are tokenized together (BOS first where the model adds one) and the continuation's tokens are
those after the context's. Where the last context token merges with the continuation's first (a context that
ends in a space), the engine scores from the merged token on, as lm-eval's Hugging Face models do; the server
route then scores only the tokens that start after the context.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .engine import Context, EngineError, Model, fit_n_ctx
from .errors import UserError
from .tasks import Item

MODEL_NAME = "zt-gguf"
CHUNK = 32  # items a call to the engine (lm-eval's requests are many; the engine batches within a call)

log = logging.getLogger(__name__)


# lm-eval's task YAML for one of our JSONL files ({"prompt", "choices", "answer"} lines), read without the hub
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def task_yaml(name: str, data: str | Path) -> str:
    """lm-eval's multiple-choice task NAME over the JSONL file data (our item format)."""
    return TASK_YAML.format(name=name, data=Path(data).resolve())


class LMEvalError(UserError, RuntimeError):
    """lm-eval is missing, or the arguments for it are wrong (one line)."""


def _import_lm_eval() -> Any:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM
    except ImportError:
        raise LMEvalError(
            'lm-evaluation-harness is not installed: pip install "lm-eval[api]==0.4.13" '
            '(or install zt-gguf with the extra: pip install ".[lmeval]")'
        ) from None
    return LM


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _cut_at_stop(text: str, until: Sequence[str]) -> str:
    cut = len(text)
    for s in until:
        if s:
            i = text.find(s)
            if i >= 0:
                cut = min(cut, i)
    return text[:cut]


class EngineScorer:
    """The engine behind the lm-eval model: one Model, a Context sized to the requests, the stored biases
    (or none)."""

    def __init__(
        self, path: str | Path, *, no_bias: bool = False, gpu_layers: int | None = None, threads: int = 2
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise LMEvalError(f"{self.path}: no such model file")
        self.model = Model(self.path, gpu_layers=gpu_layers)
        self.no_bias = no_bias
        self.threads = threads
        self._ctx: Context | None = None

    def context(self, items: Sequence[Item], n_gen: int = 0) -> Context:
        need = fit_n_ctx(self.model, items, CHUNK, n_gen)
        if self._ctx is None or self._ctx.n_ctx < need:
            self._ctx = Context(self.model, n_threads=self.threads, n_ctx=need)
            if self.no_bias:
                self._ctx.set_bias(None)
        return self._ctx

    def loglikelihood(
        self, pairs: Sequence[tuple[str, str]], progress: Any = None
    ) -> list[tuple[float, bool]]:
        """log p(continuation | context) and whether every continuation token is the greedy one, per pair."""
        by_context: dict[str, list[str]] = {}
        for context, continuation in pairs:
            if not continuation:
                raise LMEvalError(f"an empty continuation for the context {context[:60]!r}")
            conts = by_context.setdefault(context, [])
            if continuation not in conts:
                conts.append(continuation)
        items = [
            Item(prompt=ctx, choices=tuple(conts), answer=None, id=f"lmeval-{i}")
            for i, (ctx, conts) in enumerate(by_context.items())
        ]
        if any(not it.prompt and not self.model.add_bos for it in items):
            raise LMEvalError(f"{self.path.name} adds no BOS token: an empty context cannot be scored")
        ctx = self.context(items)
        result: dict[tuple[str, str], tuple[float, bool]] = {}
        for k in range(0, len(items), CHUNK):
            chunk = items[k : k + CHUNK]
            try:
                scores = ctx.score(chunk, n_gen=0)
            except EngineError as e:
                raise LMEvalError(str(e)) from None
            for it, sc in zip(chunk, scores, strict=True):
                greedy = sc.choice_greedy if sc.choice_greedy is not None else np.zeros(len(it.choices), bool)
                for c, cont in enumerate(it.choices):
                    result[(it.prompt, cont)] = (float(sc.choice_logprob[c]), bool(greedy[c]))
            if progress is not None:
                progress.update(sum(len(it.choices) for it in chunk))
        return [result[p] for p in pairs]

    def generate(self, context: str, until: Sequence[str], max_gen_toks: int) -> str:
        """The greedy continuation of context, cut before the first stop string."""
        # the engine scores items with choices: a one-token dummy choice, whose score is not used
        item = Item(prompt=context, choices=(" ",), answer=None, id="lmeval-gen")
        ctx = self.context([item], n_gen=max_gen_toks)
        try:
            (sc,) = ctx.score([item], n_gen=max_gen_toks, gen_stop=[s for s in until if s])
        except EngineError as e:
            raise LMEvalError(str(e)) from None
        return _cut_at_stop(sc.gen_text, until)


def make_lm_class() -> type:
    """The lm-eval LM subclass (lm-eval is imported here, not at module import)."""
    # long because: the class is defined inside the function, so that lm-eval is imported only when used
    LM = _import_lm_eval()

    class ZtGgufLM(LM):  # type: ignore[misc, valid-type]
        """lm-eval's view of a GGUF scored by zt-gguf's engine.

        model_args: model=PATH (required), no_bias=True (the stored biases off), gpu_layers=N, threads=N."""

        def __init__(
            self,
            model: str | None = None,
            no_bias: Any = False,
            gpu_layers: Any = None,
            threads: Any = 2,
            max_gen_toks: Any = 256,
            **kwargs: Any,
        ) -> None:
            super().__init__()
            if not model:
                raise LMEvalError("the zt-gguf model needs model_args model=PATH")
            # lm-eval adds batch_size, max_batch_size and device: the engine chooses its own batches, on the
            # device its build has
            for k in kwargs:
                if k not in ("batch_size", "max_batch_size", "device"):
                    log.warning("zt-gguf: model argument %s is not used", k)
            self.scorer = EngineScorer(
                model,
                no_bias=_as_bool(no_bias),
                gpu_layers=None if gpu_layers in (None, "", "None") else int(gpu_layers),
                threads=int(threads),
            )
            self.max_gen_toks = int(max_gen_toks)

        # lm-eval's --apply_chat_template: the model's own template, formatted by llama.cpp's chat code (as
        # llama-server and `zt-gguf calibrate --chat` format it)
        @property
        def tokenizer_name(self) -> str:
            return f"zt-gguf:{self.scorer.path.name}"

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self.scorer.model.chat_template if chat_template else ""

        def apply_chat_template(
            self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
        ) -> str:
            if not self.scorer.model.chat_template:
                raise LMEvalError(f"{self.scorer.path.name} has no chat template: drop --apply_chat_template")
            messages = [(m["role"], m["content"]) for m in chat_history]
            return self.scorer.model.apply_chat_template(messages, add_generation_prompt)

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            from tqdm import tqdm

            pairs = [(str(r.args[0]), str(r.args[1])) for r in requests]
            with tqdm(total=len(pairs), disable=disable_tqdm, desc="zt-gguf loglikelihood") as bar:
                out = self.scorer.loglikelihood(pairs, progress=bar)
            for r, res in zip(requests, out, strict=True):
                self.cache_hook.add_partial("loglikelihood", r.args, res)
            return out

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            # the whole string after the BOS token, in one window (the context must hold it)
            if not self.scorer.model.add_bos:
                raise LMEvalError(
                    f"{self.scorer.path.name} adds no BOS token: loglikelihood_rolling needs one"
                )
            pairs = [("", str(r.args[0])) for r in requests]
            return [lp for lp, _ in self.scorer.loglikelihood(pairs)]

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            from tqdm import tqdm

            out = []
            warned = False
            for r in tqdm(requests, disable=disable_tqdm, desc="zt-gguf generate_until"):
                context, gen_kwargs = r.args[0], dict(r.args[1] or {})
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                if (
                    gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0) or 0) > 0
                ) and not warned:
                    log.warning(
                        "zt-gguf: the engine generates greedily; do_sample and temperature are ignored"
                    )
                    warned = True
                n = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
                text = self.scorer.generate(str(context), until, n)
                self.cache_hook.add_partial("generate_until", r.args, text)
                out.append(text)
            return out

    return ZtGgufLM


def register() -> type:
    """Register the ``zt-gguf`` model with lm-eval (its own models first, so that they stay available)."""
    _import_lm_eval()
    import lm_eval.models  # noqa: F401  (lm-eval's registry fills itself on first use otherwise)
    from lm_eval.api.registry import model_registry

    cls = make_lm_class()
    if MODEL_NAME not in model_registry.keys():
        model_registry.register(MODEL_NAME)(cls)
    return model_registry.get(MODEL_NAME)


def model_args(path: Path, *, no_bias: bool, gpu_layers: int | None, threads: int) -> str:
    if "," in str(path):
        raise LMEvalError(f"{path}: lm-eval's model_args cannot hold a path with a comma")
    args = [f"model={path}", f"threads={threads}"]
    if no_bias:
        args.append("no_bias=True")
    if gpu_layers is not None:
        args.append(f"gpu_layers={gpu_layers}")
    return ",".join(args)


def run_cli(
    path: Path, lm_eval_args: Sequence[str], *, no_bias: bool, gpu_layers: int | None, threads: int
) -> int:
    """lm-eval's command line with ``--model zt-gguf --model_args model=PATH,...`` and the given arguments."""
    rest = list(lm_eval_args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    for flag in ("--model", "--model_args"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise LMEvalError(f"zt-gguf lm-eval sets {flag} itself; give the model as its argument")
    if not path.is_file():
        raise LMEvalError(f"{path}: no such model file")
    register()
    from lm_eval.__main__ import cli_evaluate

    args = [
        "--model",
        MODEL_NAME,
        "--model_args",
        model_args(path, no_bias=no_bias, gpu_layers=gpu_layers, threads=threads),
    ]
    argv = sys.argv
    sys.argv = ["lm-eval", "run", *args, *rest]
    try:
        cli_evaluate()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = argv
    return 0
