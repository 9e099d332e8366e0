"""Fuzz the task loader (zt_gguf.tasks.load_task) and the match rules of open-ended items (issue 25, item 3).

    python benchmarks/fuzz_tasks.py --executions 1000000 --seed 1 --record benchmarks/results/fuzz_tasks.md

A seeded, structure-aware mutation fuzzer. Execution i builds one input from (seed, i) alone, so any input can
be rebuilt from its index (``--show I``): a valid task file of one of the formats (round robin over FORMATS:
"prompt" lines with choices; "text" lines with a template and label words given as arguments or by the
{"zt_task": ...} header; open-ended {"prompt", "answers"} / {"prompt", "answer"} lines with a match rule from
the header or the arguments), then 0 to 4 mutations at the JSON level (a value's type swapped, keys dropped,
renamed, added or duplicated, huge numbers, NaN and Infinity, deep nesting, lone surrogates, long strings,
lines dropped, duplicated, moved or of another format, headers anywhere), at the byte level (bytes flipped,
inserted, deleted, duplicated, invalid UTF-8, BOMs, CR and CRLF endings, truncation, lines past the 16 MiB
limit) or in the arguments (templates, label words, match rules, answer regexes with 0 or 2 groups, broken or
catastrophic regexes, max_items). The file is written under --work (a tmpfs) and loaded.

The oracle. Every input either loads, and then the Task is consistent (items with non-empty prompts and
choices, answers in range, open-ended items with references and the task's match rule, has_answers, n_lines
and sha256 of the bytes, unique ids, max_items), and an unmutated input (or one with only neutral mutations:
blank lines, CRLF, a BOM, spacing, an extra key) gives exactly the items it was built from; or it raises
TaskError (a UserError) whose str is one line starting "FILE: " or "FILE:LINE: " with LINE in the file. On
every loaded open-ended task the match rule judges fuzzed continuations (the references themselves, reworded,
numbers, long and adversarial text): MatchRule.matches must return a bool, agree with a second route (a
reference judged against itself is right; the regex rule recomputed with re), and take under MATCH_SLOW_S.

A finding is anything else: another exception, a multi-line or misplaced message, an inconsistent Task, a
wrong match, a slow load or match, or a hang or crash. The inputs run in one child process (fork) watched by
this process: an input running past --time-limit is a hang, the child is killed and restarted after it (the
chunk it was in runs again, without it, so the counts stay exact). Findings are printed with their index
and kept under --work/findings.

--atheris: coverage-guided instead (atheris, libFuzzer: it mutates the bytes from which the same generator
draws its decisions; the same oracle; libFuzzer's -timeout for hangs), for runs beside the seeded one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import random
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from zt_gguf import matching, tasks  # noqa: E402
from zt_gguf.errors import UserError  # noqa: E402
from zt_gguf.matching import RULES, MatchRule, normalize  # noqa: E402
from zt_gguf.tasks import CONTENT_FREE, MAX_LINE_BYTES, TaskError  # noqa: E402

FORMATS = ("prompt", "text", "open")
CHUNK = 500  # executions between two reports of the child (a restarted child reruns its chunk)
MATCH_SLOW_S = 0.5  # a match call slower than this (plus 1 us a character of text) is a finding, but
REGEX_QUADRATIC_S = 3e-8  # a user's regex may take this times the continuation's length squared (Q1 of KNOWN)
MAX_CONTINUATION = 10_000  # characters: 2048 generated tokens (--n-gen's limit) of ~5 characters
LOAD_SLOW_S = 3.0  # so is a load slower than this (rerun once: the machine is shared)
LONG_MESSAGE = 2000  # characters: a longer error message is a finding (one line, but unreadable)

WORDS = "the a cat dog sat on mat Paris Nile one two 3 42 1,000 -2 yes no answer is: of review fine".split()
LABELS = [" negative", " positive", " neutral", " yes", " no", " maybe", " A", " B", " C", " D", "sports"]
TEMPLATES = ["Review: {text}\nSentiment:", "{title}: {text}\nAnswer:", "{text}", "Q: {text} ({n})\nA:"]
BAD_TEMPLATES = [
    "",
    "no placeholder",
    "{txt}",
    "{text",
    "text}",
    "{}{text}",
    "{0} {text}",
    "{text!r}",
    "{text:>9}",
    "{text.upper}",
    "{text[0]}",
    "{{text}}",
    "{text}{missing}",
    "{ text }",
    "{text}\ud800",
    "{" + "f" * 5000 + "}{text}",  # a long field name (quoted in messages)
    "{" + "f" * 3000 + "!r}{text}",
]
GOOD_REGEXES = [
    r"answer is (\w+)",
    r"\(([A-D])\)",
    r"#### (.+)",
    r"(\d+)",
    r"(?P<a>\w+)",
    r"(?:the )?answer: (\w+)",
    r"(?:answer: (\d+))?",
    r"(?i)^\s*(yes|no)\b",
    r"([\w ]+)\.",
]
BAD_REGEXES = [
    r"answer is \w+",
    r"(\w+) (\w+)",
    r"(unclosed",
    "[",
    r"(?P<1>x)",
    "\\",
    r"(?<=a+)(b)",
    "",
    "(?i",
    r"(?:x)",
    r"(a)\2",
    "(" * 200 + "a" + ")" * 200,
    "(a" + "|a" * 5000 + ")",
    "\x00(x)",
    "\ud800(x)",
    "(" * 1000 + "a" + ")" * 1000,  # deeper than re's parser recurses
    "a{4294967296}(x)",  # a repeat count past re's limit
    "(x)" + "y" * 20_000,  # long
]
# exponential backtracking: a repeat inside a repeat, the classic shape
NESTED_REGEXES = [
    r"(a+)+$",
    r"((?:\w+\s?)+)\.$",
    r"(\d+)*x",
    r"((?:a*)*)b",
    r"((?:x+x+)+)y",
    r"^((?:\w+ ?)*)!$",
    r"(?:answer: )?((?:\w+\s*)+)\.",
    r"((?:\d{1,3})+)x",
    r"(?=((?:a|b+)+))c",
]
# exponential backtracking with no nested repeat: overlapping alternatives in a repeat
OTHER_SLOW_REGEXES = [r"((?:a|a)*)$", r"((?:\w|\d)+)$", r"((?:a|aa)+)$"]
MATCH_NAMES = [*RULES, "", "EXACT", "fuzzy", "regex ", "x" * 3000]
HUGE_INTS = [10**30, -(10**30), 2**63, 2**64 + 1, -(2**63) - 1]
NONCHAR = ["\ud800", "\udfff", "\x00", "\u2028", "\x1c", "\x85", "\r", "\x0b", "\ufeff", "\U0010ffff"]


class Raw:
    """JSON text written as is (huge integers, NaN, deep nesting)."""

    def __init__(self, text: str) -> None:
        self.text = text


class Pairs(list):  # type: ignore[type-arg]
    """A JSON object written from (key, value) pairs: keys may repeat."""


@dataclasses.dataclass
class Case:
    """One fuzz input: the file's bytes, the load_task arguments, and what a correct load gives."""

    index: int
    fmt: str  # one of FORMATS
    variant: str  # how the rule, template or label words are given
    data: bytes
    kwargs: dict[str, Any]
    name: str  # the file name
    mutations: list[str]
    expect: list[dict[str, Any]] | None  # the items of an input with only neutral mutations (else None)


