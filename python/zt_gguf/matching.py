"""Match rules for open-ended answers: does a greedy continuation give one of the reference answers?

* ``exact``: the continuation's first line equals a reference after SQuAD's normalisation (lower case,
  punctuation and the articles a / an / the removed, whitespace collapsed), as SQuAD's evaluation script
  compares answers;
* ``contains``: a normalised reference appears in the normalised continuation as whole words (for cloze
  prompts such as "The country of X is", continued with "a country in ... Russia");
* ``number``: the last number in the continuation equals the reference's number ("1,000", "3.50", "-2",
  "$18" all read as numbers; for chain-of-thought continuations, the final number is the answer);
* ``regex``: the first group of a user's regular expression (searched in the continuation) equals a
  reference after normalisation.

Pure functions; nothing here knows the engine.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

RULES = ("exact", "contains", "number", "regex")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
# a number as people write it: an optional sign, digits with optional thousands commas, optional decimals
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w\d])-?\.\d+")
NUMBER_REL_TOL = 1e-9


class MatchRuleError(ValueError):
    """A match rule that cannot be used (an unknown name, a regex without exactly one group)."""


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


@dataclass(frozen=True)
class MatchRule:
    """How a continuation is judged against the references."""

    name: str  # one of RULES
    pattern: str | None = None  # the regex of the "regex" rule, with exactly one group

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise MatchRuleError(f"unknown match rule {self.name!r}; choose from {', '.join(RULES)}")
        if (self.name == "regex") != (self.pattern is not None):
            raise MatchRuleError(
                "the regex match rule needs an answer regex (--answer-regex), and only it takes one"
            )
        if self.pattern is not None:
            try:
                groups = re.compile(self.pattern).groups
            except re.error as e:
                raise MatchRuleError(
                    f"the answer regex {self.pattern!r} is not a regular expression: {e}"
                ) from None
            if groups != 1:
                raise MatchRuleError(
                    f"the answer regex {self.pattern!r} must have exactly one group, has {groups}"
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
        m = re.search(self.pattern or "", continuation)
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
