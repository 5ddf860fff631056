"""LoRA SFT: exact resume after SIGKILL and Ctrl-C, the loss watchdog, device and micro-batch planning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import pytest

from cope_local.errors import CopeError
from cope_local.ingest import HistoryItem
from cope_local.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
PERSONA = files("cope_local").joinpath("data/persona/history.jsonl")
STEPS = 6

# The same run in every process: 8 short pairs, batch 2, 6 steps, a checkpoint after every step.
SCRIPT = rf"""
import sys
from cope_local.train.config import LoraSpec, TrainConfig
from cope_local.train.sft import train_lora
pairs, out, work, base = sys.argv[1:5]
cfg = TrainConfig(seed=3, max_steps={STEPS}, checkpoint_every=1)
train_lora(pairs, out, base_gguf=base, spec=LoraSpec(8, 8, ("q_proj", "v_proj"), 1e-3, 2), batch_size=2, cfg=cfg,
           work_dir=work)
"""


@pytest.fixture(autouse=True)
def _train_env(monkeypatch, pytestconfig):
    """The HF copy of the base, kept in .pytest_cache across sessions (building it costs ~20-40 s; loading ~0.5 s)."""
    monkeypatch.setenv("COPE_CACHE", str(pytestconfig.cache.mkdir("cope-train-cache")))
    monkeypatch.setenv("COPE_THREADS", "2")  # the arithmetic order must be the same in every run


def make_pairs_file(model, folder: Path, n: int = 8) -> Path:
    from cope_local.train.data import make_pairs

    rows = [json.loads(x) for x in PERSONA.read_text(encoding="utf-8").splitlines() if x.strip()][:n]
    items = [HistoryItem(id=f"p{i}", input=r["input"], output=r["output"], source="", meta={}) for i, r in enumerate(rows)]
    out = folder / "pairs.jsonl"
    make_pairs(items, get_task("email-reply"), model, out, max_prompt=96, max_target=24)
    return out


def run_to_end(pairs: Path, out: Path, work: Path, model: Path) -> dict:
    """The run in a fresh process, to its end: its summary (losses per step, resumed_from).
    Every run of the resume test is its own process: a reference run inside pytest's process now and
    then differed from the subprocesses' in the 5th digit of a loss (same code, same threads)."""
    proc = start(pairs, out, work, model)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return json.loads((work / "summary.json").read_text(encoding="utf-8"))


# Bit-identical floats across processes: one thread (no reduction split to vary), MKL's reproducible
# mode (its kernels may otherwise pick a code path by the buffers' memory alignment, which differs in
# a process that loaded its state from a checkpoint) and no dynamic thread counts. Without them a
# resumed run on the CI machine once differed from the reference in the 6th digit of a loss; here
# it never did.
DETERMINISTIC = {"COPE_THREADS": "1", "MKL_CBWR": "AUTO", "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE"}


def start(pairs: Path, out: Path, work: Path, model: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **DETERMINISTIC}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(pairs), str(out), str(work), str(model)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, path: Path, after_mtime: float = 0.0, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_mtime > after_mtime:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before a checkpoint: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no checkpoint within the timeout")


def checkpoint_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_killed_and_interrupted_run_resumes_to_the_same_weights(default_model, tmp_path):
    pairs = make_pairs_file(default_model, tmp_path)
    ref = run_to_end(pairs, tmp_path / "ref", tmp_path / "ref.work", default_model)
    assert ref["steps"] == STEPS and ref["resumed_from"] == 0 and len(ref["losses"]) == STEPS
    assert not (tmp_path / "ref.work" / "checkpoint.pt").exists()  # removed once the adapter is saved

    out, work = tmp_path / "run", tmp_path / "run.work"
    ckpt = work / "checkpoint.pt"
    # 1) SIGKILL right after the first checkpoint: the process dies mid-step, nothing is saved for it
    proc = start(pairs, out, work, default_model)
    wait_for_checkpoint(proc, ckpt)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = checkpoint_step(ckpt)
    assert 1 <= killed_at < STEPS and not out.exists()

    # 2) resume, then Ctrl-C: it finishes the step in progress, saves a checkpoint and stops
    proc = start(pairs, out, work, default_model)
    wait_for_checkpoint(proc, ckpt, after_mtime=ckpt.stat().st_mtime)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-2000:]
    assert f"resuming at step {killed_at}/{STEPS}" in err
    stopped_at = checkpoint_step(ckpt)
    if stopped_at < STEPS:  # (a machine fast enough to finish first would leave no checkpoint to check)
        assert "stopping after this step" in err and "run the same command again to resume" in err
        assert killed_at < stopped_at and not out.exists()

    # 3) resume to the end: bit-identical LoRA weights and losses
    res = run_to_end(pairs, out, work, default_model)
    assert res["resumed_from"] == stopped_at and res["steps"] == STEPS
    assert res["losses"] == ref["losses"]
    a, b = adapter_tensors(tmp_path / "ref"), adapter_tensors(out)
    assert a.keys() == b.keys() and len(a) == 2 * 2 * 30  # A and B of q_proj and v_proj in 30 layers
    assert all(bool((a[k] == b[k]).all()) for k in a)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 0  # it trained (B starts at 0)


