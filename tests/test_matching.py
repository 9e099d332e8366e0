"""The match rules of open-ended answers (zt_gguf.matching) against hand-checked cases.

Each expected value below was worked out by hand from the rule's definition (SQuAD's normalisation: lower
case, punctuation removed, the articles a / an / the removed, whitespace collapsed), not by running the code.
"""

from __future__ import annotations

import re
import sys

import pytest

from zt_gguf import matching
from zt_gguf.errors import UserError
from zt_gguf.matching import MatchRule, MatchRuleError, MatchTimeoutError, normalize

EXACT, CONTAINS, NUMBER = MatchRule("exact"), MatchRule("contains"), MatchRule("number")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("The Eiffel Tower!", "eiffel tower"),  # case, punctuation, a leading article
        ("  An   apple,\ta day ", "apple day"),  # two articles, whitespace runs and a tab
        ("U.S.A.", "usa"),  # punctuation is removed, not replaced by a space
        ("Rock'n'Roll", "rocknroll"),
        ("theatre and anthem", "theatre and anthem"),  # articles only as whole words
        ("THE", ""),
    ],
)
def test_normalize_as_squad(text: str, want: str) -> None:
    assert normalize(text) == want


@pytest.mark.parametrize(
    ("continuation", "references", "want"),
    [
        ("Paris", ["paris"], True),
        (" The Paris.", ["Paris"], True),  # leading space, article, final full stop
        ("PARIS\nThe capital of France.", ["Paris"], True),  # only the first line is read
        ("London\nParis", ["Paris"], False),
        ("\n\nParis", ["Paris"], True),  # leading blank lines are skipped
        ("Paris is the capital", ["Paris"], False),  # exact, not contains
        ("NYC", ["New York City", "N.Y.C."], True),  # any reference
        ("new  york", ["New York"], True),
        ("", ["Paris"], False),
    ],
)
def test_exact_reads_the_first_line(continuation: str, references: list[str], want: bool) -> None:
    assert EXACT.matches(continuation, references) is want


@pytest.mark.parametrize(
    ("continuation", "references", "want"),
    [
        ("It is a city in France: Paris.", ["Paris"], True),
        ("Parisian food", ["Paris"], False),  # whole words only
        ("I love New York City", ["new york"], True),  # several words
        ("newyork", ["new york"], False),
        ("York, New", ["new york"], False),
        ("a sport that is played\nwith a Ball", ["ball"], True),  # the whole continuation, every line
        ("the", ["The"], False),  # a reference that normalises to nothing matches nothing
        ("a cat", ["dog", "cat"], True),
    ],
)
def test_contains_whole_words(continuation: str, references: list[str], want: bool) -> None:
    assert CONTAINS.matches(continuation, references) is want


@pytest.mark.parametrize(
    ("continuation", "references", "want"),
    [
        ("It costs 1,000 dollars", ["1000"], True),  # thousands separators
        ("1000", ["1,000"], True),
        ("1,234,567", ["1234567"], True),
        ("That is 3.50", ["3.5"], True),  # decimals compared as numbers
        ("$3.50", ["3.50"], True),
        ("0.5", [".5"], True),
        ("-2", ["-2"], True),
        ("-2", ["2"], False),  # the sign counts
        ("pages 3-5", ["5"], True),  # a hyphen after a digit is no minus sign
        ("$18", ["18"], True),
        ("She makes $18 a day.", [" 18"], True),  # GSM8K's references keep a leading space
        ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18", ["18"], True),  # chain of thought: the last number wins
        ("18 first, then 20", ["18"], False),
        ("The answer is 18.", ["18"], True),  # a full stop after the number
        ("no number here", ["0"], False),  # no number: wrong
        ("", ["0"], False),
        ("7", ["seven"], False),  # a reference without a number matches nothing
        ("12", ["11", "12"], True),  # any reference
    ],
)
def test_number_reads_the_last_number(continuation: str, references: list[str], want: bool) -> None:
    assert NUMBER.matches(continuation, references) is want


def test_number_extracts_nothing_without_a_number() -> None:
    assert NUMBER.extract("none at all") is None
    assert NUMBER.extract("2 then 3,000.5") == repr(3000.5)


@pytest.mark.parametrize(
    ("pattern", "continuation", "references", "want"),
    [
        (r"answer is (\w+)", "So the answer is Paris, of course.", ["paris"], True),
        (r"answer is (\w+)", "So the answer is London.", ["Paris"], False),
        (r"answer is (\w+)", "I do not know.", ["Paris"], False),  # no match: wrong
        (r"\(([A-D])\)", "I pick (B) because", ["b"], True),  # the group is normalised
        (r"#### (.+)", "work...\n#### The Nile", ["Nile"], True),  # searched in the whole continuation
        (r"(?:answer: (\d+))?", "no answer", ["1"], False),  # the group did not take part: wrong
        (r"(?P<a>\d+) apples", "5 apples", ["5"], True),  # a named group is the one group
    ],
)
def test_regex_reads_its_one_group(
    pattern: str, continuation: str, references: list[str], want: bool
) -> None:
    assert MatchRule("regex", pattern).matches(continuation, references) is want


