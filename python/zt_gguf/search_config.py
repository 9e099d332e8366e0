"""What a calibration search is asked to do: :class:`SearchConfig`, its validation, :class:`SearchError`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from .errors import UserError
from .objectives import get_objective
from .tasks import Item

__all__ = ["METHODS", "SearchConfig", "SearchError", "validated"]

METHODS = ("paper", "bands", "heads")


class SearchError(UserError, ValueError):
    """A search that cannot run as asked (configuration, items, checkpoint)."""


@dataclass
class SearchConfig:
    method: str = "paper"  # "paper" | "bands" | "heads"
    objective: str = "accuracy-generate"  # a name in objectives.OBJECTIVES
    probe_up: float = 2.0
    probe_down: float = 0.5
    head_fraction: float = 0.4
    grid_up: tuple[float, ...] = (1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
    grid_down: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    layer_start: int = 0
    layer_end: int | None = None  # exclusive; None: n_layer
    n_bands: int = 3
    budget: int = 60  # new candidates scored by the finer stage ("bands" / "heads")
    early_stop: bool = True
    chunk_size: int = 32
    # score the head probes on the first probe_items items only (rounded up to whole chunks); None: all items
    probe_items: int | None = None
    seed: int = 0  # of the permutation that fixes the order in which items are scored

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid_up"] = list(self.grid_up)
        d["grid_down"] = list(self.grid_down)
        return d


def validated(config: SearchConfig, shape: tuple[int, int], items: Sequence[Item]) -> SearchConfig:
    """config checked against the bias shape (n_layer, n_head) and the calibration items: a new SearchConfig
    with the grids as tuples of floats (config itself is left as it is); the first problem raises SearchError.
    """
    n_layer, n_head = shape
    if n_layer < 1 or n_head < 1:
        raise SearchError(f"bad bias shape {shape}")
    if config.method not in METHODS:
        raise SearchError(f"unknown method {config.method!r}; choose from {', '.join(METHODS)}")
    try:
        objective = get_objective(config.objective)
    except ValueError as e:
        raise SearchError(str(e)) from None
    if not items:
        raise SearchError("no calibration items")
    if objective.needs_labels and any(item.answer is None for item in items):
        raise SearchError(f"objective {config.objective!r} needs an answer for every calibration item")
    if not (math.isfinite(config.probe_up) and config.probe_up > 1):
        raise SearchError(f"probe_up must be > 1, got {config.probe_up}")
    if not (math.isfinite(config.probe_down) and 0 < config.probe_down < 1):
        raise SearchError(f"probe_down must be in (0, 1), got {config.probe_down}")
    if not 0 < config.head_fraction <= 1:
        raise SearchError(f"head_fraction must be in (0, 1], got {config.head_fraction}")
    grid_up = _check_grid("grid_up", config.grid_up, up=True)
    grid_down = _check_grid("grid_down", config.grid_down, up=False)
    end = config.layer_end if config.layer_end is not None else n_layer
    if not 0 <= config.layer_start < end <= n_layer:
        raise SearchError(f"layer range [{config.layer_start}, {end}) is not inside [0, {n_layer})")
    if config.n_bands < 1:
        raise SearchError(f"n_bands must be >= 1, got {config.n_bands}")
    if config.budget < 0:
        raise SearchError(f"budget must be >= 0, got {config.budget}")
    if config.chunk_size < 1:
        raise SearchError(f"chunk_size must be >= 1, got {config.chunk_size}")
    if config.probe_items is not None and config.probe_items < 1:
        raise SearchError(f"probe_items must be >= 1, got {config.probe_items}")
    return replace(config, grid_up=grid_up, grid_down=grid_down)


def _check_grid(name: str, grid: Sequence[float], up: bool) -> tuple[float, ...]:
    values = tuple(float(g) for g in grid)
    if not values:
        raise SearchError(f"{name} is empty")
    for g in values:
        if not math.isfinite(g) or g <= 0 or (up and g <= 1) or (not up and g >= 1):
            raise SearchError(f"{name} must hold gammas {'> 1' if up else 'in (0, 1)'}, got {g}")
    return values