def test_config_change_starts_over_instead_of_resuming(default_model, tmp_path):
    import torch

    from cope_local.train.config import LoraSpec, TrainConfig
    from cope_local.train.sft import train_lora

    pairs = make_pairs_file(default_model, tmp_path)
    work = tmp_path / "w"
    work.mkdir()
    torch.save({"key": "from-another-run", "step": 3}, work / "checkpoint.pt")
    cfg = TrainConfig(seed=1, max_steps=1)
    res = train_lora(pairs, tmp_path / "a", base_gguf=default_model, spec=LoraSpec(4, 4, ("q_proj",), 1e-4, 1),
                     batch_size=2, cfg=cfg, work_dir=work, progress=False)
    assert res.resumed_from == 0 and res.steps == 1
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["target_modules"] == ["q_proj"]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["examples"] == 8


def test_held_out_early_stopping_keeps_the_best_check(default_model, tmp_path):
    """The newest pairs leave training; the adapter saved is the one whose held-out loss was lowest."""
    import torch
    from peft import PeftModel

    from cope_local.train.config import LoraSpec, TrainConfig
    from cope_local.train.data import read_pairs
    from cope_local.train.device import choose_device
    from cope_local.train.hf import load_base, offline, quiet_renames
    from cope_local.train.sft import held_out_loss, split_val, train_lora

    pairs = make_pairs_file(default_model, tmp_path)
    cfg = TrainConfig(seed=2, sft_val_fraction=0.25)
    # lr 1e-2 overfits 6 pairs within a few steps: the held-out loss falls, then rises
    res = train_lora(pairs, tmp_path / "a", base_gguf=default_model, spec=LoraSpec(8, 8, ("q_proj", "v_proj"), 1e-2, 4),
                     batch_size=2, cfg=cfg, work_dir=tmp_path / "w", progress=False)
    assert (res.examples, res.val_examples, res.steps) == (6, 2, 12)
    steps = [s for s, _ in res.val_losses]
    assert steps == [0, 2, 4, 6, 8, 10, 12]  # before training, twice per epoch (3 steps), and the end
    losses = [v for _, v in res.val_losses]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert losses[best] < losses[0] - 0.05 and losses[-1] > losses[best] + 0.05, res.val_losses
    assert res.kept_step == steps[best] and 0 < res.kept_step < 12

    # the saved adapter, loaded as any peft adapter, has the kept check's held-out loss
    model, _ = load_base(default_model, torch.float32)
    with offline(), quiet_renames():
        model = PeftModel.from_pretrained(model, str(tmp_path / "a"))
    _, val = split_val(read_pairs(pairs), 0.25, "pairs")
    base = model.get_base_model()
    again = held_out_loss(base.get_decoder(), base.get_output_embeddings(), val, choose_device("cpu"), 512)
    assert again == pytest.approx(losses[best], abs=1e-4)
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["kept_step"] == res.kept_step and len(summary["val_losses"]) == 7

    with pytest.raises(CopeError, match="pairs.jsonl: 1 pairs leave none to train on.*sft_val_fraction=0"):
        split_val(read_pairs(pairs)[:1], 0.25, str(pairs))