@pytest.mark.parametrize(
    ("name", "pattern", "message"),
    [
        ("regex", r"answer is \w+", "exactly one group, has 0"),
        ("regex", r"(\w+) is (\w+)", "exactly one group, has 2"),
        ("regex", r"(unclosed", "is not a regular expression"),
        ("regex", None, "needs an answer regex"),
        ("exact", r"(\w+)", "needs an answer regex"),  # only the regex rule takes one
        ("fuzzy", None, "unknown match rule"),
        # found by benchmarks/fuzz_tasks.py (re.compile raised RecursionError, OverflowError; a 2 MB regex
        # took seconds to compile)
        ("regex", "(" * 1000 + "a" + ")" * 1000, "is not a regular expression: nested too deeply"),
        ("regex", "a{4294967296}(x)", "is not a regular expression: the repetition number is too large"),
        ("regex", "(x)" + "y" * 10_000, "is 10,003 characters long, more than 10,000"),
    ],
)
def test_unusable_rules_are_refused(name: str, pattern: str | None, message: str) -> None:
    with pytest.raises(MatchRuleError, match=message):
        MatchRule(name, pattern)


def test_long_names_and_regexes_are_cut_in_messages() -> None:
    for name, pattern in (("x" * 3000, None), ("regex", "(" * 3000), ("regex", "(x)(y)" * 500)):
        with pytest.raises(MatchRuleError) as info:
            MatchRule(name, pattern)
        assert len(str(info.value)) < 200 and "..." in str(info.value)


# a repeat inside a repeat: re tries every way of splitting the text between the two when it does not match
# (worked out by hand; "(a+)+$" on 30 a's and a b is 2**30 tries, minutes; found by benchmarks/fuzz_tasks.py,
# where "((?:\w+\s?)+)\.$" on a 60-character sentence without the period hung eval)
REPEATED_REPEATS = [
    r"(a+)+$",
    r"((?:\w+\s?)+)\.$",
    r"(\d+)*x",
    r"((?:a*)*)b",
    r"((?:\d{1,3})+)x",  # a bounded repeat of a variable count
    r"(a+?)+?$",  # lazy
    r"(?:(a)|b+)+",  # in one branch
    r"(?=((?:a|b+)+))c",  # in a lookahead
]
# repeats that are not repeated, or that cannot split a text two ways
SAFE_REPEATS = [
    r"answer is (\w+)",
    r"([\w ]+)\.",  # a repeated character class
    r"(?:ab?)+(x)",  # the inner repeat takes at most one
    r"(?:\d{3})+(x)",  # a fixed count
    r"(\w+) \w+",  # repeats side by side
    r"(?:answer: (\d+))?",  # an optional group
]
if sys.version_info >= (3, 11):  # possessive repeats and atomic groups do not backtrack
    SAFE_REPEATS += [r"((?:\w++\s?)+)\.", r"((?>\w+\s?)+)\."]


@pytest.mark.parametrize("pattern", REPEATED_REPEATS)
def test_a_repeated_repeat_is_refused(pattern: str) -> None:
    with pytest.raises(MatchRuleError, match="repeats a repeat"):
        MatchRule("regex", pattern)


@pytest.mark.parametrize("pattern", SAFE_REPEATS)
def test_other_repeats_are_accepted(pattern: str) -> None:
    assert MatchRule("regex", pattern).pattern == pattern


def test_a_non_capturing_group_does_not_count() -> None:
    rule = MatchRule("regex", r"(?:the )?answer: (\w+)")
    assert rule.matches("the answer: cat", ["cat"])
    assert str(rule) == "regex:(?:the )?answer: (\\w+)"


# alternatives in a repeat that can match the same text: exponential backtracking without a repeated repeat
# (the fuzzer's R2); refused by the probe searches when the rule is made
OVERLAPPING_ALTERNATIVES = [r"((?:a|a)*)$", r"((?:a|aa)+)$", r"(?:x|x)*((?:1|1)+)!$"]


@pytest.mark.parametrize("pattern", OVERLAPPING_ALTERNATIVES)
def test_overlapping_alternatives_in_a_repeat_are_refused(pattern: str) -> None:
    with pytest.raises(MatchRuleError, match="backtracks exponentially") as e:
        MatchRule("regex", pattern)
    assert "\n" not in str(e.value)


def test_a_search_past_the_time_limit_is_one_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A regex that passes the probes but backtracks (quadratically here) on a long continuation: the search
    stops at MATCH_TIMEOUT_S with a MatchTimeoutError (a UserError: one line from the CLI), not a hang."""
    rule = MatchRule("regex", r"((?:\w|\d)+)$")
    long = "ab" * 4000 + "!"
    assert rule.matches("the answer 42", ["42"])
    monkeypatch.setattr(matching, "MATCH_TIMEOUT_S", 0.001)
    with pytest.raises(MatchTimeoutError, match=r"ran over 0.001 s on a continuation of 8,001 characters"):
        rule.matches(long, ["ab"])
    assert isinstance(MatchTimeoutError("x"), UserError)


@pytest.mark.parametrize("pattern", SAFE_REPEATS + [r"^\W*([\w'-]+)", r"(?i)answer: *(\d+)"])
def test_regex_searches_agree_with_python_re(pattern: str) -> None:
    """The regex module (which runs the searches, for its time limit) reads what Python's re reads."""
    texts = ["answer is cat.", "hello world. x", "abab x", "123456x", "  it's fine", "Answer: 17", ""]
    texts.append("ab\nx")
    rule = MatchRule("regex", pattern)
    for text in texts:
        m = re.search(pattern, text)
        want = None if m is None or m.group(1) is None else normalize(m.group(1))
        assert rule.extract(text) == want, text
