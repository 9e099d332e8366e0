"""The search's checkpoint: completed candidate evaluations (:class:`Evaluation`) in a :class:`SearchState`,
keyed by objective + a hash of the items (:func:`items_hash`) + a hash of the bias matrix (:func:`bias_hash`).
See "Checkpoint and resume" in zt_gguf.search."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fsutil import atomic_write_bytes
from .search_config import SearchError
from .tasks import Item

__all__ = ["STATE_VERSION", "Evaluation", "SearchState", "bias_hash", "items_hash"]

STATE_VERSION = 2  # 1: one scorer's records; still read


@dataclass
class Evaluation:
    """One candidate scored on the calibration items (the first n_items_evaluated of them)."""

    key: str
    description: str
    stage: str
    objective: float  # on the items evaluated
    n_items_evaluated: int
    n_items: int
    stopped_early: bool
    norm: float  # sum |ln gamma| of the candidate (tie-breaker)
    values: list[float] | None  # per-item objective values, in evaluation order; None: not decomposable
    summary: dict[str, Any]  # metrics.Summary of the items evaluated
    race: str | None = None  # the racing settings under which it was stopped early


def bias_hash(bias: np.ndarray) -> str:
    """A stable hash of a bias matrix rounded to 1e-6 (shape included)."""
    a = np.round(np.asarray(bias, dtype=np.float64), 6) + 0.0  # + 0.0 turns -0.0 into 0.0
    h = hashlib.sha256(repr(a.shape).encode())
    h.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
    return h.hexdigest()


def items_hash(items: Sequence[Item]) -> str:
    """A hash of the items in order (id, prompt, choices, answer)."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps([item.id, item.prompt, list(item.choices), item.answer]).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class SearchState:
    """Completed candidate evaluations of one scorer, keyed by objective:items-hash:bias-hash. On disk, one
    JSON file holds the records of every scorer that used it (calibrations of other tasks or with other
    scoring in the same report folder): loading takes this scorer's, saving keeps the others' as read."""

    scorer_id: str = ""
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    others: dict[str, Any] = field(default_factory=dict)  # the other scorers' records, as read

    def to_json(self) -> str:
        runs = dict(self.others)
        runs[self.scorer_id] = {"evaluations": {k: asdict(v) for k, v in self.evaluations.items()}}
        return json.dumps({"version": STATE_VERSION, "runs": runs})

    @classmethod
    def from_json(cls, text: str, scorer_id: str = "") -> SearchState:
        """The records of scorer_id in a checkpoint (none: an empty state that keeps the others')."""
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if obj.get("version") == 1:  # one scorer's records
            runs = {obj["scorer_id"]: {"evaluations": obj["evaluations"]}}
        elif obj.get("version") == STATE_VERSION and isinstance(obj.get("runs"), dict):
            runs = dict(obj["runs"])
        else:
            raise ValueError(f"not a version-{STATE_VERSION} search checkpoint")
        mine = runs.pop(scorer_id, {"evaluations": {}})
        return cls(
            scorer_id=scorer_id,
            evaluations={k: Evaluation(**v) for k, v in mine["evaluations"].items()},
            others=runs,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], scorer_id: str = "") -> SearchState:
        """This scorer's state saved at path, or an empty one when there is no file or no record of it."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(scorer_id=scorer_id)
        except OSError as e:
            raise SearchError(f"{path}: cannot read the checkpoint: {e.strerror or e}") from None
        try:
            return cls.from_json(text, scorer_id)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SearchError(
                f"{path}: not a valid search checkpoint ({e}); remove it to start over"
            ) from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state atomically (a temporary file in the same directory, then os.replace)."""
        atomic_write_bytes(path, self.to_json().encode("utf-8"))
