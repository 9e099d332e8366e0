from __future__ import annotations

import collections
import hashlib
import json
import os
from pathlib import Path

import pytest

from zt_gguf.tasks import MAX_LINE_BYTES, Item, TaskError, demo_task_path, load_task, split_items

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonl"  # ../shared beside the repo

GOOD = {"prompt": "Review: fine\nSentiment:", "choices": [" negative", " positive"], "answer": 1}
HEADER = {"zt_task": {"template": "Review: {text}\nSentiment:", "choices": [" negative", " positive"]}}
OPEN = {"prompt": "Q: capital of France?\nA:", "answers": [" Paris"]}


def jl(*objs: object) -> bytes:
    """JSONL bytes: dicts/lists/numbers are dumped, str and bytes are taken as raw lines."""
    lines = []
    for obj in objs:
        if isinstance(obj, bytes):
            lines.append(obj)
        elif isinstance(obj, str):
            lines.append(obj.encode("utf-8"))
        else:
            lines.append(json.dumps(obj).encode("utf-8"))
    return b"".join(line + b"\n" for line in lines)


def good(**changes: object) -> dict:
    obj = dict(GOOD)
    for key, value in changes.items():
        if value is ...:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


def write(tmp_path: Path, data: bytes, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# (id, file bytes, load_task kwargs, line named in the message (None: the file only), text in the message)
BROKEN = [
    ("empty-file", b"", {}, None, "no items"),
    ("only-blank-lines", b"\n  \n\t\n", {}, None, "no items"),
    ("only-header", jl(HEADER), {}, None, "no items"),
    ("bad-json", jl(GOOD, '{"prompt": "x", "choices": [" a", " b"'), {}, 2, "invalid JSON"),
    ("bad-json-trailing", jl('{"prompt": "x"} extra'), {}, 1, "invalid JSON"),
    ("single-quotes", jl("{'prompt': 'x'}"), {}, 1, "invalid JSON"),
    ("deep-nesting", jl("[" * 100_000 + "]" * 100_000), {}, 1, "nested too deeply"),
    (
        "duplicate-json-key",
        jl('{"prompt": "p", "choices": [" a", " b"], "answer": 0, "answer": 1}'),
        {},
        1,
        'duplicate key "answer"',
    ),
    ("not-an-object-list", jl(GOOD, [1, 2]), {}, 2, "expected a JSON object"),
    ("not-an-object-string", jl('"hello"'), {}, 1, "expected a JSON object"),
    ("not-an-object-number", jl(GOOD, GOOD | {"id": "b"}, "42"), {}, 3, "expected a JSON object"),
    ("no-prompt-no-text", jl({"question": "q", "choices": [" a", " b"]}), {}, 1, '"prompt" key'),
    ("prompt-null", jl(good(prompt=None)), {}, 1, 'missing "prompt"'),
    ("prompt-not-string", jl(good(prompt=12)), {}, 1, '"prompt" must be a string'),
    ("prompt-list", jl(good(prompt=["a"])), {}, 1, '"prompt" must be a string'),
    ("prompt-empty", jl(good(prompt="")), {}, 1, '"prompt" is empty'),
    ("prompt-whitespace", jl(good(prompt="  \n")), {}, 1, '"prompt" is empty'),
    ("prompt-surrogate", jl('{"prompt": "a\\ud800b", "choices": [" a", " b"]}'), {}, 1, "unpaired surrogate"),
    ("choices-missing", jl(good(choices=...)), {}, 1, 'missing "choices"'),
    ("choices-string", jl(good(choices=" a b")), {}, 1, '"choices" must be a list'),
    ("choices-one", jl(good(choices=[" a"], answer=0)), {}, 1, "at least 2"),
    ("choices-empty-list", jl(good(choices=[], answer=...)), {}, 1, "at least 2"),
    ("choice-empty", jl(good(choices=[" a", ""])), {}, 1, '"choices"[1] is empty'),
    ("choice-whitespace", jl(good(choices=[" a", "  "])), {}, 1, '"choices"[1] is empty'),
    ("choice-not-string", jl(good(choices=[" a", 2])), {}, 1, '"choices"[1] must be a string'),
    ("choice-null", jl(good(choices=[None, " b"])), {}, 1, '"choices"[0] must be a string'),
    (
        "choices-duplicate",
        jl(GOOD, good(choices=[" a", " b", " a"], id="x")),
        {},
        2,
        '" a" twice (at 0 and 2)',
    ),
    (
        "answer-out-of-range",
        jl(GOOD, GOOD | {"id": "2"}, good(answer=3, id="3")),
        {},
        3,
        '"answer" 3 is out of range for 2 choices',
    ),
    ("answer-negative", jl(good(answer=-1)), {}, 1, "out of range"),
    ("answer-bool", jl(good(answer=True)), {}, 1, '"answer" must be an integer'),
    ("answer-float", jl(good(answer=1.0)), {}, 1, '"answer" must be an integer'),
    ("answer-string", jl(good(answer="1")), {}, 1, '"answer" must be an integer'),
    ("answer-huge", jl(good(answer=10**30)), {}, 1, "out of range"),
    ("id-bad-type", jl(good(id=[1])), {}, 1, '"id" must be'),
    (
        "id-duplicate",
        jl(good(id="a"), good(id="b"), good(id="a")),
        {},
        3,
        'duplicate "id" "a" (first on line 1)',
    ),
    (
        "non-utf8",
        jl(GOOD, b'{"prompt": "caf\xe9", "choices": [" a", " b"]}'),
        {},
        2,
        "not valid UTF-8 (byte 0xe9",
    ),
    ("non-utf8-latin1-file", "\n".join(["", '{"prompt": "ü"}']).encode("latin-1"), {}, 2, "not valid UTF-8"),
    ("nul-bytes", b"\x00\x00\x00\n", {}, 1, "invalid JSON"),
    (
        "mixed-formats",
        jl(GOOD, {"text": "good movie", "label": 1}),
        {},
        2,
        'mixed formats: line 1 has "prompt", this line has "text"',
    ),
    ("text-without-template", jl({"text": "t", "label": 0}), {"choices": [" a", " b"]}, 1, "need a template"),
    ("text-without-choices", jl({"text": "t", "label": 0}), {"template": "{text}"}, 1, "need choices"),
    (
        "template-without-text",
        jl({"text": "t", "label": 0}),
        {"template": "Review: {review}", "choices": [" a", " b"]},
        None,
        'no "{text}" placeholder',
    ),
    (
        "template-absent-field",
        jl({"text": "t", "label": 0}),
        {"template": "{title}: {text}", "choices": [" a", " b"]},
        1,
        "{title} is not a key of this line",
    ),
    (
        "template-field-not-scalar",
        jl({"text": "t", "title": {"a": 1}, "label": 0}),
        {"template": "{title}: {text}", "choices": [" a", " b"]},
        1,
        '"title" must be a string or a number',
    ),
    (
        "template-attribute",
        jl({"text": "t", "label": 0}),
        {"template": "{text.upper}", "choices": [" a", " b"]},
        None,
        "not a plain {field} placeholder",
    ),
    (
        "template-positional",
        jl({"text": "t", "label": 0}),
        {"template": "{} {text}", "choices": [" a", " b"]},
        None,
        "not a plain {field} placeholder",
    ),
    (
        "template-unbalanced",
        jl({"text": "t", "label": 0}),
        {"template": "{text", "choices": [" a", " b"]},
        None,
        "template",
    ),
    (
        "template-for-prompt-lines",
        jl(GOOD),
        {"template": "{text}", "choices": [" a", " b"]},
        1,
        'apply only to "text" lines',
    ),
    ("text-empty", jl(HEADER, {"text": "", "label": 0}), {}, 2, '"text" is empty'),
    ("text-not-string", jl(HEADER, {"text": 5, "label": 0}), {}, 2, '"text" must be a string'),
    (
        "label-unknown-word",
        jl(HEADER, {"text": "t", "label": "neutral"}),
        {},
        2,
        '"label" "neutral" is not one',
    ),
    ("label-case", jl(HEADER, {"text": "t", "label": "Positive"}), {}, 2, "is not one of the choices"),
    ("label-out-of-range", jl(HEADER, {"text": "t", "label": 2}), {}, 2, '"label" 2 is out of range for 2'),
    ("label-bool", jl(HEADER, {"text": "t", "label": False}), {}, 2, '"label" must be an integer index or'),
    ("label-float", jl(HEADER, {"text": "t", "label": 0.0}), {}, 2, '"label" must be an integer index or'),
    (
        "header-not-first",
        jl({"text": "t", "label": 0}, HEADER),
        {"template": "{text}", "choices": [" a", " b"]},
        2,
        "only allowed on the first line",
    ),
    ("header-not-object", jl({"zt_task": [1]}), {}, 1, '"zt_task" must be an object'),
    (
        "header-unknown-key",
        jl({"zt_task": {"template": "{text}", "labels": [" a", " b"]}}),
        {},
        1,
        'unknown key "labels"',
    ),
    (
        "header-extra-key",
        jl({"zt_task": {"template": "{text}"}, "text": "x"}),
        {},
        1,
        "may hold nothing else",
    ),
    (
        "header-bad-template",
        jl({"zt_task": {"template": "{txt}", "choices": [" a", " b"]}}),
        {},
        1,
        'no "{text}" placeholder',
    ),
    (
        "header-duplicate-choices",
        jl({"zt_task": {"template": "{text}", "choices": [" a", " a"]}}),
        {},
        1,
        "twice",
    ),
    (
        "header-same-label-word",
        jl({"zt_task": {"template": "{text}", "choices": [" yes", "yes"]}}, {"text": "t", "label": 0}),
        {},
        1,
        "are the same label word",
    ),
    ("header-then-prompt-lines", jl(HEADER, GOOD), {}, 2, 'header applies only to "text" lines'),
    (
        "arg-choices-duplicate",
        jl({"text": "t", "label": 0}),
        {"template": "{text}", "choices": [" a", " a"]},
        None,
        "twice",
    ),
    (
        "arg-choices-string",
        jl({"text": "t", "label": 0}),
        {"template": "{text}", "choices": " a b"},
        None,
        "not the string",
    ),
    ("max-items-zero", jl(GOOD), {"max_items": 0}, None, "max_items must be a positive integer"),
    # found by benchmarks/fuzz_tasks.py: a RecursionError and an OverflowError from re.compile, an answer
    # regex that backtracks exponentially (eval hung), messages quoting a 3,000-character rule name or regex
    (
        "header-regex-nested-too-deeply",
        jl({"zt_task": {"answer_regex": "(" * 1000 + "a" + ")" * 1000}}, OPEN),
        {},
        1,
        "is not a regular expression: nested too deeply",
    ),
    ("arg-regex-repeat-too-large", jl(OPEN), {"answer_regex": "a{4294967296}(x)"}, None, "too large"),
    (
        "header-regex-repeated-repeat",
        jl({"zt_task": {"match": "regex", "answer_regex": r"((?:\w+\s?)+)\.$"}}, OPEN),
        {},
        1,
        "repeats a repeat",
    ),
    ("arg-regex-repeated-repeat", jl(OPEN), {"answer_regex": r"(a+)+$"}, None, "repeats a repeat"),
    ("header-regex-too-long", jl({"zt_task": {"answer_regex": "(x)" + "y" * 20_000}}, OPEN), {}, 1, "20,003"),
    (
        "header-match-long-name",
        jl({"zt_task": {"match": "x" * 3000}}, OPEN),
        {},
        1,
        "unknown match rule 'xxx",
    ),
    ("arg-regex-long-and-bad", jl(OPEN), {"answer_regex": "(" * 3000}, None, "not a regular expression"),
    (
        "answer-4300-digits",  # the most digits Python converts: the message quoted them all
        jl('{"prompt": "p", "choices": [" a", " b"], "answer": ' + "9" * 4300 + "}"),
        {},
        1,
        '"answer" 99999',
    ),
    (
        "template-long-field",
        jl({"text": "t", "label": 0}),
        {"template": "{" + "f" * 5000 + "}{text}", "choices": [" a", " b"]},
        1,
        "is not a key of this line",
    ),
    (
        "template-long-field-conversion",
        jl({"text": "t", "label": 0}),
        {"template": "{" + "f" * 5000 + "!r}{text}", "choices": [" a", " b"]},
        None,
        "is not a plain {field} placeholder",
    ),
    (
        "long-line",
        jl(GOOD, b'{"prompt": "' + b"a" * (17 * 2**20) + b'", "choices": [" a", " b"]}'),
        {},
        2,
        "longer than 16 MiB",
    ),
]


@pytest.mark.parametrize(
    ("data", "kwargs", "line", "text"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_broken_task_files(tmp_path: Path, data: bytes, kwargs: dict, line: int | None, text: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(TaskError) as info:
        load_task(path, **kwargs)
    message = str(info.value)
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert message.startswith(where), message
    assert text in message, message
    assert "\n" not in message
    assert len(message) < 400


def test_broken_corpus_is_large_enough() -> None:
    assert len(BROKEN) >= 30


@pytest.mark.parametrize(
    ("make", "text"),
    [
        (lambda tmp: tmp / "missing.jsonl", "no such file"),
        (lambda tmp: tmp, "is a directory"),
    ],
    ids=["missing", "directory"],
)
def test_unopenable_paths(tmp_path: Path, make, text: str) -> None:
    path = make(tmp_path)
    with pytest.raises(TaskError, match=text) as info:
        load_task(path)
    assert str(info.value).startswith(f"{path}: ")


def test_unreadable_file(tmp_path: Path) -> None:
    import os

    path = write(tmp_path, jl(GOOD))
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user that ignores file permissions")
        with pytest.raises(TaskError, match="cannot open") as info:
            load_task(path)
        assert str(info.value).startswith(f"{path}: ")
    finally:
        path.chmod(0o644)


def test_line_length_limit(tmp_path: Path) -> None:
    # exactly the limit is fine (the line fails later, as JSON), one byte more is "too long"
    at_limit = write(tmp_path, b" " * MAX_LINE_BYTES + b"\n" + jl(GOOD), "a.jsonl")
    assert len(load_task(at_limit).items) == 1
    over = write(tmp_path, b" " * (MAX_LINE_BYTES + 1) + b"\n" + jl(GOOD), "b.jsonl")
    with pytest.raises(TaskError, match=r"b\.jsonl:1: line is longer"):
        load_task(over)


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("t\nx.jsonl", "t\\nx.jsonl"),
        ("t\u2028x.jsonl", "t\\u2028x.jsonl"),
        ("t\tx.jsonl", "t\\tx.jsonl"),
        (os.fsdecode(b"t\xffx.jsonl"), "t\\udcffx.jsonl"),  # an undecodable byte: a lone surrogate in str
        ("a b:é.jsonl", "a b:é.jsonl"),  # printable: as it is
    ],
)
def test_odd_file_names_stay_on_one_line(tmp_path: Path, name: str, shown: str) -> None:
    """A file name with a newline, a line separator, a tab or an undecodable byte (found by
    benchmarks/fuzz_tasks.py) is escaped in messages, Item.where and default ids: one line, valid UTF-8."""
    path = write(tmp_path, jl(GOOD, good(answer=9)), name)
    with pytest.raises(TaskError) as info:
        load_task(path)
    assert str(info.value).startswith(f"{tmp_path}/{shown}:2: "), str(info.value)
    assert len(str(info.value).splitlines()) == 1
    path.write_bytes(jl(GOOD))
    (item,) = load_task(path).items
    assert item.where == f"{tmp_path}/{shown}:1"
    assert item.id == shown.removesuffix(".jsonl") + ":1"
    item.id.encode("utf-8")  # no lone surrogate


def test_prompt_format(tmp_path: Path) -> None:
    data = jl(
        GOOD | {"id": "first", "fields": {"text": "fine"}},
        "",
        good(answer=..., prompt="Q2"),
        good(answer=None, prompt="Q3", id=7),
    )
    path = write(tmp_path, data, "my.task.jsonl")
    task = load_task(path)
    assert task.path == path
    assert task.n_lines == 4
    assert task.sha256 == hashlib.sha256(data).hexdigest()
    assert task.items == [
        Item(prompt=GOOD["prompt"], choices=(" negative", " positive"), answer=1, id="first"),
        Item(prompt="Q2", choices=(" negative", " positive"), answer=None, id="my.task:3"),
        Item(prompt="Q3", choices=(" negative", " positive"), answer=None, id="7"),
    ]
    assert task.has_answers is False  # mixed presence of answers is allowed


def test_text_format_with_arguments(tmp_path: Path) -> None:
    lines = [
        {"text": "great", "label": 1},
        {"text": "bad", "label": " negative "},
        {"text": "meh", "label": "positive", "title": "T", "score": 3},
        {"text": "unlabelled"},
    ]
    path = write(tmp_path, jl(*lines))
    with pytest.raises(TaskError, match=r'data\.jsonl:2: "label" " negative " is not one of the choices'):
        load_task(path, template="{text}", choices=["neg", "pos"])
    task = load_task(path, template="R: {text}\nS:", choices=[" negative", " positive"])
    assert [i.prompt for i in task.items] == ["R: great\nS:", "R: bad\nS:", "R: meh\nS:", "R: unlabelled\nS:"]
    assert [i.answer for i in task.items] == [1, 0, 1, None]
    assert all(i.choices == (" negative", " positive") for i in task.items)
    assert not task.has_answers


def test_text_format_other_fields(tmp_path: Path) -> None:
    path = write(tmp_path, jl({"text": "t", "title": "T", "n": 3, "label": 0}))
    task = load_task(path, template="{{{title}}} {text} #{n}", choices=[" a", " b"])
    assert task.items[0].prompt == "{T} t #3"


def test_text_format_with_header(tmp_path: Path) -> None:
    data = jl(HEADER, {"text": "a fine film", "label": "positive"}, {"text": "dull", "label": 0})
    path = write(tmp_path, data)
    task = load_task(path)
    assert task.n_lines == 3
    assert [i.prompt for i in task.items] == ["Review: a fine film\nSentiment:", "Review: dull\nSentiment:"]
    assert [i.answer for i in task.items] == [1, 0]
    assert task.items[0].choices == (" negative", " positive")
    assert task.items[0].id == "data:2"
    assert task.has_answers
    # arguments win over the header
    task = load_task(path, template="{text} =", choices=[" bad", " positive"])
    assert task.items[0].prompt == "a fine film ="
    assert task.items[0].choices == (" bad", " positive")


def test_max_items_and_line_endings(tmp_path: Path) -> None:
    data = "\ufeff".encode() + b"\r\n".join(json.dumps(good(id=str(i))).encode() for i in range(5)) + b"\r\n"
    path = write(tmp_path, data)
    task = load_task(path, max_items=2)
    assert [i.id for i in task.items] == ["0", "1"]
    assert task.n_lines == 5
    assert task.sha256 == hashlib.sha256(data).hexdigest()


def test_max_items_still_validates_the_whole_file(tmp_path: Path) -> None:
    path = write(tmp_path, jl(GOOD, good(id="b", answer=5)))
    with pytest.raises(TaskError, match=r"data\.jsonl:2:"):
        load_task(path, max_items=1)


def test_duplicate_choices_can_be_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, jl(good(choices=[" a", " b", " a"], answer=2)))
    with pytest.raises(TaskError, match="twice"):
        load_task(path)
    task = load_task(path, allow_duplicate_choices=True)
    assert task.items[0].choices == (" a", " b", " a")


def test_demo_task() -> None:
    path = demo_task_path()
    assert path.name == "sst2_demo.jsonl"
    task = load_task(path)
    assert len(task.items) == 300
    assert task.n_lines == 300
    assert task.has_answers
    assert {i.choices for i in task.items} == {(" negative", " positive")}
    assert task.items[0].id == "sst2-dev-0"
    assert all(not i.prompt.endswith(" ") for i in task.items)
    assert set(collections.Counter(i.answer for i in task.items)) == {0, 1}
    if (SHARED_DATA / "sst2.dev.jsonl").exists():
        head = b"".join((SHARED_DATA / "sst2.dev.jsonl").read_bytes().splitlines(keepends=True)[:300])
        assert path.read_bytes() == head


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data not present")
def test_shared_data_loads() -> None:
    paths = sorted(SHARED_DATA.glob("*.jsonl"))
    assert len(paths) >= 6, paths  # the six tasks of the accuracy benchmark at least
    for path in paths:
        task = load_task(path, allow_duplicate_choices=True)
        assert task.has_answers, path
        assert all(c.startswith(" ") for i in task.items for c in i.choices), path
    # some upstream lines repeat a choice; without the option they are reported
    if (SHARED_DATA / "mmlu.test.jsonl").exists():
        with pytest.raises(TaskError, match=r"mmlu\.test\.jsonl:390: "):
            load_task(SHARED_DATA / "mmlu.test.jsonl")


# --- split_items -----------------------------------------------------------------------------


def items_with(answers: list[int | None]) -> list[Item]:
    return [
        Item(prompt=f"p{i}", choices=(" a", " b", " c"), answer=a, id=str(i)) for i, a in enumerate(answers)
    ]


def test_split_is_deterministic_and_a_partition() -> None:
    items = load_task(demo_task_path()).items
    cal, held = split_items(items, 0.2, seed=1)
    assert (cal, held) == split_items(items, 0.2, seed=1)
    assert split_items(items, 0.2, seed=2) != (cal, held)
    assert len(held) == 60 and len(cal) == 240
    assert sorted(i.id for i in cal + held) == sorted(i.id for i in items)
    assert not {i.id for i in cal} & {i.id for i in held}
    # shuffled, not in file order
    assert [i.id for i in cal] != [i.id for i in items if i in set(cal)]


@pytest.mark.parametrize("holdout", [0.1, 0.2, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 123])
def test_split_is_stratified(holdout: float, seed: int) -> None:
    answers = [0] * 50 + [1] * 130 + [2] * 20
    cal, held = split_items(items_with(answers), holdout, seed)
    counts = collections.Counter(answers)
    held_counts = collections.Counter(i.answer for i in held)
    assert len(held) == round(len(answers) * holdout)
    for label, count in counts.items():
        # every label is held out in proportion to its count, to within one item
        assert abs(held_counts[label] - count * holdout) <= 1, (label, held_counts)
    cal_counts = collections.Counter(i.answer for i in cal)
    assert cal_counts + held_counts == counts


def test_split_demo_keeps_label_proportions() -> None:
    items = load_task(demo_task_path()).items
    cal, held = split_items(items, 0.3, seed=0)
    share = collections.Counter(i.answer for i in items)[1] / len(items)
    assert abs(collections.Counter(i.answer for i in held)[1] / len(held) - share) < 0.01
    assert abs(collections.Counter(i.answer for i in cal)[1] / len(cal) - share) < 0.01


def test_split_without_all_answers_is_not_stratified() -> None:
    items = items_with([0, None, 1, 1, 0, None, 2, 2, 1, 0])
    cal, held = split_items(items, 0.3, seed=5)
    assert len(held) == 3 and len(cal) == 7
    assert set(cal) | set(held) == set(items)


def test_split_edges() -> None:
    assert split_items([], 0.5, 0) == ([], [])
    one = items_with([1])
    assert split_items(one, 0.9, 0) == (one, [])  # calibration is never empty
    items = items_with([0, 1, 2, 0])
    cal, held = split_items(items, 0.0, 0)
    assert held == [] and sorted(cal, key=lambda i: i.id) == items
    for bad in (-0.1, 1.0, 2, float("nan"), True, "0.2"):
        with pytest.raises(ValueError, match="holdout"):
            split_items(items, bad, 0)  # type: ignore[arg-type]
