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
import configparser
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
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


def _outer_pip_env() -> dict[str, str]:
    """The environment for a pip child process that sees the interpreter's own site-packages.

    Under pip's default build isolation, this script runs with PYTHONPATH pointing at the isolated build
    environment's sitecustomize.py and PYTHONNOUSERSITE=1, which hide the site-packages where pip itself
    lives ("No module named pip"). Dropping exactly those entries gives the child the user's interpreter,
    pip and pip configuration (config files and PIP_* variables pass through untouched)."""
    env = dict(os.environ)
    entries = [e for e in env.get("PYTHONPATH", "").split(os.pathsep) if e]
    kept = [e for e in entries if not (Path(e) / "sitecustomize.py").exists() or "pip-build-env" not in e]
    if len(kept) != len(entries):
        env.pop("PYTHONNOUSERSITE", None)
        if kept:
            env["PYTHONPATH"] = os.pathsep.join(kept)
        else:
            env.pop("PYTHONPATH", None)
    return env


def _pip_download(dest: str) -> str | None:
    """Download the sdist into dest with the user's pip. Returns None on success, else why it failed."""
    env = _outer_pip_env()
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, text=True, env=env
    )
    if probe.returncode != 0:
        return "no pip in this interpreter"
    # only this package from source; pip prepares its metadata in its own isolated environment, with
    # scikit-build-core as a wheel from the same index (nothing is compiled)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        f"--no-binary={SDIST_NAME}",
        "--disable-pip-version-check",
        "-q",
        "-d",
        dest,
        f"{SDIST_NAME}=={SDIST_VERSION}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode == 0 and (Path(dest) / SDIST_FILE).exists():
        return None
    lines = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
    return "pip download: " + (lines[-1] if lines else f"exit {res.returncode}, no {SDIST_FILE}")


def _index_url() -> str:
    """PIP_INDEX_URL, else index-url from the pip configuration files, else PyPI (pip-less interpreters)."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].split()[0]
    user_config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    files = [
        "/etc/pip.conf",
        "/etc/xdg/pip/pip.conf",
        os.path.expanduser("~/.pip/pip.conf"),
        os.path.join(user_config, "pip", "pip.conf"),
        os.path.join(sys.prefix, "pip.conf"),
        os.environ.get("PIP_CONFIG_FILE") or "",
    ]
    url = "https://pypi.org/simple"
    for f in files:
        cp = configparser.ConfigParser()
        try:
            cp.read(f)
        except configparser.Error:
            continue
        for section in ("global", "download"):
            if cp.has_option(section, "index-url"):
                url = cp.get(section, "index-url").split()[0]
    return url


def _direct_download(dest: str) -> str | None:
    """Fetch the sdist from the index's simple API (PEP 691 JSON) without pip. None on success."""
    base = _index_url().rstrip("/")
    cafile = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or None
    ctx = ssl.create_default_context(cafile=cafile)
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))
    try:
        req = urllib.request.Request(
            f"{base}/{SDIST_NAME}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
        )
        with opener.open(req, timeout=120) as r:
            files = json.load(r)["files"]
        url = next(f["url"] for f in files if f["filename"] == SDIST_FILE)
        with (
            opener.open(urllib.parse.urljoin(f"{base}/{SDIST_NAME}/", url), timeout=600) as r,
            open(Path(dest) / SDIST_FILE, "wb") as out,
        ):
            shutil.copyfileobj(r, out)
    except (OSError, ValueError, KeyError, StopIteration) as e:
        return f"{base}: {type(e).__name__}: {e}"
    return None


def fetch_sdist() -> Path:
    """Return the path of the verified sdist: $ZT_GGUF_LLAMA_SDIST, the cache, or a download.

    The download uses the user's pip (so its index URL, proxy and certificates apply), or, in an
    interpreter without pip, the index's simple API directly."""
    given = os.environ.get("ZT_GGUF_LLAMA_SDIST")
    if given:
        path = Path(given)
        if not path.is_file():
            raise FetchError(f"ZT_GGUF_LLAMA_SDIST={given}: no such file")
        digest = sha256_of(path)
        if digest != SDIST_SHA256:
            raise FetchError(f"ZT_GGUF_LLAMA_SDIST={given}: sha256 {digest} is not the pinned {SDIST_SHA256}")
        return path
    target = cache_dir() / SDIST_FILE
    if target.exists() and sha256_of(target) == SDIST_SHA256:
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        print("fetch_llama_cpp: downloading", f"{SDIST_NAME}=={SDIST_VERSION}", flush=True)
        why = _pip_download(tmp)
        if why == "no pip in this interpreter":
            why = _direct_download(tmp)
        if why is not None:
            raise FetchError(
                f"could not download {SDIST_NAME}=={SDIST_VERSION} ({why}); check that the package index "
                f"is reachable (pip's index-url, proxy, cert), or download {SDIST_FILE} yourself and set "
                "ZT_GGUF_LLAMA_SDIST=/path/to/it"
            )
        got = Path(tmp) / SDIST_FILE
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
