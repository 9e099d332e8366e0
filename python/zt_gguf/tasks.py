"""Multiple-choice tasks loaded from JSONL files.

Two line formats are accepted (one JSON object per line, blank lines skipped):

(a) ``{"prompt": str, "choices": [str, ...], "answer": int, "id": str, ...}``.
    "answer" and "id" are optional; other keys are ignored. A choice is scored as
    ``log p(choice | prompt)`` with the choice appended to the prompt as is, so the shipped
    data keep the separating space in the choices (" positive") and none at the prompt's end.

(b) ``{"text": str, "label": int | str, ...}`` with a template (containing "{text}"; any other
    "{field}" is filled from the object's top-level keys) and label words (the choices), given
    as arguments or by a first-line header ``{"zt_task": {"template": ..., "choices": [...]}}``.
    Arguments win over the header. A string label must equal one of the choices after
    stripping whitespace (case-sensitive). "label" is optional.

(c) open-ended: ``{"prompt": str, "answers": [str, ...], "id": str, ...}`` (or ``"answer": str``), any listed
    reference accepted. The first reference is the one scored by teacher forcing (its log-likelihood after
    the prompt); a greedy continuation is judged against all of them by the task's match rule
    (zt_gguf.matching: exact, contains, number, regex), given as an argument or by a first-line header
    ``{"zt_task": {"match": "number"}}`` (``"answer_regex"`` for the regex rule). Default: exact.

Every problem raises TaskError with a one-line message "FILE:LINE: what is wrong".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .matching import MatchRule, MatchRuleError

__all__ = [
    "MAX_LINE_BYTES",
    "Item",
    "Task",
    "TaskError",
    "demo_task_path",
    "load_task",
    "split_items",
]

# longest accepted line, without its line ending
MAX_LINE_BYTES = 16 * 1024 * 1024

HEADER_KEY = "zt_task"
HEADER_FIELDS = ("template", "choices", "match", "answer_regex")
KINDS = ("choice", "open")  # multiple choice (the choices are scored), open-ended (reference answers)
CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. 2021 (arXiv 2102.09690), the inputs CC averages over


@dataclass(frozen=True)
class Item:
    prompt: str
    choices: tuple[str, ...]  # open-ended: (references[0],), the reference scored by teacher forcing
    answer: int | None
    id: str
    where: str = dataclasses.field(default="", compare=False)  # "FILE:LINE" of a loaded item (for errors)
    references: tuple[str, ...] = ()  # open-ended: every accepted answer; () for multiple choice
    match: MatchRule | None = None  # open-ended: how a continuation is judged against the references

    @property
    def open(self) -> bool:
        return bool(self.references)


@dataclass
class Task:
    path: Path
    items: list[Item]
    sha256: str  # of the whole file's bytes
    n_lines: int  # physical lines of the file, blank and header lines included
    has_answers: bool  # every item has an answer
    # Contextual Calibration's content-free prompts: {content-free string: the prompt with every input slot
    # filled with it}, when every item shares one template and one set of choices (None otherwise)
    content_free: dict[str, str] | None = None
    kind: str = "choice"  # one of KINDS
    match: MatchRule | None = None  # open-ended tasks: the match rule of every item


class TaskError(UserError, ValueError):
    """A task file problem; str() is one line naming the file (and the line)."""


# makes the TaskError of one place (file, or file:line) from a message
Fail = Callable[[str], TaskError]


def demo_task_path() -> Path:
    """The SST-2 demo task shipped with the package (300 labelled items)."""
    return Path(__file__).resolve().parent / "data" / "sst2_demo.jsonl"


def load_task(
    path: str | Path,
    *,
    template: str | None = None,
    choices: Sequence[str] | None = None,
    max_items: int | None = None,
    allow_duplicate_choices: bool = False,
    match: str | None = None,
    answer_regex: str | None = None,
) -> Task:
    """Load and validate a JSONL task file (see the module docstring for the formats).

    The whole file is always read, validated and hashed; max_items keeps the first items.
    allow_duplicate_choices accepts "prompt" lines whose choices repeat a string (a few lines
    of the upstream ARC, CommonsenseQA and MMLU data do); label words must always be distinct.
    """
    path = Path(path)
    if max_items is not None and (not _is_int(max_items) or max_items < 1):
        raise _fail_at(path, None)(f"max_items must be a positive integer, got {max_items!r}")
    reader = _Reader(path, template, choices, allow_duplicate_choices, match, answer_regex)
    digest = hashlib.sha256()
    items: list[Item] = []
    n_lines = 0
    try:
        with open(path, "rb") as f:
            while True:
                try:
                    # never more than a line's limit in memory, however long the line is
                    raw = f.readline(MAX_LINE_BYTES + 2)
                except OSError as e:
                    raise _fail_at(path, n_lines + 1)(f"read error: {e.strerror or e}") from None
                if not raw:
                    break
                n_lines += 1
                digest.update(raw)
                body = raw[:-1] if raw.endswith(b"\n") else raw
                body = body[:-1] if body.endswith(b"\r") else body
                if len(body) > MAX_LINE_BYTES:
                    raise _fail_at(path, n_lines)(f"line is longer than {MAX_LINE_BYTES // 2**20} MiB")
                item = reader.line(body, n_lines)
                if item is not None and (max_items is None or len(items) < max_items):
                    items.append(item)
    except FileNotFoundError:
        raise _fail_at(path, None)("no such file") from None
    except IsADirectoryError:
        raise _fail_at(path, None)("is a directory, not a JSONL file") from None
    except OSError as e:  # only open() raises one here: read errors are handled above
        raise _fail_at(path, None)(f"cannot open: {e.strerror or e}") from None

    if not items:
        raise _fail_at(path, None)("no items")
    return Task(
        path=path,
        items=items,
        sha256=digest.hexdigest(),
        n_lines=n_lines,
        has_answers=all(item.answer is not None for item in items),
        content_free=reader.content_free(),
        kind="open" if reader.format == "open" else "choice",
        match=reader.rule if reader.format == "open" else None,
    )


def split_items(items: Sequence[Item], holdout: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Split items into (calibration, held_out) with a seeded shuffle.

    round(len(items) * holdout) items are held out, at most len(items) - 1 so that calibration
    is never empty. When every item has an answer the split is stratified: each answer value is
    held out in proportion to its count (the largest remainders get the places left over).
    Both lists are in shuffled order; the result depends only on (items, holdout, seed).
    """
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout!r}")
    order = list(items)
    random.Random(seed).shuffle(order)
    n = len(order)
    if n == 0:
        return [], []
    n_hold = min(math.floor(n * holdout + 0.5), n - 1)

    # the stratum of an item is its answer, or 0 for all items when some answers are missing
    stratified = all(item.answer is not None for item in order)
    strata = [item.answer if stratified and item.answer is not None else 0 for item in order]
    counts: dict[int, int] = {}
    for s in strata:
        counts[s] = counts.get(s, 0) + 1
    exact = {s: count * n_hold / n for s, count in counts.items()}
    quota = {s: math.floor(x) for s, x in exact.items()}
    left = n_hold - sum(quota.values())
    for s in sorted(exact, key=lambda s: (quota[s] - exact[s], s))[:left]:
        quota[s] += 1

    calibration: list[Item] = []
    held_out: list[Item] = []
    for item, s in zip(order, strata, strict=True):
        if quota[s] > 0:
            quota[s] -= 1
            held_out.append(item)
        else:
            calibration.append(item)
    return calibration, held_out


