"""GGUF metadata of ZeroTuning: the first-token attention bias and the provenance keys.

- :mod:`.scan`: a fast scanner of the GGUF layout (key/values and tensor infos over a memory map, every
  length checked, the vocabulary skipped), and GGUFMetaError.
- :mod:`.keys`: the key names (the only module that knows them) and their checks: ModelInfo,
  read_model_info, validate_biases, read_bias_file, read_provenance.
- :mod:`.edit`: write_tuned, apply_biases, strip and write_bias_gguf, which write atomically and never
  modify the input.
- :mod:`.preflight`: check_model, the checks a model file passes before llama.cpp is given it (what would
  make llama.cpp abort instead of returning an error); zt_gguf.engine.Model runs it.

Every problem of a file raises GGUFMetaError (a zt_gguf.errors.UserError) with a one-line message naming the
file (and the key).
"""

from __future__ import annotations

from .edit import apply_biases, strip, write_bias_gguf, write_tuned
from .keys import (
    BIAS_KEY_SUFFIX,
    MAX_BIAS_VALUES,
    MAX_LAYERS,
    PROVENANCE_PREFIX,
    ModelInfo,
    ProvenanceValue,
    bias_key,
    read_bias_file,
    read_model_info,
    read_provenance,
    validate_biases,
)
from .preflight import PER_LAYER_KV_ARCHS, check_model
from .scan import MAGIC, MAX_DECODED_STRING_ARRAY, GGUFMetaError, read_layout

_scan = read_layout  # the name the fuzz and reliability tests use

__all__ = [
    "BIAS_KEY_SUFFIX",
    "MAGIC",
    "MAX_BIAS_VALUES",
    "MAX_DECODED_STRING_ARRAY",
    "MAX_LAYERS",
    "PER_LAYER_KV_ARCHS",
    "PROVENANCE_PREFIX",
    "GGUFMetaError",
    "ModelInfo",
    "ProvenanceValue",
    "apply_biases",
    "bias_key",
    "check_model",
    "read_bias_file",
    "read_layout",
    "read_model_info",
    "read_provenance",
    "strip",
    "validate_biases",
    "write_bias_gguf",
    "write_tuned",
]
