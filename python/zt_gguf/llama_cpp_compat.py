"""llama-cpp-python on the patched libllama: load a model and read or set its first-token bias.

llama-cpp-python is installed without compiling anything (``CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install
llama-cpp-python==0.3.36``) and loads the libllama named by the environment variable ``LLAMA_CPP_LIB_PATH``
when ``llama_cpp`` is first imported. This module points that variable at the patched libllama built with
zt-gguf (:func:`zt_gguf.tools.bin_dir`) and binds the three C functions that llama-cpp-python does not know::

    from zt_gguf.llama_cpp_compat import load_llama, set_first_token_bias, get_first_token_bias
    llm = load_llama("tuned.gguf", n_ctx=2048)       # the stored bias is on
    set_first_token_bias(llm, None)                   # off; the cache is cleared
    set_first_token_bias(llm, biases)                 # [n_layer, n_head] (or flat), logit units

Struct layouts: the patched tree is the ``vendor/llama.cpp`` of the llama-cpp-python 0.3.36 sdist, so the
ctypes definitions of llama-cpp-python 0.3.36 (``llama_model_params`` with ``load_mode``/``lazy_mode``,
``llama_context_params`` with ``n_rs_seq``/``ctx_type``, ``llama_batch``, ...) match our ``llama.h`` field
by field, size and offsets alike (checked by tests/test_tools.py with a C++ compiler). ``llama_cpp.Llama``
is therefore used as it is; no structure is patched. Another llama-cpp-python version is not supported.

A bias change does not recompute what is already in the KV cache (the keys and values of every token after
position 0 depend on the bias of the earlier layers), so :func:`set_first_token_bias` clears the context's
memory and resets the ``Llama`` object's token history after a successful change.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from . import tools
from .errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from llama_cpp import Llama

__all__ = [
    "AttnFtbError",
    "LlamaCppCompatError",
    "get_first_token_bias",
    "import_llama_cpp",
    "load_llama",
    "n_attn_ftb",
    "set_first_token_bias",
]

LIB_PATH_ENV = "LLAMA_CPP_LIB_PATH"

# return codes of llama_set_attn_ftb
FTB_OK = 0
FTB_WRONG_LENGTH = -1
FTB_NOT_FINITE = -2
_FTB_MESSAGES = {
    FTB_WRONG_LENGTH: "wrong number of values (the model needs n_layer*n_head)",
    FTB_NOT_FINITE: "a value is not finite",
}


class LlamaCppCompatError(RuntimeError):
    """llama-cpp-python is missing or is not running on the patched libllama."""


class AttnFtbError(UserError, ValueError):
    """llama_set_attn_ftb refused a bias; ``code`` is its return value (-1 length, -2 non-finite)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def import_llama_cpp() -> ModuleType:
    """Import llama_cpp on the patched libllama and bind the first-token bias functions.

    If llama_cpp is not imported yet and ``LLAMA_CPP_LIB_PATH`` is unset, it is set to
    :func:`zt_gguf.tools.bin_dir`. A libllama without ``llama_set_attn_ftb`` (llama_cpp imported earlier
    with its own or another library) raises LlamaCppCompatError: the library cannot be swapped in a running
    process.
    """
    if "llama_cpp" not in sys.modules and not os.environ.get(LIB_PATH_ENV):
        os.environ[LIB_PATH_ENV] = str(tools.bin_dir())
    try:
        import llama_cpp
    except ImportError as e:
        raise LlamaCppCompatError(
            f"llama-cpp-python is not installed ({e}); install it without compiling: "
            'CMAKE_ARGS="-DLLAMA_BUILD=OFF" pip install llama-cpp-python==0.3.36'
        ) from None
    _bind(llama_cpp.llama_cpp._lib)
    return llama_cpp


def _bind(lib: ctypes.CDLL) -> None:
    try:
        set_fn = lib.llama_set_attn_ftb
        get_fn = lib.llama_get_attn_ftb
        n_fn = lib.llama_model_n_attn_ftb
    except AttributeError:
        where = getattr(lib, "_name", "?")
        raise LlamaCppCompatError(
            f"llama_cpp runs on {where}, which is not zt-gguf's patched libllama (no llama_set_attn_ftb); "
            f"set {LIB_PATH_ENV}={_bin_dir_or_hint()} before the first 'import llama_cpp' "
            "(in a new process)"
        ) from None
    set_fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t]
    set_fn.restype = ctypes.c_int32
    get_fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t]
    get_fn.restype = ctypes.c_int32
    n_fn.argtypes = [ctypes.c_void_p]
    n_fn.restype = ctypes.c_int32