# --- building a valid input ---------------------------------------------------------------------------------


def _words(rng: random.Random, lo: int = 1, hi: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _ident(rng: random.Random, used: set[str]) -> Any:
    while True:
        value: Any = rng.randrange(10**6) if rng.random() < 0.3 else f"q{rng.randrange(10**6)}"
        if str(value) not in used:
            used.add(str(value))
            return value


def _base(
    rng: random.Random, fmt: str
) -> tuple[dict[str, Any] | None, list[Any], dict[str, Any], str, list[dict[str, Any]] | None]:
    """(header, line objects, load_task kwargs, variant, expected items) of a valid file; no expected items
    for an open-ended file given a catastrophic answer regex."""
    n = rng.choice((1, 1, 2, 3, 5, 8))
    header: dict[str, Any] | None = None
    kwargs: dict[str, Any] = {}
    lines: list[Any] = []
    expect: list[dict[str, Any]] = []
    used: set[str] = set()
    if fmt == "prompt":
        variant = "prompt"
        for _ in range(n):
            k = rng.randint(2, 5)
            choices = [f" {w}" for w in rng.sample(WORDS, k)]
            obj: dict[str, Any] = {"prompt": _words(rng) + ":", "choices": choices}
            if rng.random() < 0.8:
                obj["answer"] = rng.randrange(k)
            if rng.random() < 0.5:
                obj["id"] = _ident(rng, used)
            if rng.random() < 0.3:
                obj["fields"] = {"q": obj["prompt"][:3]}
            lines.append(obj)
            expect.append({"prompt": obj["prompt"], "choices": tuple(choices), "answer": obj.get("answer")})
        return header, lines, kwargs, variant, expect
    if fmt == "text":
        k = rng.randint(2, 4)
        words = rng.sample(LABELS, k)
        template = rng.choice(TEMPLATES)
        variant = rng.choice(("args", "header", "header-template+arg-choices", "both"))
        if variant in ("args", "both"):
            kwargs = {"template": template, "choices": list(words)}
        if variant in ("header", "both"):
            header = {"template": "{text}", "choices": words[::-1]} if variant == "both" else {}
            header = header or {"template": template, "choices": words}  # "both": the arguments win
        if variant == "header-template+arg-choices":
            header, kwargs = {"template": template}, {"choices": list(words)}
        for _ in range(n):
            obj = {"text": _words(rng), "title": _words(rng, 1, 2), "n": rng.choice((1, 2.5, "x"))}
            label: Any = None
            r = rng.random()
            if r < 0.4:
                label = rng.randrange(k)
                obj["label"] = label
            elif r < 0.8:
                label = rng.randrange(k)
                obj["label"] = rng.choice(("", " ", "\t")) + words[label].strip() + rng.choice(("", " "))
            if rng.random() < 0.3:
                obj["id"] = _ident(rng, used)
            lines.append(obj)
            prompt = template.format(**obj)
            expect.append({"prompt": prompt, "choices": tuple(words), "answer": label})
        return header, lines, kwargs, variant, expect
    rule = rng.choice(RULES)
    pattern = rng.choice(GOOD_REGEXES) if rule == "regex" else None
    slow = rule == "regex" and rng.random() < 0.2
    if slow:  # a regex that can backtrack for ages (R1, R2 of KNOWN)
        pattern = rng.choice(NESTED_REGEXES + OTHER_SLOW_REGEXES)
    variant = rng.choice(("header", "args", "default") if rule == "exact" else ("header", "args"))
    if variant == "header":
        header = {"match": rule} if pattern is None or rng.random() < 0.5 else {}
        if pattern is not None:
            header["answer_regex"] = pattern
    elif variant == "args":
        kwargs = {"match": rule} if pattern is None or rng.random() < 0.5 else {}
        if pattern is not None:
            kwargs["answer_regex"] = pattern
    for _ in range(n):
        refs = [rng.choice((_words(rng, 1, 3), str(rng.randint(-999, 99999)), "1,000", "$3.50", "-.5"))]
        refs += [_words(rng, 1, 2) for _ in range(rng.choice((0, 0, 1, 3)))]
        obj = {"prompt": "Q: " + _words(rng) + "?\nA:"}
        if len(refs) == 1 and rng.random() < 0.4:
            obj["answer"] = refs[0]
        else:
            obj["answers"] = refs
        if rng.random() < 0.3:
            obj["id"] = _ident(rng, used)
        lines.append(obj)
        expect.append({"prompt": obj["prompt"], "references": tuple(refs), "rule": (rule, pattern)})
    return header, lines, kwargs, variant, None if slow else expect


# --- mutations ----------------------------------------------------------------------------------------------


def _long_string(rng: random.Random) -> str:
    size = rng.choice((300, 5000, 100_000, 1_000_000)) if rng.random() < 0.9 else 4_000_000
    return rng.choice("ax é\n{") * size


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.randrange(22)
    if r == 0:
        return None
    if r == 1:
        return rng.choice((True, False))
    if r == 2:
        return rng.choice((0, 1, -1, 2, 7))
    if r == 3:
        return rng.choice(HUGE_INTS)
    if r == 4:
        return rng.choice((0.0, 1.0, -0.5, 1e308, 5e-324, math.nan, math.inf, -math.inf))
    if r == 5:
        return Raw(
            rng.choice(("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "-0", "1E2", "0.1e-999999"))
        )
    if r == 6:  # the most digits Python converts, and more
        return Raw("9" * rng.choice((4300, 4301, 5000, 100_000)))
    if r == 7:
        d = rng.choice((50, 990, 1100, 5000, 100_000))
        return Raw("[" * d + "]" * d if rng.random() < 0.5 else '{"a":' * d + "1" + "}" * d)
    if r == 8:
        return _long_string(rng)
    if r == 9:
        return "".join(rng.choice(NONCHAR + ["a", " "]) for _ in range(rng.randint(1, 4)))
    if r in (10, 11):
        return rng.choice(("", " ", "\n\t ", "x", " positive", "{text}", "{", "0", "N/A"))
    if r == 12:
        return []
    if r == 13:
        return {}
    if r == 14 and depth < 3:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(1, 4))]
    if r == 15 and depth < 3:
        return {rng.choice(("text", "prompt", "a", "")): _random_value(rng, depth + 1)}
    if r == 16:
        return [rng.choice(LABELS) for _ in range(rng.randint(0, 4))]
    if r == 17:
        return rng.choice(GOOD_REGEXES + BAD_REGEXES + NESTED_REGEXES + OTHER_SLOW_REGEXES)
    if r == 18:
        return rng.choice(MATCH_NAMES)
    if r == 19:
        return rng.choice(TEMPLATES + BAD_TEMPLATES)
    if r == 20:
        return _words(rng)
    return rng.randint(-3, 10)


def _slots(obj: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) of a JSON tree."""
    if isinstance(obj, dict):
        for key in list(obj):
            out.append((obj, key))
            _slots(obj[key], out)
    elif isinstance(obj, list) and not isinstance(obj, Pairs):
        for i in range(len(obj)):
            out.append((obj, i))
            _slots(obj[i], out)
    return out


KEYS = ["prompt", "choices", "answer", "answers", "text", "label", "id", "title", "n", "fields", "zt_task"]
KEYS += ["template", "match", "answer_regex", "Prompt", "", "x_extra"]


def _mutate_tree(rng: random.Random, header: list[Any], lines: list[Any]) -> str:
    """One JSON-level mutation of the header (a one-element list) or a line; returns its name."""
    roots = [x for x in header + lines if isinstance(x, (dict, list))]
    op = rng.randrange(9)
    if not roots:
        op = 8
    if op <= 2:  # a value replaced (often by one of another type)
        slots = _slots(rng.choice(roots), [])
        if slots:
            container, key = rng.choice(slots)
            container[key] = _random_value(rng)
            return "value"
        op = 4
    if op == 3:  # a key dropped
        dicts = [c for c, _ in _slots(rng.choice(roots), []) if isinstance(c, dict)] + [
            r for r in roots if isinstance(r, dict)
        ]
        if dicts:
            d = rng.choice(dicts)
            if d:
                d.pop(rng.choice(list(d)))
                return "drop-key"
        op = 4
    if op == 4:  # a key added (maybe one of the loader's)
        dicts = [r for r in roots if isinstance(r, dict)]
        if dicts:
            rng.choice(dicts)[rng.choice(KEYS)] = _random_value(rng)
            return "add-key"
        op = 8
    if op == 5:  # a key renamed
        dicts = [r for r in roots if isinstance(r, dict) and r]
        if dicts:
            d = rng.choice(dicts)
            old = rng.choice(list(d))
            d[rng.choice(KEYS)] = d.pop(old)
            return "rename-key"
        op = 8
    if op == 6:  # a key written twice
        i = rng.randrange(len(lines)) if lines else None
        if i is not None and isinstance(lines[i], dict) and lines[i]:
            pairs = Pairs(lines[i].items())
            k, v = rng.choice(pairs)
            pairs.insert(rng.randrange(len(pairs) + 1), (k, v if rng.random() < 0.5 else _random_value(rng)))
            lines[i] = pairs
            return "duplicate-key"
        op = 8
    if op == 7:  # a list entry duplicated, dropped or emptied
        lists = [c for c, _ in _slots(rng.choice(roots), []) if isinstance(c, list)]
        if lists:
            lst = rng.choice(lists)
            if lst and rng.random() < 0.5:
                lst.insert(rng.randrange(len(lst) + 1), lst[rng.randrange(len(lst))])
            elif lst:
                lst.pop(rng.randrange(len(lst)))
            return "list"
        op = 8
    # op 8: lines dropped, duplicated, moved, replaced, or of another format
    r = rng.randrange(7)
    if r == 0 and lines:
        lines.pop(rng.randrange(len(lines)))
        return "drop-line"
    if r == 1 and lines:
        lines.insert(rng.randrange(len(lines) + 1), lines[rng.randrange(len(lines))])
        return "duplicate-line"
    if r == 2 and len(lines) > 1:
        lines.insert(rng.randrange(len(lines)), lines.pop())
        return "move-line"
    if r == 3:
        other = rng.choice(("prompt", "text", "open"))
        _, more, _, _, _ = _base(rng, other)
        lines.insert(rng.randrange(len(lines) + 1), more[0])
        return "other-format-line"
    if r == 4:
        value = rng.choice(([1, 2], "hello", 42, None, Raw("{}"), Raw("[]"), True))
        lines.insert(rng.randrange(len(lines) + 1), value)
        return "not-an-object"
    if r == 5:
        h = {"zt_task": rng.choice(({"match": "number"}, {"template": "{text}"}, [1], {}, {"x": 1}))}
        lines.insert(rng.randrange(len(lines) + 1), h)
        return "header-line"
    if header and isinstance(header[0], dict):
        header[0] = _random_value(rng) if rng.random() < 0.3 else {**header[0], "x": 1}
        return "header"
    return "noop"


def _mutate_kwargs(rng: random.Random, kwargs: dict[str, Any]) -> str:
    key = rng.choice(("template", "choices", "match", "answer_regex", "max_items", "allow_duplicate_choices"))
    if key == "template":
        kwargs[key] = rng.choice(TEMPLATES + BAD_TEMPLATES + [_long_string(rng)[:5000]])
    elif key == "choices":
        words = rng.sample(LABELS, rng.randint(0, 4))
        r = rng.random()
        if r < 0.2 and words:
            words.append(words[0].strip())  # the same label word twice
        elif r < 0.4:
            words.append(rng.choice(("", " ", "\ud800", "\n")))
        elif r < 0.5:
            kwargs[key] = " a b"  # a string, not a list
            return "arg-choices"
        kwargs[key] = words if rng.random() < 0.7 else tuple(words)
    elif key == "match":
        kwargs[key] = rng.choice(MATCH_NAMES)
    elif key == "answer_regex":
        kwargs[key] = rng.choice(GOOD_REGEXES + BAD_REGEXES + NESTED_REGEXES + OTHER_SLOW_REGEXES)
    elif key == "max_items":
        kwargs[key] = rng.choice((0, -1, 1, 2, 10**20, True))
    else:
        kwargs[key] = True
    return f"arg-{key}"


def _dump(value: Any, ascii_only: bool, sep: str) -> str:
    if isinstance(value, Raw):
        return value.text
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=ascii_only)
    if isinstance(value, Pairs):
        items = list(value)
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        return "[" + sep.join(_dump(v, ascii_only, sep) for v in value) + "]"
    return "{" + sep.join(f"{_dump(k, ascii_only, sep)}:{_dump(v, ascii_only, sep)}" for k, v in items) + "}"


def _serialize(rng: random.Random, header: list[Any], lines: list[Any], neutral: list[str]) -> bytes:
    ascii_only = rng.random() < 0.5
    sep = rng.choice((", ", ",", " , "))
    objs = [{"zt_task": h} for h in header] + lines
    out = [_dump(o, ascii_only, sep).encode("utf-8", "surrogatepass") for o in objs]
    if rng.random() < 0.1:  # blank lines
        for _ in range(rng.randint(1, 3)):
            out.insert(rng.randrange(len(out) + 1), rng.choice((b"", b"  ", b"\t")))
        neutral.append("blank-lines")
    end = b"\n"
    if rng.random() < 0.1:
        end = b"\r\n"
        neutral.append("crlf")
    data = b"".join(line + end for line in out)
    if rng.random() < 0.05 and data.endswith(end):
        data = data[: -len(end)]
        neutral.append("no-final-newline")
    if rng.random() < 0.03:
        data = "\ufeff".encode() + data
        neutral.append("bom")
    return data


def _mutate_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    n = len(data)
    r = rng.randrange(10)
    pos = rng.randrange(n + 1)
    if r == 0 and n:
        i = rng.randrange(n)
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :], "flip-bit"
    if r == 1 and n:
        i = rng.randrange(n)
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :], "set-byte"
    if r == 2:
        junk = rng.choice(
            (b"\xff", b"\xc3", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00", b"\r", b"\n", b'"')
            + (b"\\ud800", b"\\u0000", b"{", b"}", b",", b"\xef\xbb\xbf", b"\\", b"\xe2\x80\xa8")
        )
        return data[:pos] + junk + data[pos:], "insert-bytes"
    if r == 3 and n:
        j = min(n, pos + rng.randint(1, 40))
        return data[:pos] + data[j:], "delete-bytes"
    if r == 4 and n:
        j = min(n, pos + rng.randint(1, 80))
        return data[:j] + data[pos:j] + data[j:], "duplicate-bytes"
    if r == 5:
        return data[:pos], "truncate"
    if r == 6:
        return data.replace(b"\n", b"\r"), "cr-endings"
    if r == 7:
        if rng.random() < 0.002:  # past the line limit (17 MiB written and read: rare)
            return b" " * (MAX_LINE_BYTES + rng.choice((0, 1, 2))) + b"\n" + data, "huge-line"
        return data[:pos] + b" " * rng.choice((1000, 100_000, 2_000_000)) + data[pos:], "long-line"
    if r == 8:
        return data[:pos] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[
            pos:
        ], "random"
    lines = data.split(b"\n")
    if len(lines) > 1:
        i = rng.randrange(len(lines))
        lines[i] = b"\xef\xbb\xbf" + lines[i]  # a BOM on a line (valid only on the first)
        return b"\n".join(lines), "bom-line"
    return data + b"\n", "newline"


NEUTRAL_TREE = "extra-key"
# odd file names, and how messages must show them (one line: what is not printable escaped)
NAMES = {
    "a b.jsonl": "a b.jsonl",
    "ta:sk.jsonl": "ta:sk.jsonl",
    "é.jsonl": "é.jsonl",
    "x": "x",
    ".jsonl": ".jsonl",
    "t\u2028x.jsonl": "t\\u2028x.jsonl",
    "t\nx.jsonl": "t\\nx.jsonl",
    "t\tx.jsonl": "t\\tx.jsonl",
    "t\udcffx.jsonl": "t\\udcffx.jsonl",  # the byte 0xff of an undecodable name
}


def make_case(seed: int, index: int) -> Case:
    """The input of execution `index` (a function of (seed, index) alone)."""
    return build_case(random.Random((seed << 40) ^ index), index)


class ByteRandom(random.Random):
    """A random.Random whose draws are read from a fuzzer's bytes (atheris): a mutation of the bytes changes a
    few decisions of build_case, so that coverage guidance works on the structure. When the bytes run out, the
    draws go on from a generator seeded with them."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0
        super().__init__(data)

    def getrandbits(self, k: int) -> int:
        n = (k + 7) // 8
        if self._pos + n > len(self._data):
            return super().getrandbits(k)
        self._pos += n
        return int.from_bytes(self._data[self._pos - n : self._pos], "little") & ((1 << k) - 1)

    def random(self) -> float:
        return self.getrandbits(53) / (1 << 53)


def build_case(rng: random.Random, index: int) -> Case:
    """An input drawn with rng, of format FORMATS[index % 3]."""
    fmt = FORMATS[index % len(FORMATS)]
    header_obj, lines, kwargs, variant, expect = _base(rng, fmt)
    header = [header_obj] if header_obj is not None else []
    mutations: list[str] = [] if expect is not None else ["slow-regex"]
    neutral: list[str] = []
    n_mut = rng.choice((0, 1, 1, 1, 2, 2, 3, 4))
    if n_mut == 0 and rng.random() < 0.3 and lines and isinstance(lines[0], dict):
        extra = rng.choice((None, 1.5, Raw("NaN"), Raw("1e400"), "x", [1, {"a": []}], {"b": None}, "\u2028"))
        lines[rng.randrange(len(lines))]["x_extra"] = extra  # an unknown key is ignored, whatever it holds
        neutral.append(NEUTRAL_TREE)
    byte_mutations = []
    for _ in range(n_mut):
        r = rng.random()
        if r < 0.55:
            mutations.append(_mutate_tree(rng, header, lines))
        elif r < 0.7:
            mutations.append(_mutate_kwargs(rng, kwargs))
        else:
            byte_mutations.append(True)
    data = _serialize(rng, header, lines, neutral)
    for _ in byte_mutations:
        data, what = _mutate_bytes(rng, data)
        mutations.append(what)
    name = "task.jsonl"
    if rng.random() < 0.02:
        name = rng.choice(list(NAMES))
    return Case(index, fmt, variant, data, kwargs, name, mutations + neutral, None if mutations else expect)


# --- the oracle ---------------------------------------------------------------------------------------------


def _n_lines(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _shown(path: Path) -> str:
    return str(path.parent) + "/" + NAMES.get(path.name, path.name)


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_task(task: tasks.Task, case: Case, path: Path) -> list[str]:
    """What is wrong with a loaded Task (nothing: [])."""
    bad = []
    if not task.items:
        bad.append("no items")
    if task.n_lines != _n_lines(case.data):
        bad.append(f"n_lines {task.n_lines}, the file has {_n_lines(case.data)}")
    if task.sha256 != hashlib.sha256(case.data).hexdigest():
        bad.append("sha256 differs from the file's")
    if task.has_answers != all(it.answer is not None for it in task.items):
        bad.append("has_answers disagrees with the items")
    max_items = case.kwargs.get("max_items")
    if max_items is not None and len(task.items) > max_items:
        bad.append(f"{len(task.items)} items, max_items {max_items}")
    if task.kind not in tasks.KINDS:
        bad.append(f"kind {task.kind!r}")
    is_open = task.kind == "open"
    if is_open != isinstance(task.match, MatchRule):
        bad.append(f"kind {task.kind} with match {task.match!r}")
    if task.match is not None and task.match.name not in RULES:
        bad.append(f"unknown rule {task.match.name!r}")
    ids = [it.id for it in task.items]
    if len(set(ids)) != len(ids):
        bad.append("duplicate ids")
    if task.content_free is not None and (
        set(task.content_free) != set(CONTENT_FREE)
        or not all(isinstance(v, str) for v in task.content_free.values())
    ):
        bad.append("content_free is not a prompt per content-free string")
    n = task.n_lines
    shown = _shown(path)
    for it in task.items:
        where = f"{it.where}"
        if not isinstance(it.prompt, str) or not it.prompt.strip() or not _encodable(it.prompt):
            bad.append(f"{where}: prompt {it.prompt!r:.40}")
        if not isinstance(it.id, str) or not it.id or not _encodable(it.id):
            bad.append(f"{where}: id {it.id!r:.40}")
        m = re.fullmatch(re.escape(shown) + r":(\d+)", it.where)
        if m is None or not 1 <= int(m.group(1)) <= n:
            bad.append(f"where {it.where!r}")
        if not isinstance(it.choices, tuple) or not all(
            isinstance(c, str) and c.strip() and _encodable(c) for c in it.choices
        ):
            bad.append(f"{where}: choices {it.choices!r:.60}")
        if it.answer is not None and (type(it.answer) is not int or not 0 <= it.answer < len(it.choices)):
            bad.append(f"{where}: answer {it.answer!r} for {len(it.choices)} choices")
        if is_open:
            refs = it.references
            if not refs or not all(isinstance(r, str) and r.strip() and _encodable(r) for r in refs):
                bad.append(f"{where}: references {refs!r:.60}")
            elif it.choices != (refs[0],) or it.answer != 0:
                bad.append(f"{where}: choices {it.choices!r:.40} / answer {it.answer} of an open-ended item")
            if it.match != task.match:
                bad.append(f"{where}: match {it.match} is not the task's {task.match}")
        else:
            if it.references or it.match is not None or len(it.choices) < 2:
                bad.append(
                    f"{where}: a multiple-choice item with {len(it.choices)} choices, {it.references!r:.40}"
                )
    return bad


def check_expected(task: tasks.Task, case: Case) -> list[str]:
    """An input with only neutral mutations gives the items it was built from."""
    assert case.expect is not None
    got = []
    for it in task.items:
        if it.open:
            assert it.match is not None
            got.append(
                {"prompt": it.prompt, "references": it.references, "rule": (it.match.name, it.match.pattern)}
            )
        else:
            got.append({"prompt": it.prompt, "choices": it.choices, "answer": it.answer})
    want = case.expect[: case.kwargs.get("max_items") or None]
    if got != want:
        return [f"loaded items differ from the built ones: {got!r:.300} != {want!r:.300}"]
    return []


def check_error(e: BaseException, case: Case, path: Path) -> list[str]:
    if not isinstance(e, TaskError) or not isinstance(e, UserError):
        return [f"raised {type(e).__name__}: {str(e)[:300]!r}"]
    msg = str(e)
    bad = []
    if len(msg.splitlines()) != 1 or "\n" in msg or "\r" in msg:
        bad.append(f"a message of {len(msg.splitlines())} lines: {msg[:300]!r}")
    if len(msg) > LONG_MESSAGE:
        bad.append(f"a message of {len(msg)} characters: {msg[:200]!r}...")
    p = _shown(path)
    m = re.match(re.escape(p) + r":(\d+): ", msg)
    if m is not None:
        if not 1 <= int(m.group(1)) <= max(1, _n_lines(case.data)):
            bad.append(f"line {m.group(1)} of a file of {_n_lines(case.data)} lines: {msg[:200]!r}")
    elif not msg.startswith(p + ": "):
        bad.append(f"does not start with FILE: or FILE:LINE: {msg[:300]!r}")
    elif len(msg) <= len(p) + 2:
        bad.append("an empty message")
    return bad


# --- the match rules on fuzzed continuations ----------------------------------------------------------------


def continuations(rng: random.Random, refs: tuple[str, ...]) -> list[str]:
    ref = rng.choice(refs)
    pool = [
        ref,
        ref.upper() + ".",
        f"The answer is {ref}.",
        f"\n\n{ref}\nand more",
        f"{ref} then {_words(rng)}",
        _words(rng, 1, 12),
        rng.choice(("1,000", "$3.50", "-2", ".5", "1e5", "١٢٣", "𝟏𝟐", "1" * 400, "3,00,0", "-.5.5", "0x1F")),
        "a" * rng.randint(10, 40) + "b",
        "1" * rng.randint(10, 40),
        "The answer is " + " ".join(["word"] * rng.randint(3, 30)) + rng.choice(("!", "", "?")),
        "x" * rng.randint(15, 40),
        "".join(rng.choice(NONCHAR + list("a1 .,(B)#\n")) for _ in range(rng.randint(0, 30))),
        "",
        "answer is " + ref,
        " ".join(_words(rng, 1, 20) for _ in range(rng.randint(1, 400)))[:8000],  # n_gen up to 2048 tokens
    ]
    return [c[:MAX_CONTINUATION] for c in rng.sample(pool, 3)]


def check_matches(rng: random.Random, task: tasks.Task, counts: Counter[str]) -> list[str]:
    """Judge fuzzed continuations with the task's rule; what is wrong (nothing: [])."""
    rule = task.match
    assert rule is not None
    bad = []
    for it in rng.sample(task.items, min(2, len(task.items))):
        refs = it.references
        for c in continuations(rng, refs):
            t0 = time.perf_counter()
            try:
                got = rule.matches(c, refs)
            except matching.MatchTimeoutError as e:  # the time limit, one line: as designed
                counts["match_timeouts"] += 1
                if "\n" in str(e):
                    bad.append(f"a MatchTimeoutError of several lines: {str(e)[:200]!r}")
                continue
            except Exception as e:  # a finding
                bad.append(f"matches({c[:60]!r}, {refs!r:.60}) under {rule} raised {type(e).__name__}: {e}")
                continue
            dt = time.perf_counter() - t0
            limit = MATCH_SLOW_S + 1e-6 * (len(c) + sum(map(len, refs)))  # linear in the text is fine
            if rule.name == "regex":
                limit += REGEX_QUADRATIC_S * len(c) ** 2
            slow = dt > limit
            counts["match_calls"] += 1
            counts[f"match_{rule.name}_{got}"] += 1
            if type(got) is not bool:
                bad.append(f"matches returned {got!r} under {rule}")
            if slow:
                bad.append(f"matches({c[:60]!r}) under {rule} took {dt:.2f} s ({len(c)} characters)")
            # the second route: re itself (not on the R2 patterns, on which re backtracks exponentially)
            if rule.name == "regex" and dt < 0.1 and rule.pattern not in OTHER_SLOW_REGEXES:
                m = re.search(rule.pattern or "", c)
                want = (
                    m is not None and m.group(1) is not None and normalize(m.group(1)) in map(normalize, refs)
                )
                if got != want:
                    bad.append(f"regex {rule.pattern!r} on {c[:60]!r}: {got}, re says {want}")
        # a reference judged against itself is right (exact: its first line; number: when it holds one number)
        ref = rng.choice(refs)
        should = {
            "exact": "\n" not in ref,
            "contains": bool(normalize(ref)),
            "number": matching.parse_number(ref) is not None,
        }.get(rule.name, False)
        if should and rule.matches(ref, refs) is not True:
            bad.append(f"{rule}: the reference {ref!r:.60} does not match itself")
    return bad


# --- one execution ------------------------------------------------------------------------------------------


Loader = Callable[..., tasks.Task]


def execute(case: Case, work: Path, seed: int, counts: Counter[str], load: Loader) -> list[str]:
    """Load one input; update counts; return its findings."""
    path = work / "in" / case.name
    path.write_bytes(case.data)
    counts[f"exec_{case.fmt}"] += 1
    counts[f"variant_{case.fmt}_{case.variant}"] += 1
    if case.expect is not None:
        counts[f"valid_{case.fmt}"] += 1
    t0 = time.perf_counter()
    try:
        task = load(path, **case.kwargs)
    except Exception as e:
        dt = time.perf_counter() - t0
        counts[f"refused_{case.fmt}"] += 1
        bad = check_error(e, case, path)
        if case.expect is not None:
            bad.append(f"a valid input was refused: {str(e)[:300]!r}")
        if bad and not isinstance(e, TaskError):
            bad.append(traceback.format_exc(limit=-3).replace("\n", " | ")[-800:])
        if dt > LOAD_SLOW_S:
            bad += _slow_load(case, path, load, dt)
        return bad
    dt = time.perf_counter() - t0
    counts[f"loaded_{case.fmt}"] += 1
    counts[f"loaded_{case.fmt}_{task.kind}"] += 1
    bad = check_task(task, case, path)
    if case.expect is not None:
        bad += check_expected(task, case)
    if dt > LOAD_SLOW_S:
        bad += _slow_load(case, path, load, dt)
    if task.kind == "open" and task.match is not None:
        counts[f"open_rule_{task.match.name}"] += 1
        if task.match.pattern in OTHER_SLOW_REGEXES:  # accepted by the probes: polynomial in regex, not in re
            counts["R2_loaded_and_matched"] += 1
        bad += check_matches(random.Random((seed << 40) ^ case.index ^ 0xA5A5), task, counts)
    return bad


def _slow_load(case: Case, path: Path, load: Loader, dt: float) -> list[str]:
    t0 = time.perf_counter()
    try:
        load(path, **case.kwargs)
    except Exception:
        pass
    again = time.perf_counter() - t0
    if again > LOAD_SLOW_S:
        return [f"load took {dt:.1f} s and {again:.1f} s again ({len(case.data)} bytes)"]
    return []


# --- the child and its watchdog -----------------------------------------------------------------------------


def _child(
    seed: int, start: int, stop: int, skip: set[int], work: str, progress: Any, conn: Any, load: Loader
) -> None:
    """Run executions [start, stop) but `skip`, reporting (chunk end, counts, findings) every CHUNK."""
    counts: Counter[str] = Counter()
    findings: list[dict[str, Any]] = []
    for i in range(start, stop):
        if i not in skip:
            case = make_case(seed, i)
            progress[0], progress[1] = i, time.monotonic()
            for what in execute(case, Path(work), seed, counts, load):
                findings.append({"index": i, "format": case.fmt, "mutations": case.mutations, "what": what})
                keep = Path(work) / "findings" / f"{i}.jsonl"
                keep.write_bytes(case.data)
                keep.with_suffix(".kwargs.json").write_text(json.dumps(case.kwargs, default=repr))
        if (i + 1) % CHUNK == 0 or i + 1 == stop:
            progress[1] = 0.0
            conn.send((i + 1, dict(counts), findings))
            counts, findings = Counter(), []
    conn.close()


@dataclasses.dataclass
class Summary:
    executions: int
    seed: int
    seconds: float
    counts: dict[str, int]
    findings: list[dict[str, Any]]
    date: str = ""


def run_fuzz(
    executions: int,
    seed: int,
    work: Path,
    time_limit: float = 60.0,
    log: Callable[[str], None] | None = None,
    log_every: int = 10_000,
    load: Loader = tasks.load_task,
) -> Summary:
    """`executions` inputs from `seed` through `load` in a watched child process."""
    (work / "in").mkdir(parents=True, exist_ok=True)
    (work / "findings").mkdir(exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    counts: Counter[str] = Counter()
    findings: list[dict[str, Any]] = []
    skip: set[int] = set()
    done = 0
    t0 = time.monotonic()
    next_log = log_every
    while done < executions:
        progress = ctx.RawArray("d", 2)
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_child, args=(seed, done, executions, skip, str(work), progress, send, load)
        )
        proc.start()
        send.close()
        stuck: tuple[int, str] | None = None
        while True:
            if recv.poll(0.2):
                try:
                    end, got, found = recv.recv()
                except EOFError:
                    proc.join()
                    if done < executions:  # the child died without reporting its chunk: a crash
                        stuck = (int(progress[0]), f"the child died (exit {proc.exitcode})")
                    break
                done = end
                counts.update(got)
                findings += found
                for f in found:
                    if log:
                        log(
                            f"FINDING at {f['index']} ({f['format']}, {'+'.join(f['mutations'])}): "
                            + f["what"]
                        )
                if log and done >= next_log:
                    rate = sum(v for k, v in counts.items() if k.startswith("exec_")) / (
                        time.monotonic() - t0
                    )
                    per = ", ".join(f"{f} {counts[f'exec_{f}']}" for f in FORMATS)
                    log(f"{done}/{executions} ({per}), {rate:.0f}/s, {len(findings)} findings")
                    next_log += log_every
                if done >= executions:
                    break
            elif progress[1] and time.monotonic() - progress[1] > time_limit:
                stuck = (int(progress[0]), f"no result after {time_limit:.0f} s (a hang)")
                proc.kill()
                proc.join()
                break
            elif not proc.is_alive() and not recv.poll(0):
                proc.join()
                stuck = (int(progress[0]), f"the child died (exit {proc.exitcode})")
                break
        recv.close()
        if stuck is not None:
            i, what = stuck
            case = make_case(seed, i)
            counts[f"exec_{case.fmt}"] += 1
            counts["hang_or_crash"] += 1
            skip.add(i)
            finding = {"index": i, "format": case.fmt, "mutations": case.mutations, "what": what}
            findings.append(finding)
            (work / "findings" / f"{i}.jsonl").write_bytes(case.data)
            (work / "findings" / f"{i}.kwargs.json").write_text(json.dumps(case.kwargs, default=repr))
            if log:
                log(f"FINDING at {i} ({case.fmt}, {', '.join(case.mutations)}): {what}")
    date = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    return Summary(executions, seed, round(time.monotonic() - t0, 1), dict(counts), findings, date)


# --- the record ---------------------------------------------------------------------------------------------

KNOWN = """\
Found by the first runs of this fuzzer (about 400,000 executions of its earlier versions, 2026-12-06), fixed,
each with a regression test in tests/test_tasks.py or tests/test_matching.py:

- **F1, a hang**: a user's answer regex that repeats a repeat (`((?:\\w+\\s?)+)\\.$`, `(a+)+$`) backtracks
  exponentially: `re.search` on an ordinary 60-character continuation without the final period ran for
  minutes, so `zt-gguf eval` hung without a word. zt_gguf.matching now refuses such a regex when the rule is
  made (`repeats_a_repeat`: a repeat of a variable count inside a repeat; possessive repeats and atomic
  groups are allowed), so the loader names the header line or the file (--answer-regex) in one line.
- **F2, tracebacks**: `re.compile` raised RecursionError (groups nested ~500 deep) and OverflowError (a
  repeat count of 2^32 or more), which escaped MatchRule as other exceptions than TaskError.
- **F3, a slow load**: a 2 MB answer regex took 6 s to compile (a 16 MiB one, the line limit, ~50 s); answer
  regexes are now limited to 10,000 characters.
- **F4, huge one-line messages**: messages quoted the user's whole value: an unknown rule name (1 MB of it
  gave a 1 MB message), a regex, an out-of-range "answer" or "label" of 4,300 digits, a template's field
  name; all are cut to 60 characters now.
- **F5, messages of two lines**: a file name with a newline, a line separator or a tab split the message;
  a name with an undecodable byte gave default item ids with a lone surrogate (not valid UTF-8). Such
  characters are escaped in messages, Item.where and default ids.

- **R2, a hang** (found by this fuzzer on 2026-12-06, fixed the same day): exponential
  backtracking without a repeat inside a repeat, from overlapping alternatives in a repeat (`((?:a|a)*)$`,
  `((?:a|aa)+)$`), was not detected. The searches now run in the `regex` module under a time limit
  (`MATCH_TIMEOUT_S`, a one-line MatchTimeoutError), and a rule is refused when made if a search on one of a
  few probe texts (a run of 32 like characters) takes over 0.25 s. `((?:\\w|\\d)+)$` passes: the regex module
  runs it in polynomial time (re does not: the second route skips it). Tests in tests/test_matching.py.

Accepted:

- **Q1 (accepted)**: an ordinary regex such as `([\\w ]+)\\.` backtracks quadratically on a continuation
  without a match: 0.45-0.8 s for 8,000 characters, 16-21 s for 40,000 (this machine). Continuations are
  bounded by --n-gen (2,048 tokens at most, ~10,000 characters), whose generation takes far longer; the
  oracle allows a regex match call 3e-8 s times the continuation's length squared.
"""


def write_record(summary: Summary, dst: Path, command: str, atheris: dict[str, Any] | None = None) -> None:
    c = summary.counts
    cpu = "?"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    rows = []
    for f in FORMATS:
        variants = ", ".join(
            f"{k.split('_', 2)[2]} {v:,}" for k, v in sorted(c.items()) if k.startswith(f"variant_{f}_")
        )
        rows.append(
            f"| {f} | {c.get(f'exec_{f}', 0):,} | {c.get(f'valid_{f}', 0):,} | {c.get(f'loaded_{f}', 0):,} | "
            f"{c.get(f'refused_{f}', 0):,} | {variants} |"
        )
    rules = ", ".join(f"{r} {c.get(f'open_rule_{r}', 0):,}" for r in RULES)
    matches = ", ".join(
        f"{k[6:]} {v:,}" for k, v in sorted(c.items()) if k.startswith("match_") and k != "match_calls"
    )
    findings = "\n".join(
        f"- input {f['index']} ({f['format']}; {', '.join(f['mutations'])}): {f['what'][:300]}"
        for f in summary.findings[:50]
    )
    rate = summary.executions / max(summary.seconds, 1e-9)
    text = f"""# Fuzzing the task loader and the match rules

Command: `{command}` ({summary.executions:,} executions, seed {summary.seed})
Date: {summary.date}
Machine: {cpu}, {os.cpu_count()} cores shared with other work (one fuzzing process),
{platform.platform()}, Python {platform.python_version()}
Time: {summary.seconds:,.0f} s ({rate:,.0f} executions/s)

Harness: benchmarks/fuzz_tasks.py (its docstring says what is generated and checked); tests/test_fuzz.py runs
a few hundred executions of it in CI. Limits: an input running 60 s is a hang (the watchdog); a load over
{LOAD_SLOW_S:g} s (twice), a match call over {MATCH_SLOW_S:g} s + 1 us a character (a regex: plus
{REGEX_QUADRATIC_S:g} s times the continuation's length squared) is a finding.

| format | executions | unmutated (must load as built) | loaded | refused (one-line TaskError) | how given |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Open-ended tasks loaded, by rule: {rules}; of these with an R2 regex the probes accept (matched by the
regex module, the re second route skipped): {c.get("R2_loaded_and_matched", 0):,}; match calls stopped by the
time limit: {c.get("match_timeouts", 0):,}.
Match calls on fuzzed continuations: {c.get("match_calls", 0):,} ({matches}).
Inputs loaded as the other kind after mutation: {c.get("loaded_open_choice", 0):,} open-ended ones as multiple
choice, {c.get("loaded_prompt_open", 0) + c.get("loaded_text_open", 0):,} multiple-choice ones as open-ended.
Hangs or crashes: {c.get("hang_or_crash", 0)}. Findings in this run: {len(summary.findings)}.
"""
    if findings:
        text += f"\n{findings}\n"
    if atheris:
        text += _atheris_text(atheris)
    text += f"\n## Known findings\n\n{KNOWN}"
    tmp = dst.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(dst)


def run_atheris(executions: int, seed: int, work: Path, time_limit: float) -> None:
    """Coverage-guided: atheris (libFuzzer) mutates the bytes that ByteRandom turns into build_case's draws,
    in this process; a finding is raised as an exception, which libFuzzer reports and keeps. Never returns."""
    import zlib

    import atheris  # pip install atheris (not a dependency of the project)

    atheris.instrument_all()
    (work / "in").mkdir(parents=True, exist_ok=True)
    (work / "corpus").mkdir(exist_ok=True)
    counts: Counter[str] = Counter()
    t0 = time.monotonic()

    def one(data: bytes) -> None:
        index = 3 * zlib.crc32(data) + (data[0] % 3 if data else 0)  # the format from the first byte
        case = build_case(ByteRandom(data[1:]), index)
        bad = execute(case, work, seed, counts, tasks.load_task)
        n = sum(counts[f"exec_{f}"] for f in FORMATS)
        if n % 10_000 == 0 or n == executions:
            out = {
                "executions": n,
                "seed": seed,
                "seconds": round(time.monotonic() - t0, 1),
                "counts": counts,
                "version": importlib.metadata.version("atheris"),
            }
            (work / "atheris-summary.json").write_text(json.dumps(out, sort_keys=True))
        if bad:
            raise AssertionError(f"{case.fmt} ({'+'.join(case.mutations)}): {bad[0]}")

    argv = [sys.argv[0], f"-runs={executions}", f"-seed={seed}", f"-timeout={max(1, int(time_limit))}"]
    atheris.Setup([*argv, "-rss_limit_mb=8192", f"-artifact_prefix={work}/", str(work / "corpus")], one)
    atheris.Fuzz()


def _atheris_text(a: dict[str, Any]) -> str:
    c = a["counts"]
    per = ", ".join(f"{f} {c.get(f'exec_{f}', 0):,} ({c.get(f'loaded_{f}', 0):,} loaded)" for f in FORMATS)
    command = f"python benchmarks/fuzz_tasks.py --atheris --executions {a['executions']} --seed {a['seed']}"
    how = (
        f"atheris {a.get('version', '?')}: libFuzzer in one process, zt_gguf instrumented; the same"
        " generator, drawing its decisions from libFuzzer's bytes, and the same oracle"
    )
    n, seconds, calls, found = a["executions"], a["seconds"], c.get("match_calls", 0), a.get("findings", 0)
    return (
        f"\n## Coverage-guided run (atheris)\n\nCommand: `{command}` ({how}): {n:,} executions in"
        f" {seconds:,.0f} s, {per}; {calls:,} match calls; findings: {found}.\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--executions", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--work", type=Path, default=None, help="a folder for the inputs (default: under /dev/shm)"
    )
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds an input may run")
    ap.add_argument("--record", type=Path, default=None, help="write the result (markdown) here")
    ap.add_argument("--show", type=int, default=None, help="print the input of this execution and exit")
    ap.add_argument(
        "--from-summary", type=Path, default=None, help="write --record from a run's summary.json"
    )
    ap.add_argument("--atheris", action="store_true", help="coverage-guided by atheris, in this process")
    ap.add_argument("--atheris-summary", type=Path, default=None, help="add an atheris run to --record")
    ap.add_argument(
        "--loader", default=None, help="MODULE:FUNCTION fuzzed instead of zt_gguf.tasks.load_task (tests)"
    )
    args = ap.parse_args()
    command = f"python benchmarks/fuzz_tasks.py --executions {args.executions} --seed {args.seed}"
    if args.from_summary is not None:
        summary = Summary(**json.loads(args.from_summary.read_text()))
        atheris = json.loads(args.atheris_summary.read_text()) if args.atheris_summary else None
        write_record(summary, args.record, command, atheris)
        return 0
    if args.show is not None:
        case = make_case(args.seed, args.show)
        print(
            json.dumps({"format": case.fmt, "mutations": case.mutations, "kwargs": case.kwargs}, default=repr)
        )
        sys.stdout.buffer.write(case.data[:20000])
        return 0
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    work = args.work or Path(tempfile.mkdtemp(prefix="zt-fuzz-tasks-", dir=base))

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    log(f"fuzz_tasks: {args.executions} executions from seed {args.seed} in {work}")
    if args.atheris:
        run_atheris(args.executions, args.seed, work, args.time_limit)
    load = tasks.load_task
    if args.loader:
        module, _, name = args.loader.partition(":")
        load = getattr(importlib.import_module(module), name)
    summary = run_fuzz(args.executions, args.seed, work, args.time_limit, log, load=load)
    counts = json.dumps(summary.counts, sort_keys=True)
    log(f"done: {summary.seconds} s, {len(summary.findings)} findings; {counts}")
    (work / "summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=1))
    if args.record:
        write_record(summary, args.record, command)
    return 1 if summary.findings else 0


if __name__ == "__main__":
    sys.exit(main())
