"""Every command of the README runs, so that it cannot rot.

The `zt-gguf ...` lines and the Python snippet of README.md are taken from the file itself and run with the
placeholders replaced by files made here (a tiny generated model and task); `zt-gguf demo` runs as written.
The set-up commands (`pip install ...`, `bash scripts/test.sh`) are what CI runs (.ci/run).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from zt_gguf.testing import make_tiny_llama, write_tiny_task

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _commands() -> list[str]:
    cmds = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip().removesuffix(" &")
            if line.startswith("zt-gguf ") and line != "zt-gguf demo" and "&&" not in line:
                cmds.append(line)
    return cmds


def setup_commands() -> list[str]:
    """The bash blocks of the README's "Set up on a fresh machine" section, one command each."""
    text = README.read_text()
    section = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_ci_runs_the_readme_setup_commands_verbatim() -> None:
    """CI (.ci/run) runs the README's two set-up commands letter for letter, the install first, each on a
    line of its own; the install in a fresh venv, empty fetch and pip caches, default build isolation."""
    cmds = setup_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds), cmds
    install, tests = cmds
    assert install.startswith("pip install ") and "zt-gguf demo" in install
    assert "--no-build-isolation" not in install
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
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
    script = (README.parent / "scripts" / "test.sh").read_text()
    assert "--no-build-isolation" not in script


def _exe() -> str:
    exe = shutil.which("zt-gguf")
    assert exe, "the zt-gguf console script is not on PATH"
    return exe


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("readme")
    model = make_tiny_llama(d / "model.gguf", n_layer=3, seed=21).path
    for name in ("model.Q4_K_M.gguf", "model.Q8_0.gguf"):
        shutil.copy(model, d / name)
    write_tiny_task(d / "data.jsonl", 40, seed=5, balanced=True)
    write_tiny_task(d / "test.jsonl", 20, seed=6, balanced=True)
    # the lm-eval task of the README's YAML block, on data.jsonl (for the `zt-gguf lm-eval` lines)
    (yaml,) = _blocks("yaml")
    (d / "tasks").mkdir()
    (d / "tasks" / "my_task.yaml").write_text(yaml.replace("/abs/path/data.jsonl", str(d / "data.jsonl")))
    # the tuned model the README's later commands use
    res = subprocess.run(
        [
            _exe(),
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
    return {"dir": d}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", _commands())
def test_readme_command_runs(files: dict[str, Path], command: str) -> None:
    d = files["dir"]
    args = shlex.split(command)
    args[0] = _exe()

    def in_d(a: str) -> str:
        if "=" in a and a.endswith(".gguf"):  # NAME=FILE (--attn-ftb-profile): the file is in d
            name, file = a.split("=", 1)
            return f"{name}={d / file}"
        return str(d / a) if (d / a).exists() or a.endswith((".gguf", ".jsonl")) else a

    args = [in_d(a) for a in args]
    if "llama-server" in args:
        port = str(_free_port())
        args = [port if a == "8080" else a for a in args] + ["--host", "127.0.0.1", "-t", "1"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if r.status == 200:
                            return
                except OSError:
                    time.sleep(0.3)
            raise AssertionError("llama-server did not become healthy")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if "llama-completion" in args:
        args = [a.replace("\\n", "\n") for a in args] + ["-no-cnv", "-t", "1"]
        if "..." in args:
            args[args.index("...")] = "the cat sat on the"
    res = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=600, cwd=d)
    assert res.returncode == 0, f"{command}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"


def test_readme_python_snippet(files: dict[str, Path]) -> None:
    if importlib.util.find_spec("llama_cpp") is None:  # not imported here: it loads libllama on import
        pytest.skip("llama-cpp-python is installed by scripts/test.sh")
    (snippet,) = _blocks("python")
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    res = subprocess.run(
        [sys.executable, "-c", snippet],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=files["dir"],
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]


def test_readme_demo_runs_as_written() -> None:
    """`zt-gguf demo` on the default model (the README's first command, after the install)."""
    res = subprocess.run([_exe(), "demo"], capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out accuracy" in res.stdout
