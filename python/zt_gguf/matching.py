"""Match rules for open-ended answers: does a greedy continuation give one of the reference answers?

* ``exact``: the continuation's first line equals a reference after SQuAD's normalisation (lower case,
  punctuation and the articles a / an / the removed, whitespace collapsed), as SQuAD's evaluation script
  compares answers;
* ``contains``: a normalised reference appears in the normalised continuation as whole words (for cloze
  prompts such as "The country of X is", continued with "a country in ... Russia");
* ``number``: the last number in the continuation equals the reference's number ("1,000", "3.50", "-2",
  "$18" all read as numbers; for chain-of-thought continuations, the final number is the answer);
* ``regex``: the first group of a user's regular expression (searched in the continuation) equals a
  reference after normalisation. A regex that repeats a repeat (``(a+)+``, ``((?:\\w+ ?)+)\\.``) is refused:
  Python's re can take exponential time on such a pattern when a continuation does not match. Other shapes
  backtrack exponentially too (overlapping alternatives in a repeat: ``((?:a|a)*)$``, ``((?:a|aa)+)$``), so
  the regex is also tried on a few probe texts within PROBE_TIMEOUT_S when the rule is made, and every
  search runs under a time limit (the ``regex`` module's ``timeout``, which Python's re lacks): a search past
  MATCH_TIMEOUT_S is a MatchTimeoutError, one line naming the regex, never a hang.

Pure functions; nothing here knows the engine.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import regex

from .errors import UserError

try:  # Python >= 3.11
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

RULES = ("exact", "contains", "number", "regex")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
# a number as people write it: an optional sign, digits with optional thousands commas, optional decimals
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w\d])-?\.\d+")
NUMBER_REL_TOL = 1e-9
SHOWN_CHARS = 60  # of a rule name or a regex quoted in an error message
MAX_PATTERN_CHARS = 10_000  # a longer answer regex is refused (re compiles a 2 MB one in seconds)
# one search of the user's regex in a continuation; an ordinary regex needs under a second for the longest
# continuation (2048 tokens), even one that backtracks quadratically ([\w ]+\. on 8,000 characters: 0.8 s)
MATCH_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 0.25  # one search of a probe text when the rule is made (microseconds for a sound regex)
# texts on which a regex that backtracks exponentially takes ages: a run of one kind of character, then one
# that ends the match
PROBES = tuple(c * 32 + end for c in ("a", "1", " ", "ab", "_", ".", "a1 ") for end in ("!", "\n", ""))


class MatchRuleError(ValueError):
    """A match rule that cannot be used (an unknown name, a regex without exactly one group)."""


class MatchTimeoutError(UserError):
    """The user's answer regex ran past MATCH_TIMEOUT_S on a continuation."""


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> Any:
    """The regex module's compilation of a pattern that Python's re accepts (the same syntax, V0)."""
    return regex.compile(pattern, regex.V0)


def backtracks_on_probes(pattern: str) -> bool:
    """Whether a search of the regex on one of PROBES runs past PROBE_TIMEOUT_S."""
    compiled = _compiled(pattern)
    for text in PROBES:
        try:
            compiled.search(text, timeout=PROBE_TIMEOUT_S)
        except TimeoutError:
            return True
    return False


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_line(text: str) -> str:
    """The continuation up to its first line break (leading blank lines skipped)."""
    stripped = text.lstrip("\n")
    return stripped.split("\n", 1)[0]


def parse_number(text: str) -> float | None:
    """The number a string holds ("1,000" -> 1000.0, "$3.50" -> 3.5, "-2" -> -2.0), or None."""
    found = _NUMBER.findall(text)
    if len(found) != 1:
        return None
    return float(found[0].replace(",", ""))


def last_number(text: str) -> float | None:
    """The last number written in a text (None: no number)."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def same_number(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=NUMBER_REL_TOL, abs_tol=NUMBER_REL_TOL)


def _shown(text: str) -> str:
    """repr() of a user's string for an error message, cut to SHOWN_CHARS."""
    return repr(text) if len(text) <= SHOWN_CHARS else repr(text[: SHOWN_CHARS - 3]) + "..."


_BACKTRACKING_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT)
_POSSESSIVE_REPEAT = getattr(_sre, "POSSESSIVE_REPEAT", None)  # Python >= 3.11
_ATOMIC_GROUP = getattr(_sre, "ATOMIC_GROUP", None)


