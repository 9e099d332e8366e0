"""The options of the library's jobs: what calibrate() and evaluate() are asked to do."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .search import SearchConfig
from .tasks import Item


@dataclass
class CalibrateOptions:
    mode: str = "auto"  # auto | supervised | unsupervised
    scoring: str = "auto"  # auto | generate | choice (auto: see scoring.AUTO_MIN_VALID)
    objective: str | None = None  # None: DEFAULT_OBJECTIVE
    n_gen: int | None = None  # greedy tokens generated per item (None: 4, or 32 for an open-ended task)
    stop: tuple[str, ...] | None = None  # stop strings (None: the label words; a newline for open-ended)
    chat: bool = False  # every prompt a user message through the model's chat template (zt_gguf.chat)
    system: str | None = None  # with chat: a system message before it
    holdout: float = 0.3
    seed: int = 42  # of the split, the order the search scores items in (search.seed) and the bootstrap
    max_items: int | None = None
    search: SearchConfig = field(default_factory=SearchConfig)
    n_threads: int = 2
    gpu_layers: int | None = None  # None: all layers on a GPU backend when there is one (engine.Model)
    n_ctx: int | None = None  # None: fitted to the items (engine.fit_n_ctx)
    flash_attn: bool | None = None
    force: bool = False
    check_items: Sequence[Item] | None = None  # labelled items to check an unsupervised pick
    # the search over Ray workers (zt_gguf.distributed): workers on this machine, or a cluster's address
    workers: int | None = None
    ray_address: str | None = None
    worker_model: Path | None = None  # the model's path on the workers (None: model_path)

    @property
    def distributed(self) -> bool:
        return self.workers is not None or self.ray_address is not None


@dataclass
class EvaluateOptions:
    bias: str = "stored"  # "stored": the model's own biases | "off" | "file": bias_file's
    bias_file: Path | None = None  # a tuned GGUF, a bias GGUF or JSON (bias "file")
    correction: bool = True  # apply the output correction stored with the biases
    baselines: bool = True  # the label-free output-side baselines (and the untuned pass they need)
    n_gen: int | None = None  # None: 4, or 32 for an open-ended task
    stop: tuple[str, ...] | None = None  # None: the label words; a newline for open-ended tasks
    chat: bool = False
    system: str | None = None
    seed: int = 42  # of the paired bootstrap intervals
    n_threads: int = 2
    gpu_layers: int | None = None
    n_ctx: int | None = None


N_GEN_CHOICE = 4  # the default generation of multiple-choice tasks (a label word)
N_GEN_OPEN = 32  # the default generation of open-ended tasks (a short answer; raise it for chain of thought)
STOP_OPEN = ("\n",)  # open-ended answers end at the line's end, unless asked otherwise


def n_gen_for(kind: str, n_gen: int | None) -> int:
    """The tokens to generate per item for a task kind, unless n_gen says."""
    if n_gen is not None:
        return n_gen
    return N_GEN_OPEN if kind == "open" else N_GEN_CHOICE
