"""`cope draft` and `cope models` as a user runs them: real process, real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from convert.synthetic import write_random_lora


def cope(*args, stdin: str | None = None, env_extra=None, tmp_path=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "cope_local", *args], input=stdin, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, default_model):
    return write_random_lora(default_model, tmp_path_factory.mktemp("cli") / "user.gguf", std=0.05, seed=3)


def test_draft_without_adapter_says_so_and_streams_base_text():
    r = cope("draft", "Say hello to my neighbour.", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert "no adapter given" in r.stderr and "mode base" in r.stderr
    assert len(r.stdout.strip()) > 0


def test_draft_json_with_adapter_in_cope_mode_reads_stdin(adapter):
    r = cope("draft", "-", "--adapter", str(adapter), "--mode", "cope", "--alpha", "0.5", "--max-tokens", "16", "--json",
             stdin="Write one sentence about the sea.")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mode"] == "cope" and out["alpha"] == 0.5 and 0 < out["new_tokens"] <= 16
    assert out["text"].strip()
    again = json.loads(cope("draft", "Write one sentence about the sea.", "--adapter", str(adapter), "--mode", "cope",
                            "--alpha", "0.5", "--max-tokens", "16", "--json").stdout)
    assert again["text"] == out["text"]  # greedy is deterministic
    # an adapter not trained with DPO (this one has no cope.train.dpo) drafts alone by default: user mode
    plain = json.loads(cope("draft", "Write one sentence about the sea.", "--adapter", str(adapter), "--max-tokens", "16",
                            "--json").stdout)
    assert plain["mode"] == "user" and plain["text"].strip()
    # except on a task where the contrast on such an adapter measured better (LaMP-7): cope, at the task's alpha and tau
    from cope_local.tasks import get_task

    lamp7 = get_task("lamp7")
    tweet = ["draft", "Rain again today, so I stayed in and read.", "--task", "lamp7", "--adapter", str(adapter),
             "--max-tokens", "16", "--json"]
    auto = json.loads(cope(*tweet).stdout)
    assert (auto["mode"], auto["alpha"], auto["tau"]) == ("cope", lamp7.default_alpha, lamp7.default_tau)
    named = json.loads(cope(*tweet, "--mode", "cope", "--alpha", f"{lamp7.default_alpha:g}", "--tau",
                            f"{lamp7.default_tau:g}").stdout)
    assert named["text"] == auto["text"] and json.loads(cope(*tweet, "--mode", "user").stdout)["mode"] == "user"
    # --adapter-scale 0: the adapter's update weighs nothing, so the text is the base model's
    zero = json.loads(cope("draft", "Write one sentence about the sea.", "--adapter", str(adapter), "--max-tokens", "16",
                           "--adapter-scale", "0", "--json").stdout)
    base = json.loads(cope("draft", "Write one sentence about the sea.", "--max-tokens", "16", "--json").stdout)
    assert zero["mode"] == "user" and zero["adapter_scale"] == 0 and zero["text"] == base["text"] != plain["text"]
    bad = cope("draft", "Hi", "--adapter", str(adapter), "--adapter-scale", "9")
    assert bad.returncode == 2 and "--adapter-scale 9: give a weight between 0 and 4" in bad.stderr


def test_drafting_never_imports_torch_or_transformers_nor_touches_the_network(adapter):
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise SystemExit('network access attempted')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse; socket.getaddrinfo = refuse\n"
        "from cope_local.cli import main\n"
        f"rc = main(['draft', 'Hi there', '--adapter', {str(adapter)!r}, '--max-tokens', '4', '--json'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules)\n"
        "print('HEAVY', heavy, 'RC', rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "HEAVY [] RC 0" in r.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "/nonexistent/model.gguf"], "no such model file"),
        (["--adapter", "/nonexistent/a.gguf"], "no such adapter file"),
        (["--mode", "cope"], "needs a user adapter"),
        (["--ctx", "32"], "tokens but the context holds 32"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, expected):
    r = cope("draft", "Write a long letter about everything that happened this year.", "--max-tokens", "4", *args)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("cope: no adapter")]
    assert len(lines) == 1, r.stderr
    assert expected in lines[0] and "Traceback" not in r.stderr


def test_truncated_model_names_the_file(tmp_path, default_model):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_model.read_bytes()[:5_000_000])
    r = cope("draft", "hi", "--model", str(cut))
    assert r.returncode == 2 and str(cut) in r.stderr and "truncated" in r.stderr


def test_models_list_json_describes_the_default_model(default_model):
    r = cope("models", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    smol = rows["smollm2-135m"]
    assert smol["default"] and smol["architecture"] == "llama" and smol["quantization"] == "Q4_1"
    assert 100e6 < smol["parameters"] < 200e6 and smol["context_length"] == 8192 and smol["chat_template"]
    assert smol["path"] == str(default_model)
    assert rows["gemma3-270m"]["installed"] in (True, False)