# --- helpers -------------------------------------------------------------------------------


def _printable(text: str) -> str:
    """A file name as messages and ids show it: what is not printable (a newline, a line separator, a control
    character, the lone surrogate of an undecodable byte) escaped, so that a message stays one line and an id
    is valid UTF-8."""
    return text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _fail_at(path: Path, lineno: int | None) -> Fail:
    where = _printable(str(path)) + (f":{lineno}" if lineno is not None else "")
    return lambda message: TaskError(f"{where}: {' '.join(message.split())}")


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any, limit: int = 60) -> str:
    """A short JSON rendering of a value for an error message."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # unpaired surrogates: escape everything
        text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cut(text: str, limit: int = 60) -> str:
    """A user's text (a template's field name) for a message, cut to limit characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _DuplicateKey(Exception):
    pass


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _parse_json_line(body: bytes, lineno: int, fail: Fail) -> Any:
    """The JSON value of a line, or None for a blank line."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"not valid UTF-8 (byte 0x{body[e.start]:02x} at column {e.start + 1})") from None
    if lineno == 1 and text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        return None
    try:
        return json.loads(text, object_pairs_hook=_object_without_duplicate_keys)
    except json.JSONDecodeError as e:
        raise fail(f"invalid JSON at column {e.colno}: {e.msg}") from None
    except _DuplicateKey as e:
        raise fail(f"invalid JSON: duplicate key {_show(e.args[0])}") from None
    except RecursionError:
        raise fail("invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise fail(f"invalid JSON: {e}") from None


def _check_encodable(value: str, what: str, fail: Fail) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise fail(f"{what} contains an unpaired surrogate (\\ud800-\\udfff)") from None


def _check_text(value: Any, name: str, fail: Fail) -> str:
    if value is None:
        raise fail(f'missing "{name}"')
    if not isinstance(value, str):
        raise fail(f'"{name}" must be a string, not {_show(value)}')
    if not value.strip():
        raise fail(f'"{name}" is empty')
    _check_encodable(value, f'"{name}"', fail)
    return value


def _check_choices(value: Any, name: str, fail: Fail, allow_duplicates: bool = False) -> tuple[str, ...]:
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise fail(f'"{name}" must be a list of strings, not {_show(value)}')
    if len(value) < 2:
        raise fail(f'"{name}" needs at least 2 entries, got {len(value)}')
    first: dict[str, int] = {}
    for i, choice in enumerate(value):
        if not isinstance(choice, str):
            raise fail(f'"{name}"[{i}] must be a string, not {_show(choice)}')
        if not choice.strip():
            raise fail(f'"{name}"[{i}] is empty')
        _check_encodable(choice, f'"{name}"[{i}]', fail)
        if choice in first and not allow_duplicates:
            raise fail(f'"{name}" has {_show(choice)} twice (at {first[choice]} and {i})')
        first.setdefault(choice, i)
    return tuple(value)


def _check_answer(value: Any, name: str, n_choices: int, fail: Fail) -> int | None:
    if value is None:
        return None
    if not _is_int(value):
        raise fail(f'"{name}" must be an integer index, not {_show(value)}')
    if not 0 <= value < n_choices:
        raise fail(f'"{name}" {_show(value)} is out of range for {n_choices} choices')
    return value


class _Template:
    """A template of literal text and plain "{field}" placeholders, one of them "{text}"."""

    def __init__(self, text: Any, fail: Fail) -> None:
        if not isinstance(text, str) or not text:
            raise fail(f"template must be a non-empty string, not {_show(text)}")
        self.parts: list[tuple[str, str | None]] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:
            raise fail(f"template {_show(text)}: {e}") from None
        for literal, field, spec, conversion in parsed:
            if field is not None and (not field.isidentifier() or spec or conversion):
                raise fail(
                    f"template {_show(text)}: {{{_cut(field)}}} is not a plain {{field}} placeholder"
                    ' (write "{{" and "}}" for literal braces)'
                )
            self.parts.append((literal, field))
        if not any(field == "text" for _, field in self.parts):
            raise fail(f'template {_show(text)} has no "{{text}}" placeholder')

    def render(self, obj: dict[str, Any], fail: Fail) -> str:
        out = []
        for literal, field in self.parts:
            out.append(literal)
            if field is None:
                continue
            if field not in obj:
                shown = _cut(field)
                raise fail(f'the template\'s {{{shown}}} is not a key of this line ("{shown}" is missing)')
            value = obj[field]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                shown = _cut(field)
                raise fail(f'the template\'s {{{shown}}}: "{shown}" must be a string or a number')
            out.append(value if isinstance(value, str) else str(value))
        return "".join(out)


class _Reader:
    """Turns the lines of one file into items, keeping the state that spans lines."""

    def __init__(
        self,
        path: Path,
        template: str | None,
        choices: Sequence[str] | None,
        allow_duplicate_choices: bool,
        match: str | None = None,
        answer_regex: str | None = None,
    ) -> None:
        self.path = path
        self.shown = _printable(str(path))  # the path as messages and Item.where show it
        self.arg_match, self.arg_regex = match, answer_regex
        self.header_match: str | None = None
        self.header_regex: str | None = None
        self.rule: MatchRule | None = None  # open-ended files: set by the first item line
        self.allow_duplicate_choices = allow_duplicate_choices
        fail = _fail_at(path, None)
        if isinstance(choices, str):
            raise fail(f"choices must be a list of label words, not the string {_show(choices)}")
        self.arg_template = _Template(template, fail) if template is not None else None
        self.arg_choices = _check_choices(list(choices), "choices", fail) if choices is not None else None
        self.header_line: int | None = None
        self.header_template: _Template | None = None
        self.header_choices: tuple[str, ...] | None = None
        self.seen_object = False
        self.format: str | None = None  # "prompt", "text" or "open", set by the first item line
        self.format_line = 0
        self.template: _Template | None = None  # for "text" lines
        self.label_words: tuple[str, ...] = ()
        self.label_index: dict[str, int] = {}
        self.ids: dict[str, int] = {}
        # the content-free prompts common to every item so far; None once two items disagree (or no template)
        self.cf: dict[str, str] | None = {}
        self.cf_choices: tuple[str, ...] | None = None

    def content_free(self) -> dict[str, str] | None:
        return self.cf or None

    def _content_free(self, obj: dict[str, Any], prompt: str, choices: tuple[str, ...]) -> None:
        """Narrow self.cf to this item: its prompt with every input slot filled with a content-free string.

        "text" lines: the template with every placeholder filled. "prompt" lines: the prompt with every string
        of the line's "fields" object that it contains replaced (longest first); without such fields, none."""
        if self.cf is None:
            return
        if self.cf_choices is not None and choices != self.cf_choices:
            self.cf = None
            return
        self.cf_choices = choices
        mine: dict[str, str] = {}
        for cf in CONTENT_FREE:
            if self.template is not None:
                text = "".join(lit + ("" if f is None else cf) for lit, f in self.template.parts)
            else:
                fields = obj.get("fields")
                values = (
                    sorted(
                        {v for v in fields.values() if isinstance(v, str) and v.strip() and v in prompt},
                        key=len,
                        reverse=True,
                    )
                    if isinstance(fields, dict)
                    else []
                )
                if not values:
                    self.cf = None
                    return
                text = prompt
                for v in values:
                    text = text.replace(v, cf)
            mine[cf] = text
        if self.cf and self.cf != mine:
            self.cf = None
        elif not self.cf:
            self.cf = mine

    def line(self, body: bytes, lineno: int) -> Item | None:
        fail = _fail_at(self.path, lineno)
        obj = _parse_json_line(body, lineno, fail)
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise fail(f"expected a JSON object, got {_show(obj, 30)}")
        if HEADER_KEY in obj:
            if self.seen_object:
                raise fail(f'a "{HEADER_KEY}" header is only allowed on the first line')
            self.seen_object = True
            self._header(obj, lineno, fail)
            return None
        self.seen_object = True

        line_format = "prompt" if "prompt" in obj else "text" if "text" in obj else None
        if line_format is None:
            raise fail(
                'expected a "prompt" key (with "choices", or "answers" for an open-ended item) or a "text" '
                'key (with "label")'
            )
        if (
            line_format == "prompt"
            and "choices" not in obj
            and ("answers" in obj or _is_str(obj.get("answer")) or self.format == "open")
        ):  # in an open-ended file, a line without choices is open-ended too (its error names what it lacks)
            line_format = "open"
        if self.format is None:
            self._start(line_format, lineno, fail)
        elif line_format != self.format:
            raise fail(
                f'mixed formats: line {self.format_line} has "{self.format}", this line has "{line_format}"'
            )

        if line_format == "open":
            return self._open_item(obj, lineno, fail)
        if line_format == "prompt":
            prompt = _check_text(obj.get("prompt"), "prompt", fail)
            if "choices" not in obj:
                raise fail('missing "choices" (multiple choice) or "answers" (open-ended)')
            choices = _check_choices(obj["choices"], "choices", fail, self.allow_duplicate_choices)
            answer = _check_answer(obj.get("answer"), "answer", len(choices), fail)
        else:
            assert self.template is not None
            _check_text(obj.get("text"), "text", fail)
            prompt = self.template.render(obj, fail)
            _check_encodable(prompt, "the templated prompt", fail)
            choices = self.label_words
            answer = self._label(obj.get("label"), fail)
        item_id = self._id(obj, lineno, fail)
        self._content_free(obj, prompt, tuple(choices))
        return Item(prompt=prompt, choices=choices, answer=answer, id=item_id, where=f"{self.shown}:{lineno}")

    def _open_item(self, obj: dict[str, Any], lineno: int, fail: Fail) -> Item:
        prompt = _check_text(obj.get("prompt"), "prompt", fail)
        if "answers" in obj and "answer" in obj:
            raise fail('give "answers" (a list) or "answer" (a string), not both')
        if "answers" in obj:
            refs = obj["answers"]
            if not isinstance(refs, list):
                raise fail(f'"answers" must be a list of strings, not {_show(refs)}')
            if not refs:
                raise fail('"answers" is empty: an open-ended item needs at least one reference answer')
            names = [f'"answers"[{i}]' for i in range(len(refs))]
        elif "answer" in obj:
            refs, names = [obj["answer"]], ['"answer"']
        else:
            raise fail('missing "answers": an open-ended item needs at least one reference answer')
        for ref, name in zip(refs, names):
            if not isinstance(ref, str):
                raise fail(f"{name} must be a string, not {_show(ref)}")
            if not ref.strip():
                raise fail(f"{name} is empty")
            _check_encodable(ref, name, fail)
        assert self.rule is not None
        return Item(
            prompt=prompt,
            choices=(refs[0],),
            answer=0,
            id=self._id(obj, lineno, fail),
            where=f"{self.shown}:{lineno}",
            references=tuple(refs),
            match=self.rule,
        )

    def _match_rule(self, fail: Fail) -> MatchRule:
        """The open-ended file's match rule: the arguments', else the header's, else exact."""
        from_args = self.arg_match is not None or self.arg_regex is not None
        name = self.arg_match if from_args else self.header_match
        pattern = self.arg_regex if from_args else self.header_regex
        where = fail if not from_args else _fail_at(self.path, None)
        if name is None:
            name = "regex" if pattern is not None else "exact"
        try:
            return MatchRule(name, pattern)
        except MatchRuleError as e:
            raise where(str(e)) from None

    def _header(self, obj: dict[str, Any], lineno: int, fail: Fail) -> None:
        others = sorted(set(obj) - {HEADER_KEY})
        if others:
            raise fail(f'the "{HEADER_KEY}" header line may hold nothing else, found {_show(others[0])}')
        header = obj[HEADER_KEY]
        if not isinstance(header, dict):
            raise fail(f'"{HEADER_KEY}" must be an object, not {_show(header)}')
        unknown = sorted(set(header) - set(HEADER_FIELDS))
        if unknown:
            raise fail(f'unknown key {_show(unknown[0])} in the "{HEADER_KEY}" header')
        self.header_line = lineno
        if "template" in header:
            self.header_template = _Template(header["template"], fail)
        if "choices" in header:
            self.header_choices = _check_choices(header["choices"], "choices", fail)
        for key in ("match", "answer_regex"):
            if key in header and not isinstance(header[key], str):
                raise fail(f'"{key}" in the "{HEADER_KEY}" header must be a string, not {_show(header[key])}')
        self.header_match, self.header_regex = header.get("match"), header.get("answer_regex")

    def _start(self, line_format: str, lineno: int, fail: Fail) -> None:
        self.format, self.format_line = line_format, lineno
        if line_format == "open":
            if self.arg_template is not None or self.arg_choices is not None:
                raise fail('a template and choices apply only to "text" lines, this line is open-ended')
            if self.header_template is not None or self.header_choices is not None:
                raise fail(f'the "{HEADER_KEY}" header\'s template and choices apply only to "text" lines')
            self.rule = self._match_rule(_fail_at(self.path, self.header_line))
            self.cf = None
            return
        if self.arg_match is not None or self.arg_regex is not None or self.header_match or self.header_regex:
            raise fail('a match rule applies only to open-ended items ("answers"), this line has choices')
        if line_format == "prompt":
            if self.arg_template is not None or self.arg_choices is not None:
                raise fail('a template and choices apply only to "text" lines, this line has "prompt"')
            if self.header_line is not None:
                raise fail(f'the "{HEADER_KEY}" header applies only to "text" lines, this line has "prompt"')
            return
        self.template = self.arg_template or self.header_template
        if self.template is None:
            raise fail(f'"text" lines need a template (an argument or a "{HEADER_KEY}" header)')
        if self.arg_choices is not None:
            self.label_words, words_fail = self.arg_choices, _fail_at(self.path, None)
        elif self.header_choices is not None:
            self.label_words, words_fail = self.header_choices, _fail_at(self.path, self.header_line)
        else:
            raise fail(f'"text" lines need choices (label words: an argument or a "{HEADER_KEY}" header)')
        for i, word in enumerate(self.label_words):
            key = word.strip()
            if key in self.label_index:
                other = self.label_words[self.label_index[key]]
                raise words_fail(f"choices {_show(other)} and {_show(word)} are the same label word")
            self.label_index[key] = i

    def _label(self, label: Any, fail: Fail) -> int | None:
        if label is None:
            return None
        if _is_int(label):
            return _check_answer(label, "label", len(self.label_words), fail)
        if isinstance(label, str):
            if label.strip() in self.label_index:
                return self.label_index[label.strip()]
            words = ", ".join(_show(w) for w in self.label_words)
            raise fail(f'"label" {_show(label)} is not one of the choices ({words})')
        raise fail(f'"label" must be an integer index or a label word, not {_show(label)}')

    def _id(self, obj: dict[str, Any], lineno: int, fail: Fail) -> str:
        value = obj.get("id")
        if value is None:
            item_id = f"{_printable(self.path.stem)}:{lineno}"
        elif _is_int(value):
            item_id = str(value)
        elif isinstance(value, str) and value:
            _check_encodable(value, '"id"', fail)
            item_id = value
        else:
            raise fail(f'"id" must be a non-empty string or an integer, not {_show(value)}')
        if item_id in self.ids:
            raise fail(f'duplicate "id" {_show(item_id)} (first on line {self.ids[item_id]})')
        self.ids[item_id] = lineno
        return item_id
