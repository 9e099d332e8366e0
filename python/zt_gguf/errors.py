"""The one error family for what a user can fix.

Every error that names a user's file, line, key, option or request and says what to change derives from
:class:`UserError`: the CLI prints it as one line (``zt-gguf: error: ...``) and exits 2. Anything else is a
bug, and the CLI lets its traceback show.
"""

from __future__ import annotations

__all__ = ["EngineErrorBase", "UserError"]


class UserError(Exception):
    """A problem in what the user gave (a file, a line, a key, an option): one line that says what."""


class EngineErrorBase(UserError, RuntimeError):
    """The base of zt_gguf._core.EngineError: the scoring engine refusing a model file, an item or a context
    size the user gave."""
