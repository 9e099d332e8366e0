"""Named first-token-bias profiles: one model, several tunings (issue 15).

A profile is a name and biases [n_layer, n_head], read from a GGUF holding the bias key (a tuned model, or the
small sidecar that ``zt-gguf export-profile`` and ``zt-gguf calibrate --profile-out`` write, with the tuned
file's ``zerotuning.*`` provenance) or from JSON (a flat or nested list, or ``{"first_token_bias": ...}``).
The names ``none`` (bias off) and ``stored`` (the model's own key, or none) are reserved.

    profiles = load_profiles(["sst2=sst2.profile.gguf", "agnews=agnews.json"], model_info)
    ctx.set_bias(resolve(profiles, "sst2", model_info))        # the engine
    use_profile(llm, resolve(profiles, "agnews", model_info))  # llama-cpp-python (zt_gguf.llama_cpp_compat)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import fsutil, gguf_meta
from .errors import UserError
from .gguf_meta import GGUFMetaError, ModelInfo

NONE = "none"  # the bias off
STORED = "stored"  # the model's stored bias (none if it has none)
RESERVED = (NONE, STORED)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ProfileError(UserError, ValueError):
    """A profile problem; str() is one line naming the file or the name."""


@dataclass
class Profile:
    name: str
    biases: np.ndarray  # float32 [n_layer, n_head]
    source: Path
    provenance: dict[str, Any] = field(default_factory=dict)  # zerotuning.* without the prefix

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.biases.shape[0]), int(self.biases.shape[1]))


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ProfileError(
            f"profile name {name!r}: 1-64 letters, digits, '_', '.' or '-', the first a letter or a digit"
        )
    if name in RESERVED:
        raise ProfileError(f"profile name {name!r} is reserved ({', '.join(RESERVED)})")
    return name


def parse_spec(spec: str) -> tuple[str, Path]:
    """NAME=FILE -> (NAME, FILE)."""
    name, sep, file = spec.partition("=")
    if not sep or not file:
        raise ProfileError(f"profile {spec!r}: expected NAME=FILE")
    return check_name(name), Path(file)


def load_profile(name: str, path: str | os.PathLike[str], info: ModelInfo) -> Profile:
    """The profile NAME from PATH, its shape checked against the model of info."""
    path = Path(path)
    check_name(name)
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile file (profile {name!r})")
    try:
        biases = gguf_meta.read_bias_file(path, info)
        provenance: dict[str, Any] = {}
        try:
            with path.open("rb") as f:
                is_gguf = f.read(4) == gguf_meta.MAGIC
            if is_gguf:
                provenance = gguf_meta.read_provenance(path)
            else:
                doc = json.loads(path.read_text(encoding="utf-8-sig"))
                if isinstance(doc, dict) and isinstance(doc.get("zerotuning"), dict):
                    provenance = dict(doc["zerotuning"])
        except (GGUFMetaError, OSError, ValueError):
            provenance = {}
    except GGUFMetaError as e:
        raise ProfileError(f"profile {name!r}: {e}") from None
    return Profile(name=name, biases=biases, source=path, provenance=provenance)


def load_profiles(specs: Iterable[str], info: ModelInfo) -> dict[str, Profile]:
    """Profiles from NAME=FILE specs; a name given twice is an error."""
    out: dict[str, Profile] = {}
    for spec in specs:
        name, path = parse_spec(spec)
        if name in out:
            raise ProfileError(f"profile {name!r} is given twice ({out[name].source} and {path})")
        out[name] = load_profile(name, path, info)
    return out


def resolve(profiles: Mapping[str, Profile], name: str | None, info: ModelInfo) -> np.ndarray | None:
    """The biases a name selects: a profile's, None for "none", the model's own for "stored" or None."""
    if name is None or name == STORED:
        return info.biases
    if name == NONE:
        return None
    if name not in profiles:
        known = ", ".join([*RESERVED, *sorted(profiles)])
        raise ProfileError(f"unknown profile {name!r}; known: {known}")
    return profiles[name].biases


def export_profile(tuned: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the biases and provenance of a tuned GGUF as a profile: a sidecar GGUF (no tensors), or JSON
    when out ends in .json. The input is never modified; the write is atomic."""
    tuned, out = Path(tuned), Path(out)
    info = gguf_meta.read_model_info(tuned)
    if info.biases is None:
        why = f" ({info.bias_problem})" if info.bias_problem else ""
        raise ProfileError(f"{tuned}: holds no usable first-token bias{why}")
    return write_profile(out, info.biases, info.arch, info.provenance)


def write_profile(
    out: str | os.PathLike[str], biases: np.ndarray, arch: str, provenance: Mapping[str, Any] | None = None
) -> Path:
    out = Path(out)
    if out.suffix == ".json":
        values = np.asarray(biases, dtype=np.float32).tolist()
        doc = {"first_token_bias": values, "zerotuning": dict(provenance or {})}
        try:
            return fsutil.atomic_write_bytes(out, (json.dumps(doc) + "\n").encode())
        except OSError as e:
            raise ProfileError(f"{out}: cannot write: {e.strerror or e}") from None
    scalars = {k: v for k, v in (provenance or {}).items() if isinstance(v, (str, int, float, bool))}
    return gguf_meta.write_bias_gguf(out, biases, arch, scalars)


def describe(profile: Profile) -> dict[str, Any]:
    """What a listing shows of a profile: name, shape, file and provenance."""
    return {
        "name": profile.name,
        "shape": list(profile.shape),
        "file": str(profile.source),
        "provenance": profile.provenance,
    }


def score_under(ctx: Any, profiles: Mapping[str, Profile], name: str | None, items: Any, **kw: Any) -> Any:
    """The engine's scores of items under a named profile (zt_gguf.engine.Context.score's keywords); the
    context keeps that profile's biases afterwards (its KV cache is cleared by the change, as by set_bias)."""
    info = gguf_meta.read_model_info(ctx.model.path)
    ctx.set_bias(resolve(profiles, name, info))
    return ctx.score(items, **kw)