def _bin_dir_or_hint() -> str:
    try:
        return str(tools.bin_dir())
    except tools.ToolError:
        return "<the folder of zt-gguf's libllama>"


def _lib() -> ctypes.CDLL:
    return import_llama_cpp().llama_cpp._lib


def load_llama(path: str | os.PathLike[str], **kwargs: Any) -> Llama:
    """A ``llama_cpp.Llama`` for the GGUF at path on the patched libllama (its stored bias on).

    kwargs go to ``Llama`` (``verbose`` defaults to False), e.g. ``n_ctx``, ``logits_all``, ``flash_attn``,
    ``n_threads``.
    """
    llama_cpp = import_llama_cpp()
    kwargs.setdefault("verbose", False)
    return llama_cpp.Llama(model_path=str(Path(path)), **kwargs)


def n_attn_ftb(llm: Llama) -> int:
    """The length of the model's first-token bias (n_layer * n_head)."""
    return int(_lib().llama_model_n_attn_ftb(llm._model.model))


def set_first_token_bias(llm: Llama, bias: Any | None, *, check: bool = True) -> int:
    """Set the first-token bias of llm's context ([n_layer, n_head] or flat layer-major, logit units); None
    turns it off.

    Returns llama_set_attn_ftb's code: 0, -1 (wrong length) or -2 (a non-finite value); with check (the
    default) a non-zero code raises AttnFtbError instead. On error the current bias is unchanged. On success
    the KV cache is cleared and llm.reset() is called, so the next evaluation starts afresh. A ``Llama``
    with a state cache (``llm.set_cache``) is refused: its saved states hold the old bias's keys and values.
    """
    if getattr(llm, "cache", None) is not None:
        raise LlamaCppCompatError(
            "the Llama has a state cache computed with the current bias; llm.set_cache(None) first"
        )
    fn = _lib().llama_set_attn_ftb
    ctx = llm._ctx.ctx
    if bias is None:
        code = int(fn(ctx, None, 0))
    else:
        with np.errstate(over="ignore"):
            arr = np.asarray(bias, dtype=np.float32)
        n = n_attn_ftb(llm)
        n_layer = _n_layer(llm)
        if arr.ndim == 2 and arr.size == n and n_layer > 0 and arr.shape != (n_layer, n // n_layer):
            raise ValueError(
                f"bias has shape {arr.shape}, the model needs (n_layer, n_head) = ({n_layer}, {n // n_layer})"
            )
        values = np.ascontiguousarray(arr.reshape(-1))
        code = int(fn(ctx, values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), values.size))
    if code != FTB_OK:
        if check:
            reason = _FTB_MESSAGES.get(code, "unknown error")
            raise AttnFtbError(code, f"llama_set_attn_ftb refused the bias ({code}): {reason}")
        return code
    llm._ctx.kv_cache_clear()
    llm.reset()
    return code


def get_first_token_bias(llm: Llama) -> np.ndarray | None:
    """The current first-token bias of llm's context as float32 [n_layer, n_head], or None if it is off."""
    lib = _lib()
    n = n_attn_ftb(llm)
    if n <= 0:
        return None
    out = (ctypes.c_float * n)()
    got = int(lib.llama_get_attn_ftb(llm._ctx.ctx, out, n))
    if got == 0:
        return None
    values = np.frombuffer(out, dtype=np.float32, count=min(got, n)).copy()
    n_layer = _n_layer(llm)
    if n_layer > 0 and values.size % n_layer == 0:
        return values.reshape(n_layer, values.size // n_layer)
    return values


def _n_layer(llm: Llama) -> int:
    return int(import_llama_cpp().llama_model_n_layer(llm._model.model))


def use_profile(llm: Llama, name: str | None, profiles: Mapping[str, Any]) -> bool:
    """Switch llm to a named profile (zt_gguf.profiles: a loaded profile's name, "none" or "stored"). The
    bias is set, and the KV cache cleared, only when it changes; returns whether it changed."""
    from . import gguf_meta
    from .profiles import resolve

    info = gguf_meta.read_model_info(llm.model_path)
    want = resolve(profiles, name, info)
    have = get_first_token_bias(llm)
    if (want is None and have is None) or (
        want is not None and have is not None and have.shape == want.shape and np.array_equal(have, want)
    ):
        return False
    set_first_token_bias(llm, want)
    return True
