"""LoRA SFT (the TAM and the OPPU user adapter) in a plain torch loop that resumes exactly.

Why not HF Trainer: a resumed Trainer run replays its data order from the
sampler's seed and its own RNG bookkeeping; a plain loop that saves
everything it uses (LoRA weights, AdamW state, LR schedule, torch/numpy/python
RNG, step, the data order and the micro-batch size) ends with bit-identical
weights after a SIGKILL and a rerun (tests/test_train_sft.py kills a real
subprocess mid-run). Checkpoints are written atomically every
cfg.checkpoint_every optimizer steps and on Ctrl-C / SIGTERM (after the step
in progress; a second Ctrl-C stops at once and the last checkpoint stays).

Loss: token-mean cross-entropy over the target tokens of an optimizer batch
(prompt tokens carry no loss); logits are computed for target positions only,
which saves the vocab-sized matmul and memory for every prompt token. Padding
is on the right and needs no attention mask: causal attention never lets a
real token see the pads after it. The linear LR decay and gradient clipping
at 1.0 are HF Trainer's defaults, which the paper's code used.

Held-out early stopping (cfg.sft_val_fraction > 0, user adapter only): the
newest pairs leave training; their loss is checked before the first step,
every cfg.sft_val_every steps and at the end, and the adapter saved is the
LoRA state of the check with the lowest held-out loss: the check picks the
step instead of a guessed epoch count. (On LaMP-7 at lr 1e-3 the held-out
loss still fell at the last step while greedy outputs had already collapsed
into @mentions: README, Results.)

A loss watchdog stops a diverging run: when the smoothed loss exceeds
cfg.watchdog_factor x its early value (or is not finite) it raises CopeError.

When a TAM is given its peft folder is merged into the base weights in
memory first, so the user adapter learns on top of the task model, exactly
the stack the decoder runs (base + TAM + user).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cope_local.errors import CopeError
from cope_local.paths import atomic_path, atomic_write_text
from cope_local.train.config import LoraSpec, TrainConfig
from cope_local.train.progress import Progress, StopRequests

SFT_CODE_VERSION = 1  # bump when the training math changes: old checkpoints are not resumed
MAX_GRAD_NORM = 1.0  # HF Trainer's default clipping (the paper's setup)
WATCH_WARMUP = 5  # steps whose mean loss is the watchdog's reference
WATCH_EMA = 0.8  # smoothing of the watched loss (one noisy batch must not stop a run)
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"


@dataclass
class SftResult:
    adapter_dir: Path  # peft adapter folder (adapter_config.json + adapter_model.safetensors)
    label: str  # "sft" or "tam"
    examples: int  # training pairs
    steps: int  # optimizer steps in the run (all of them, resumed or not)
    batch_size: int  # examples per optimizer step
    micro_batch_tokens: int  # padded tokens per forward pass
    losses: list = field(repr=False)  # per optimizer step
    seconds: float = 0.0  # wall time of this process's share of the training
    resumed_from: int = 0  # step the run continued from (0: fresh)
    device: str = ""
    val_examples: int = 0  # held-out pairs (0: no early stopping)
    val_losses: list = field(default_factory=list, repr=False)  # [step, held-out loss] per check
    kept_step: int | None = None  # the step whose LoRA state was saved (None: the last)

    def summary(self) -> dict:
        d = asdict(self)
        d["adapter_dir"] = str(self.adapter_dir)
        d["loss_first"] = self.losses[0] if self.losses else None
        d["loss_last"] = float(np.mean(self.losses[-max(1, len(self.losses) // 10):])) if self.losses else None
        return d


# ---- data order ----------------------------------------------------------------------------------

def data_order(n: int, epochs: float, seed: int) -> list[int]:
    """Example indices for the whole run: one seeded permutation per epoch, cut at n * epochs."""
    if n <= 0:
        return []
    rng = np.random.default_rng([seed, 1717])  # its own stream: independent of LoRA init and sampling
    full = math.ceil(max(epochs, 0.0))
    order = np.concatenate([rng.permutation(n) for _ in range(max(1, full))])
    return [int(i) for i in order[: max(1, round(n * epochs))]]


def total_steps(n_order: int, batch_size: int, max_steps: int | None) -> int:
    steps = math.ceil(n_order / max(1, batch_size))
    return min(steps, max_steps) if max_steps else steps


def val_settings(cfg: TrainConfig, label: str) -> list | None:
    """[fraction, every] when held-out early stopping is on for this run (user adapters only), else None."""
    if label != "sft" or not cfg.sft_val_fraction:
        return None
    return [cfg.sft_val_fraction, cfg.sft_val_every]


def split_val(examples: list, fraction: float, where: str) -> tuple[list, list]:
    """(train, held out): the newest round(n * fraction) pairs, at least 1, leave training."""
    if not 0 < fraction < 1:
        raise CopeError(f"{where}: sft_val_fraction {fraction} must be between 0 and 1 (0 turns it off)")
    n_val = max(1, round(len(examples) * fraction))
    if len(examples) - n_val < 1:
        raise CopeError(f"{where}: {len(examples)} pairs leave none to train on after holding out {n_val}; "
                        "add history or set sft_val_fraction=0")
    return examples[:-n_val], examples[-n_val:]


def val_checkpoints(steps: int, n_train: int, batch_size: int, every: int) -> set[int]:
    """Steps after which the held-out loss is checked: 0, every `every` (default: twice per epoch), the last."""
    every = every or max(1, math.ceil(n_train / max(1, batch_size) / 2))
    return {0, steps} | set(range(every, steps, every))


# ---- the loop -----------------------------------------------------------------------------------

def run_key(pairs_sha: str, spec: LoraSpec, batch_size: int, cfg: TrainConfig, base_fp: str, tam_sha: str | None,
            label: str) -> str:
    """What a checkpoint is valid for: same data, settings, base and TAM, or it is not resumed."""
    data = {"v": SFT_CODE_VERSION, "pairs": pairs_sha, "spec": asdict(spec), "batch": batch_size, "seed": cfg.seed,
            "max_steps": cfg.max_steps, "base": base_fp, "tam": tam_sha, "label": label, "precision": cfg.precision}
    val = val_settings(cfg, label)
    if val:  # only when on: the keys of runs without it stay valid
        data["val"] = val
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()[:24]


def file_sha(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_sha(folder: str | os.PathLike) -> str:
    """Hash of a peft adapter folder's config and weights."""
    folder = Path(folder)
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        p = folder / name
        if p.exists():
            h.update(name.encode() + file_sha(p).encode())
    return h.hexdigest()


