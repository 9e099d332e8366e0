"""Where the patched llama.cpp libraries and tools built with this package live.

The wheel installs libllama/ggml and the tools (llama-cli, llama-completion, llama-server,
llama-perplexity, llama-bench) into ``zt_gguf/bin`` with an ``$ORIGIN`` RPATH, next to the
extension module. ``ZT_GGUF_BIN`` overrides the folder (for a build tree).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import UserError

TOOLS = ("llama-cli", "llama-completion", "llama-server", "llama-perplexity", "llama-bench")


class ToolError(UserError, RuntimeError):
    pass


def bin_dir() -> Path:
    """The folder holding libllama.so and the llama tools."""
    override = os.environ.get("ZT_GGUF_BIN")
    if override:
        path = Path(override)
    else:
        # next to the compiled extension (in an editable install the Python files live elsewhere)
        spec = importlib.util.find_spec("zt_gguf._core")
        base = Path(spec.origin).parent if spec and spec.origin else Path(__file__).resolve().parent
        path = base / "bin"
    if not (path / "libllama.so").exists() and not (path / "libllama.dylib").exists():
        raise ToolError(f"{path}: no libllama here; reinstall zt-gguf (pip install .) or set ZT_GGUF_BIN")
    return path


def tool_path(name: str) -> Path:
    """The path of one of the llama tools built from the patched tree."""
    if name not in TOOLS and not name.startswith("test-"):
        raise ToolError(f"unknown tool {name!r}; the tools are {', '.join(TOOLS)}")
    path = bin_dir() / name
    if not path.exists():
        raise ToolError(f"{path} is missing; reinstall zt-gguf")
    return path


def llama_cpp_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """An environment in which llama-cpp-python loads the patched libllama (LLAMA_CPP_LIB_PATH)."""
    res = dict(os.environ if env is None else env)
    res["LLAMA_CPP_LIB_PATH"] = str(bin_dir())
    return res