def repeats_a_repeat(pattern: str) -> bool:
    r"""Whether a regex repeats (+, *, {m,n} with n > 1) a part holding a repeat of a variable count ((a+)+,
    (?:\w+\s?)*, (\d{1,3})+): the shape on which re backtracks exponentially when the text does not match.
    Possessive repeats and atomic groups (Python >= 3.11) do not backtrack and are not counted."""

    def walk(items: Iterable[tuple[Any, Any]], in_repeat: bool) -> bool:
        for op, av in items:
            if op in _BACKTRACKING_REPEATS:
                lo, hi, sub = av
                if in_repeat and hi > 1 and hi > lo:
                    return True
                if walk(sub, in_repeat or hi > 1):
                    return True
            elif op is _POSSESSIVE_REPEAT or op is _ATOMIC_GROUP:  # nothing inside is tried again
                if walk(av[-1] if op is _POSSESSIVE_REPEAT else av, False):
                    return True
            elif op is _sre.SUBPATTERN or op in (_sre.ASSERT, _sre.ASSERT_NOT):
                if walk(av[-1], in_repeat):
                    return True
            elif op is _sre.BRANCH:
                if any(walk(alt, in_repeat) for alt in av[1]):
                    return True
            elif op is _sre.GROUPREF_EXISTS:
                if any(walk(alt, in_repeat) for alt in av[1:] if alt is not None):
                    return True
        return False

    return walk(_sre_parse.parse(pattern), False)


@dataclass(frozen=True)
class MatchRule:
    """How a continuation is judged against the references."""

    name: str  # one of RULES
    pattern: str | None = None  # the regex of the "regex" rule, with exactly one group

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise MatchRuleError(f"unknown match rule {_shown(self.name)}; choose from {', '.join(RULES)}")
        if (self.name == "regex") != (self.pattern is not None):
            raise MatchRuleError(
                "the regex match rule needs an answer regex (--answer-regex), and only it takes one"
            )
        if self.pattern is not None:
            if len(self.pattern) > MAX_PATTERN_CHARS:
                raise MatchRuleError(
                    f"the answer regex {_shown(self.pattern)} is {len(self.pattern):,} characters long, "
                    f"more than {MAX_PATTERN_CHARS:,}"
                )
            try:
                groups = re.compile(self.pattern).groups
            except (re.error, OverflowError, RecursionError) as e:  # {m,n} past 2**32 - 1; deep nesting
                why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
                raise MatchRuleError(
                    f"the answer regex {_shown(self.pattern)} is not a regular expression: {why}"
                ) from None
            if groups != 1:
                raise MatchRuleError(
                    f"the answer regex {_shown(self.pattern)} must have exactly one group, has {groups}"
                )
            if repeats_a_repeat(self.pattern):
                raise MatchRuleError(
                    f"the answer regex {_shown(self.pattern)} repeats a repeat (like (a+)+ or (?:\\w+ ?)+), "
                    "which can take exponential time on a continuation that does not match: repeat a "
                    "character class instead ([\\w ]+), or make the inner repeat possessive (\\w++)"
                )
            try:
                slow = backtracks_on_probes(self.pattern)
            except (regex.error, OverflowError, RecursionError) as e:
                raise MatchRuleError(f"the answer regex {_shown(self.pattern)} cannot be used: {e}") from None
            if slow:
                raise MatchRuleError(
                    f"the answer regex {_shown(self.pattern)} takes over {PROBE_TIMEOUT_S} s on a "
                    f"{len(PROBES[0]) - 1}-character text: it backtracks exponentially (alternatives in a "
                    "repeat that can match the same text, like (?:a|a)* or (?:a|aa)+); use one character "
                    "class ([\\w]+) or alternatives that start differently"
                )

    def __str__(self) -> str:
        return self.name if self.pattern is None else f"{self.name}:{self.pattern}"

    def extract(self, continuation: str) -> str | None:
        """What the rule reads as the answer in a continuation (None: nothing, which counts as wrong)."""
        if self.name == "exact":
            return normalize(first_line(continuation))
        if self.name == "contains":
            return normalize(continuation)
        if self.name == "number":
            n = last_number(continuation)
            return None if n is None else repr(n)
        try:
            m = _compiled(self.pattern or "").search(continuation, timeout=MATCH_TIMEOUT_S)
        except TimeoutError:
            raise MatchTimeoutError(
                f"the answer regex {_shown(self.pattern or '')} ran over {MATCH_TIMEOUT_S:g} s on a "
                f"continuation of {len(continuation):,} characters (it backtracks too much); simplify it or "
                "lower --n-gen"
            ) from None
        return None if m is None or m.group(1) is None else normalize(m.group(1))

    def matches(self, continuation: str, references: Sequence[str]) -> bool:
        """Whether the continuation gives one of the references under this rule."""
        got = self.extract(continuation)
        if got is None:
            return False
        if self.name == "number":
            want = [n for n in (parse_number(r) for r in references) if n is not None]
            return any(same_number(float(got), w) for w in want)
        refs = [normalize(r) for r in references]
        if self.name == "contains":
            padded = f" {got} "
            return any(r and f" {r} " in padded for r in refs)
        return any(got == r for r in refs)