def _batch_tensors(examples, idx: list[int], device):
    """Right-padded ids of the chosen examples and the flat positions/labels of their target tokens.

    -> ids (B, L) long; rows (N,), cols (N,) where hidden[rows, cols] predicts labels (N,)
    """
    import torch

    seqs = [examples[i].prompt_ids + examples[i].target_ids for i in idx]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)  # pad id is irrelevant: pads come after every real token
    rows, cols, labels = [], [], []
    for b, i in enumerate(idx):
        seq = seqs[b]
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        n_p = len(examples[i].prompt_ids)
        for t in range(n_p, len(seq)):  # position t-1 predicts token t
            rows.append(b)
            cols.append(t - 1)
            labels.append(seq[t])
    def as_t(x):
        return torch.tensor(x, dtype=torch.long, device=device)

    return ids.to(device), as_t(rows), as_t(cols), as_t(labels)


def _lora_model(base_gguf, spec: LoraSpec, plan, seed: int, tam_peft: Path | None):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from cope_local.train.hf import load_base, offline, quiet_renames

    model, tokenizer = load_base(base_gguf, plan.storage_dtype())
    if tam_peft is not None:
        with offline(), quiet_renames():
            model = PeftModel.from_pretrained(model, str(tam_peft)).merge_and_unload()  # base + TAM, in memory
    model.config.use_cache = False
    torch.manual_seed(seed)  # LoRA A init draws from torch's global RNG
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                        lora_dropout=spec.dropout, bias="none", task_type="CAUSAL_LM")
    try:
        with quiet_renames():
            model = get_peft_model(model, config)
    except ValueError as exc:
        raise CopeError(f"LoRA targets {list(spec.targets)}: {exc}; set targets to module names of this model "
                        "(e.g. q_proj, v_proj)") from None
    model.to(plan.device)
    return model, tokenizer


