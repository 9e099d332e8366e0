#!/usr/bin/env python3
"""Fetch the pinned llama.cpp tree and apply zt-gguf's patch series to it.

The tree is the ``vendor/llama.cpp`` folder (llama.cpp commit 0c1e57098) of the PyPI sdist
``llama-cpp-python==0.3.36``. The sdist is downloaded with pip, checked against a pinned
sha256, unpacked into ``third_party/llama.cpp`` (git-ignored) and ``cpp/patches/*.patch`` are
applied in name order.

Running it again is a no-op while the patch series is unchanged; when a patch changed, the
tree is unpacked afresh and the series applied again. A patch that does not apply stops the
script with a message naming it.

    python scripts/fetch_llama_cpp.py            # fetch, unpack, patch
    python scripts/fetch_llama_cpp.py --stock DIR  # an unpatched copy (for benchmarks)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TREE_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"

REPO = Path(__file__).resolve().parent.parent
PATCH_DIR = REPO / "cpp" / "patches"
STAMP = ".zt-gguf-patches"


class FetchError(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("ZT_GGUF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zt-gguf"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist() -> Path:
    """Return the path of the verified sdist, downloading it with pip if it is not cached."""
    target = cache_dir() / SDIST_FILE
    if target.exists() and sha256_of(target) == SDIST_SHA256:
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        # --no-build-isolation: pip must not build the sdist's build dependencies from source
        # (with --no-binary=:all: it would compile cmake) just to read its metadata
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary=:all:",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            f"{SDIST_NAME}=={SDIST_VERSION}",
        ]
        print("fetch_llama_cpp: downloading", f"{SDIST_NAME}=={SDIST_VERSION}", flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST_FILE
        if res.returncode != 0 or not got.exists():
            raise FetchError(f"pip download of {SDIST_NAME}=={SDIST_VERSION} failed:\n{res.stderr.strip()}")
        digest = sha256_of(got)
        if digest != SDIST_SHA256:
            raise FetchError(f"{SDIST_FILE}: sha256 {digest} does not match the pinned {SDIST_SHA256}")
        os.replace(got, target)
    return target


def unpack(sdist: Path, dest: Path) -> None:
    """Unpack the llama.cpp tree of the sdist into dest (which must not exist)."""
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(TREE_PREFIX) or not (m.isfile() or m.isdir() or m.issym()):
                    continue
                m.name = m.name[len(TREE_PREFIX) :]
                # the sdist's gitlink file points to a parent repository that is not there
                if m.name in ("", ".git"):
                    continue
                members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def patch_series() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def series_stamp(patches: list[Path]) -> str:
    lines = [f"{SDIST_SHA256}  {SDIST_FILE}"]
    lines += [f"{sha256_of(p)}  {p.name}" for p in patches]
    return "\n".join(lines) + "\n"


def apply_patch(tree: Path, patch: Path) -> None:
    base = ["patch", "-p1", "--forward", "--batch", "--silent", "-d", str(tree), "-i", str(patch)]
    check = subprocess.run(base + ["--dry-run"], capture_output=True, text=True)
    if check.returncode != 0:
        raise FetchError(
            f"patch {patch.name} does not apply to {tree}:\n{(check.stdout + check.stderr).strip()}"
        )
    res = subprocess.run(base, capture_output=True, text=True)
    if res.returncode != 0:
        raise FetchError(f"patch {patch.name} failed:\n{(res.stdout + res.stderr).strip()}")


def prepare(tree: Path, patches: list[Path]) -> bool:
    """Make tree the pinned llama.cpp with the patches applied. Returns False if it already was."""
    stamp = series_stamp(patches)
    stamp_file = tree / STAMP
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return False
    sdist = fetch_sdist()
    tree.parent.mkdir(parents=True, exist_ok=True)
    if tree.exists():
        print(f"fetch_llama_cpp: the patch series changed, unpacking {tree} afresh", flush=True)
        shutil.rmtree(tree)
    unpack(sdist, tree)
    for p in patches:
        print(f"fetch_llama_cpp: applying {p.name}", flush=True)
        apply_patch(tree, p)
    stamp_file.write_text(stamp)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dest",
        type=Path,
        default=REPO / "third_party" / "llama.cpp",
        help="where the patched tree goes (default: third_party/llama.cpp)",
    )
    ap.add_argument(
        "--stock",
        type=Path,
        metavar="DIR",
        help="unpack an unpatched tree into DIR instead (for side-by-side benchmarks)",
    )
    args = ap.parse_args(argv)
    try:
        if args.stock:
            if not (args.stock / STAMP).exists():
                if args.stock.exists():
                    shutil.rmtree(args.stock)
                args.stock.parent.mkdir(parents=True, exist_ok=True)
                unpack(fetch_sdist(), args.stock)
                (args.stock / STAMP).write_text(series_stamp([]))
            print(f"fetch_llama_cpp: stock tree at {args.stock}")
            return 0
        changed = prepare(args.dest.resolve(), patch_series())
        print(f"fetch_llama_cpp: {'patched' if changed else 'up to date:'} {args.dest}")
        return 0
    except (FetchError, OSError, tarfile.TarError) as e:
        print(f"fetch_llama_cpp: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
