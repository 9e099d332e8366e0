"""--chat against llama-server on SmolLM2-135M-Instruct: the prompt zt_gguf.chat formats equals the one the
server's /apply-template returns, and `zt-gguf eval --chat` continues each item with the greedy text that the
server's /v1/chat/completions returns, for the model and for a copy tuned with a random bias.

Each item is evaluated alone, as the server answers one request: llama.cpp's CPU kernels are not
batch-invariant (on this Q4_1 model, an item scored beside others moves its log-likelihoods by up to a few
tenths of a nat), so a greedy continuation may part at a near-tie when other items share the batch. The server
runs with flash attention "auto" (its own default, and eval's) and no prompt cache, so that it evaluates every
prompt whole as the engine does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from zt_gguf import cli, models
from zt_gguf.chat import chat_prompt
from zt_gguf.engine import Model
from zt_gguf.gguf_meta import read_model_info, write_tuned
from zt_gguf.testing import Server, http, stop_server

SYSTEM = "Answer in one short sentence."
QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    'Translate "cat" into French.',
    "What is 12 times 3?",
]
N_GEN = 24
STOP = "\n"  # eval's default stop string for an open-ended task
SERVER_ARGS = ("-fa", "auto", "-ngl", "0")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return models.get("smollm2-135m")


@pytest.fixture(scope="module")
def tuned(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    info = read_model_info(smollm2)
    bias = np.random.default_rng(0).uniform(-1.0, 1.0, (info.n_layer, info.n_head)).astype(np.float32)
    return write_tuned(smollm2, tmp_path_factory.mktemp("chat") / "tuned.gguf", bias)


def _messages(text: str, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def _eval_chat(model: Path, question: str, tmp_path: Path) -> str:
    """eval --chat --system on a one-item open-ended file: the item's greedy continuation."""
    task = tmp_path / "one.jsonl"
    task.write_text(json.dumps({"prompt": question, "answers": ["Paris"], "id": "q"}) + "\n")
    args = [
        "eval", model, "--task", task, "--chat", "--system", SYSTEM, "--n-gen", N_GEN, "--json",
        "--no-baselines", "--threads", 1, "--gpu-layers", 0,
    ]  # fmt: skip
    res = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["kind"] == "open" and out["n_gen"] == N_GEN and len(out["examples"]) == 1
    return str(out["examples"][0]["continuation"])


def _server_chat(server: Server, question: str) -> dict[str, Any]:
    body = {
        "messages": _messages(question, SYSTEM),
        "temperature": 0,
        "max_tokens": N_GEN,
        "stop": [STOP],
        "cache_prompt": False,
        "seed": 1,
    }
    status, res = http(server.url + "/v1/chat/completions", body)
    assert status == 200 and isinstance(res, dict)
    return dict(res["choices"][0])


def test_chat_prompt_equals_the_servers_apply_template(
    smollm2: Path, start_server: Callable[..., Server]
) -> None:
    server = start_server(smollm2, *SERVER_ARGS)
    model = Model(smollm2, gpu_layers=0)
    assert "<|im_start|>" in model.chat_template  # SmolLM2's ChatML template, from its GGUF
    texts = [*QUESTIONS[:2], "Question: which is larger, 3.5 or 12?\nAnswer:", "  spaces  and\ttabs "]
    for system in (None, SYSTEM):
        for text in texts:
            status, res = http(server.url + "/apply-template", {"messages": _messages(text, system)})
            assert status == 200
            got = chat_prompt(model, text, system)
            assert got == res["prompt"]
            assert text in got and got != text and got.endswith("assistant\n")
            # without a system message SmolLM2's template adds its own: the template ran, not a fallback
            assert ("You are a helpful AI assistant named SmolLM" in got) is (system is None)


def test_eval_chat_continues_as_the_server_answers(
    smollm2: Path, tuned: Path, start_server: Callable[..., Server], tmp_path: Path
) -> None:
    """For the model and its tuned copy (the bias read from the GGUF by both): the server's reply (cut at the
    stop string) is eval's continuation up to the same stop string; the bias changes some replies."""
    replies: dict[str, list[str]] = {}
    for name, path in (("untuned", smollm2), ("tuned", tuned)):
        server = start_server(path, *SERVER_ARGS)
        replies[name] = []
        for q in QUESTIONS:
            reply = _server_chat(server, q)
            continuation = _eval_chat(path, q, tmp_path)
            assert continuation.split(STOP)[0] == reply["message"]["content"], (name, q)
            replies[name].append(reply["message"]["content"])
        stop_server(server)
    assert all(replies["untuned"]) and replies["untuned"] != replies["tuned"]