def test_early_stopping_settings_change_keys_only_when_on():
    from cope_local.train.config import LoraSpec, TrainConfig
    from cope_local.train.sft import run_key

    spec = LoraSpec(8, 8, ("q_proj", "v_proj"), 1e-4, 2)
    def key(label="sft", **kw):
        return run_key("p", spec, 4, TrainConfig(**kw), "b", None, label)

    assert key() == key(sft_val_every=5)  # off: the keys of runs before the setting existed stay valid
    assert key(sft_val_fraction=0.1) not in (key(), key(sft_val_fraction=0.2))
    assert key("tam", sft_val_fraction=0.1) == key("tam")  # the TAM never holds out


def test_watchdog_stops_a_diverging_loss():
    from cope_local.train.config import LoraSpec
    from cope_local.train.sft import _watchdog

    spec = LoraSpec(8, 8, ("q_proj",), 1e-4, 1)
    watch = {"ref": None, "ema": None}
    for step, loss in enumerate([3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.6, 2.4], 1):  # normal noise: no stop
        _watchdog("sft", loss, watch, step, 4.0, spec)
    assert watch["ref"] == pytest.approx(2.8)
    with pytest.raises(CopeError, match=r"diverged at step \d+: smoothed loss .* more than 4x its early value 2.800"):
        for step, loss in enumerate([20.0, 40.0, 80.0], 9):
            _watchdog("sft", loss, watch, step, 4.0, spec)
    with pytest.raises(CopeError, match="loss became nan at step 2; training diverged.*--set user.lr"):
        _watchdog("sft", float("nan"), {"ref": None, "ema": 3.0}, 2, 4.0, spec)


def test_data_order_is_seeded_and_covers_each_epoch():
    from cope_local.train.sft import data_order, total_steps

    a = data_order(10, 2, seed=5)
    assert a == data_order(10, 2, seed=5) and a != data_order(10, 2, seed=6)
    assert len(a) == 20 and sorted(a[:10]) == list(range(10)) and sorted(a[10:]) == list(range(10))
    assert len(data_order(10, 1.5, seed=0)) == 15
    assert total_steps(20, 4, None) == 5 and total_steps(21, 4, None) == 6 and total_steps(21, 4, 2) == 2


def test_device_choice_and_micro_batches():
    from types import SimpleNamespace

    from cope_local.train.device import bytes_per_token, choose_device, cpu_has_bf16, micro_batch_tokens, micro_batches

    plan = choose_device("cpu")
    assert (plan.device, plan.dtype, plan.scaler) == ("cpu", "float32", False)  # exact resume needs it
    assert str(plan.storage_dtype()) == "torch.float32"
    # bf16 matmuls on request, only where the CPU has bf16 instructions; the base stays float32
    fast = choose_device("cpu", "bfloat16")
    assert fast.dtype == ("bfloat16" if cpu_has_bf16() else "float32") and str(fast.storage_dtype()) == "torch.float32"
    with pytest.raises(CopeError, match="precision"):
        choose_device("cpu", "fp8")
    assert choose_device("auto").device == "cpu"  # this machine has no GPU
    for bad in ("cuda", "mps", "tpu"):
        with pytest.raises(CopeError, match="--device"):
            choose_device(bad)
    smol = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, vocab_size=49152)
    assert 2.5e6 < bytes_per_token(smol, "float32") < 4e6  # calibrated: ~3.2 MB/token measured
    gpu = SimpleNamespace(device="cuda", kind="cuda", dtype="bfloat16")
    assert micro_batch_tokens(gpu, smol, 2048, free_bytes=40 * 2**30) == 2048  # a big GPU: the configured budget
    small = micro_batch_tokens(gpu, smol, 2048, free_bytes=1 * 2**30)  # a laptop GPU with 1 GB free
    assert 200 < small < 600
    assert micro_batch_tokens(plan, smol, 2048, free_bytes=64 * 2**30) == 512  # CPU cap
    assert micro_batch_tokens(gpu, smol, 2048, free_bytes=0) == 32  # never below the floor
    # longest first, padded size within the cap, every example once
    parts = micro_batches([100, 30, 250, 90], 300)
    assert parts == [[2], [0, 3, 1]]
    assert micro_batches([600, 10], 300) == [[0], [1]]  # too long for the cap: alone