def _trainable(model) -> list:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def train_lora(pairs_path: str | os.PathLike, out_dir: str | os.PathLike, *, base_gguf: str | os.PathLike,
               spec: LoraSpec, batch_size: int, cfg: TrainConfig, work_dir: str | os.PathLike | None = None,
               tam_peft: str | os.PathLike | None = None, label: str = "sft", progress: bool = True) -> SftResult:
    """pairs.jsonl -> a peft LoRA folder at `out_dir`, resuming from `work_dir`/checkpoint.pt if it fits."""
    import torch

    from cope_local.binding import base_fingerprint
    from cope_local.train.data import read_pairs
    from cope_local.train.device import choose_device, micro_batch_tokens, micro_batches

    t_start = time.monotonic()
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir else out_dir.with_name(out_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    ckpt_path = work / CHECKPOINT
    examples = read_pairs(pairs_path)
    if not examples:
        raise CopeError(f"{pairs_path}: no training pairs; add history to the profile and run again")
    val_examples: list = []
    if val_settings(cfg, label):
        examples, val_examples = split_val(examples, cfg.sft_val_fraction, str(pairs_path))
    if batch_size < 1 or spec.lr <= 0 or spec.epochs <= 0:
        raise CopeError(f"{label}: batch size {batch_size}, lr {spec.lr}, epochs {spec.epochs}: all must be positive")
    tam_peft = Path(tam_peft) if tam_peft else None
    key = run_key(file_sha(pairs_path), spec, batch_size, cfg, base_fingerprint(base_gguf),
                  dir_sha(tam_peft) if tam_peft else None, label)

    plan = choose_device(cfg.device, cfg.precision)
    state = None
    if ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # our own file, written below
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint means: start over
            print(f"{label}: checkpoint unreadable ({type(exc).__name__}); starting over", file=sys.stderr)
            state = None
        if state is not None and state.get("key") != key:
            print(f"{label}: checkpoint is from other data or settings; starting over", file=sys.stderr)
            state = None

    model, _tok = _lora_model(base_gguf, spec, plan, cfg.seed, tam_peft)
    params = _trainable(model)
    optim = torch.optim.AdamW([p for _, p in params], lr=spec.lr, weight_decay=0.0)
    order = data_order(len(examples), spec.epochs, cfg.seed)
    steps = total_steps(len(order), batch_size, cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: max(0.0, 1.0 - s / steps))
    scaler = torch.amp.GradScaler(plan.kind) if plan.scaler else None
    losses: list[float] = []
    watch = {"ref": None, "ema": None}
    best: dict = {"history": [], "lora": None}  # the held-out checks so far ([step, loss]) and the LoRA of the lowest
    step = 0
    if state is not None:
        with torch.no_grad():
            for (name, p) in params:
                p.copy_(state["lora"][name].to(p.device))
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        order, steps, micro_tokens = state["order"], state["steps"], state["micro_tokens"]
        losses, watch, step = list(state["losses"]), dict(state["watch"]), int(state["step"])
        best = state.get("best") or best
        print(f"{label}: resuming at step {step}/{steps}", file=sys.stderr)
    else:
        micro_tokens = micro_batch_tokens(plan, model.config, cfg.batch_tokens)
    resumed_from = step
    checks = val_checkpoints(steps, len(examples), batch_size, cfg.sft_val_every) if val_examples else set()
    if progress:
        held = f" ({len(val_examples)} held out for early stopping)" if val_examples else ""
        print(f"{label}: {len(examples)} examples{held}, {steps} steps of {batch_size} on {plan.describe()}, "
              f"micro-batches of <= {micro_tokens} tokens", file=sys.stderr)

    saved = {"step": step if state is not None else 0}  # the step a rerun resumes from

    def save_checkpoint() -> None:
        payload = {
            "key": key, "step": step, "steps": steps, "order": order, "micro_tokens": micro_tokens,
            "lora": {n: p.detach().to("cpu").clone() for n, p in params},
            "optim": optim.state_dict(), "sched": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "losses": losses, "watch": watch, "best": best,
        }
        with atomic_path(ckpt_path) as tmp:
            torch.save(payload, tmp)
        saved["step"] = step

    bar = Progress(label, steps, step, enabled=progress)
    decoder = model.get_base_model().get_decoder()  # the transformer stack (LoRA layers inside)
    head = model.get_base_model().get_output_embeddings()  # lm_head

    def check_val() -> None:
        """Held-out loss now; the LoRA state is kept when it is the lowest so far."""
        history = best["history"]
        if step not in checks or any(s == step for s, _ in history):
            return
        loss = held_out_loss(decoder, head, val_examples, plan, micro_tokens)
        if all(loss < v for _, v in history):
            best["lora"] = {n: p.detach().to("cpu").clone() for n, p in params}
        history.append([step, loss])

    model.train()
    try:
        with StopRequests(label) as stop:
            check_val()
            while step < steps:
                batch = order[step * batch_size:(step + 1) * batch_size]
                n_target = sum(len(examples[i].target_ids) for i in batch)
                loss_sum = 0.0
                for part in micro_batches([examples[i].length for i in batch], micro_tokens):
                    loss = target_loss_sum(decoder, head, examples, [batch[j] for j in part], plan)
                    (scaler.scale(loss / n_target) if scaler else loss / n_target).backward()
                    loss_sum += float(loss.detach())
                if scaler is not None:
                    scaler.unscale_(optim)
                torch.nn.utils.clip_grad_norm_([p for _, p in params], MAX_GRAD_NORM)
                if scaler is not None:
                    scaler.step(optim)
                    scaler.update()
                else:
                    optim.step()
                sched.step()
                optim.zero_grad(set_to_none=True)
                step += 1
                value = loss_sum / n_target
                losses.append(value)
                _watchdog(label, value, watch, step, cfg.watchdog_factor, spec)
                check_val()
                bar.update(step, value)
                if stop.requested:
                    save_checkpoint()
                    raise KeyboardInterrupt
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps:
                    save_checkpoint()
    except KeyboardInterrupt:
        bar.close()  # before the message, so it is not drawn over
        where = f"at step {step}/{steps}" if saved["step"] == step else \
            f"at step {step}/{steps}; the last checkpoint is at step {saved['step']}"
        print(f"{label}: stopped {where}; run the same command again to resume", file=sys.stderr)
        raise
    finally:
        bar.close()

    kept = min(best["history"], key=lambda c: c[1])[0] if best["history"] else None  # the first of equal lows
    if kept == steps:
        kept = None  # the weights in hand
    if kept is not None:
        with torch.no_grad():
            for name, p in params:
                p.copy_(best["lora"][name].to(p.device))
    result = SftResult(out_dir, label, len(examples), steps, batch_size, micro_tokens, losses,
                       time.monotonic() - t_start, resumed_from, plan.describe(), len(val_examples),
                       best["history"], kept)
    save_adapter(model, out_dir, result.summary())
    atomic_write_text(work / SUMMARY, json.dumps(result.summary(), indent=1) + "\n")
    ckpt_path.unlink(missing_ok=True)
    return result


def target_loss_sum(decoder, head, examples, idx: list[int], plan):
    """Summed cross-entropy of the target tokens of examples[idx], in one forward. -> scalar tensor"""
    import torch

    ids, rows, cols, labels = _batch_tensors(examples, idx, plan.device)
    with plan.autocast():
        hidden = decoder(input_ids=ids).last_hidden_state  # (B, L, H)
        logits = head(hidden[rows, cols]).float()  # (N, V): target positions only
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")


def held_out_loss(decoder, head, examples, plan, micro_tokens: int) -> float:
    """Token-mean cross-entropy of the targets of `examples` (no gradients, dropout off)."""
    import torch

    from cope_local.train.device import micro_batches

    decoder.eval()
    total, n_tokens = 0.0, 0
    with torch.no_grad():
        for part in micro_batches([e.length for e in examples], micro_tokens):
            total += float(target_loss_sum(decoder, head, examples, part, plan))
            n_tokens += sum(len(examples[i].target_ids) for i in part)
    decoder.train()
    return total / max(1, n_tokens)


def _watchdog(label: str, loss: float, watch: dict, step: int, factor: float, spec: LoraSpec) -> None:
    """Raise CopeError when the loss is not finite or its smoothed value exceeds factor x its early mean."""
    which = "tam" if label == "tam" else "user"
    if not math.isfinite(loss):
        raise CopeError(f"{label}: the loss became {loss} at step {step}; training diverged. Lower the learning "
                        f"rate (now {spec.lr}) with --set {which}.lr=... and train again")
    early = list(watch.get("early") or [])
    ref = watch.get("ref") or (float(np.mean(early)) if early else None)  # the early mean so far, until fixed
    watch["ema"] = loss if watch["ema"] is None else WATCH_EMA * watch["ema"] + (1 - WATCH_EMA) * loss
    if ref and factor and watch["ema"] > factor * ref:
        raise CopeError(f"{label}: training diverged at step {step}: smoothed loss {watch['ema']:.3f} is more than "
                        f"{factor:g}x its early value {ref:.3f}. Lower the learning rate (now {spec.lr}) with "
                        f"--set {which}.lr=... and train again")
    if len(early) < WATCH_WARMUP:
        watch["early"] = early + [loss]
        if len(watch["early"]) == WATCH_WARMUP:
            watch["ref"] = float(np.mean(watch["early"]))


def save_adapter(model, out_dir: Path, summary: dict | None = None) -> Path:
    """peft save_pretrained into a temp folder, then renamed into place: `out_dir` is whole or absent."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp))
        if summary is not None:
            (tmp / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o600)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
