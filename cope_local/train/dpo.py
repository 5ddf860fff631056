"""DPO on the user adapter: the real text is preferred to the amateur's lowest-reward sample.

    chosen   = what the user wrote          rejected = the kept negative (negatives.py)
    policy   = base (+ TAM merged) + user LoRA, starting from the SFT adapter
    reference = cfg.dpo_reference: "tam" (default, the paper) = the user adapter switched off,
                i.e. the amateur; "sft" = a frozen copy of the SFT adapter

Why the reference needs care: trl 1.16's DPOTrainer, given a PeftModel that
already holds an adapter and no ref_model, adds a frozen copy of it named
"ref" and scores the reference with that copy (reference = SFT). When no
"ref" adapter exists it scores the reference inside `disable_adapter()`
(trl.trainer.utils.use_adapter(model, None)). So for "tam" we delete the
"ref" copy right after the trainer is built (before any step and before the
optimizer exists): the reference is then the model with the user adapter off,
which is base + TAM because the TAM is merged into the base weights first.
tests/test_train_dpo.py proves it against our own forward under
`model.disable_adapter()`.

Tokens: the rows come pre-tokenized from the negatives file (prompt ids as
drafting builds them, chosen/rejected ending with the turn-end token, no
doubled BOS), so `_prepare_dataset` (trl's re-tokenization from strings) is
skipped. Each negatives row carries a digest of its pair; a mismatch means the
negatives are stale and is an error rather than silent training on old text.

Resumable: trl/transformers checkpoints (weights, optimizer, scheduler, RNG,
step) in `<out_dir>.work/checkpoints`; the newest complete one is resumed.
Ctrl-C finishes the current optimizer step, saves a checkpoint and raises
KeyboardInterrupt; a second Ctrl-C stops at once (the previous checkpoint
stays). The adapter folder appears only when done (temp folder + rename).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from cope_local.errors import CopeError
from cope_local.paths import atomic_write_text
from cope_local.train.config import TrainConfig
from cope_local.train.negatives import pair_digest, read_jsonl, read_pairs

METRICS = "dpo_metrics.json"


# -- data ------------------------------------------------------------------------------------------
def build_rows(pairs_path, negatives_path) -> list[dict]:
    """[{id, prompt_ids, chosen_ids, rejected_ids}] in the pairs' order, checked against the pairs."""
    pairs = read_pairs(pairs_path)
    negs = {str(r.get("id")): r for r in read_jsonl(negatives_path, what="negatives file")}
    rows = []
    for pair in pairs:
        key = str(pair["id"])
        neg = negs.get(key)
        if neg is None:
            raise CopeError(f"{negatives_path}: no negative for pair {key!r}; rerun the negatives stage")
        if neg.get("pair") != pair_digest(pair):
            raise CopeError(f"{negatives_path}: the negative for pair {key!r} was made from another text; "
                            f"delete {Path(negatives_path).name} and rerun the negatives stage")
        row = {"id": key, "prompt_ids": list(neg["prompt_ids"]), "chosen_ids": list(neg["chosen_ids"]),
               "rejected_ids": list(neg["rejected_ids"])}
        if not row["prompt_ids"] or not row["chosen_ids"] or not row["rejected_ids"]:
            raise CopeError(f"{negatives_path}: pair {key!r} has an empty prompt or completion; rerun the negatives stage")
        rows.append(row)
    return rows


def micro_batch(batch_size: int, longest: int, batch_tokens: int) -> tuple[int, int]:
    """(pairs per forward, accumulation steps): the largest divisor of batch_size whose 2 x longest tokens fit."""
    fit = max(1, batch_tokens // max(1, 2 * longest))  # a pair is two sequences
    micro = max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= fit) if fit < batch_size else batch_size
    return micro, batch_size // micro


# -- model -----------------------------------------------------------------------------------------
def load_policy(base_gguf, sft_peft_dir, tam_peft_dir=None):
    """(PeftModel with the SFT adapter trainable as "default", tokenizer); the TAM, if any, merged into the base."""
    from peft import PeftModel

    from cope_local.train.hf import load_base, offline

    model, tokenizer = load_base(base_gguf)
    with offline():
        if tam_peft_dir is not None:
            model = PeftModel.from_pretrained(model, str(tam_peft_dir)).merge_and_unload()  # amateur = base + TAM
        policy = PeftModel.from_pretrained(model, str(sft_peft_dir), is_trainable=True)
    return policy, tokenizer


def sequence_logps(model, rows: list[dict], batch_size: int, pad_id: int) -> tuple[list[float], list[float]]:
    """Sum of log p over the completion tokens of chosen and rejected, per row (our own forward, not trl's)."""
    import torch

    chosen, rejected = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                part = rows[start:start + batch_size]
                seqs = [r["prompt_ids"] + r["chosen_ids"] for r in part] + [r["prompt_ids"] + r["rejected_ids"] for r in part]
                n_prompt = [len(r["prompt_ids"]) for r in part] * 2
                width = max(map(len, seqs))
                ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (2b, T)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for i, s in enumerate(seqs):
                    ids[i, : len(s)] = torch.tensor(s)
                    mask[i, : len(s)] = 1
                logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (2b, T, V)
                logp = logits[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] - logits[:, :-1].logsumexp(-1)  # (2b, T-1)
                keep = torch.zeros_like(logp)
                for i, s in enumerate(seqs):
                    keep[i, n_prompt[i] - 1: len(s) - 1] = 1.0  # positions predicting completion tokens
                sums = (logp.double() * keep).sum(-1).tolist()
                chosen += sums[: len(part)]
                rejected += sums[len(part):]
    finally:
        model.train(was_training)
    return chosen, rejected


def preference_metrics(policy: tuple[list[float], list[float]], ref: tuple[list[float], list[float]], beta: float) -> dict:
    """Mean implicit-reward margin beta*[(pi-ref)(chosen) - (pi-ref)(rejected)], accuracy (margin > 0), DPO loss."""
    margins = [beta * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr in zip(*policy, *ref)]
    n = len(margins)
    loss = sum(math.log1p(math.exp(-m)) if m > -30 else -m for m in margins) / n  # -log sigmoid(m)
    return {"margin_mean": sum(margins) / n, "accuracy": sum(m > 0 for m in margins) / n, "loss": loss,
            "margins": [round(m, 6) for m in margins]}


# -- trainer ---------------------------------------------------------------------------------------
def _trainer_class():
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """trl's DPOTrainer on rows that already hold prompt_ids / chosen_ids / rejected_ids."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # tokenized like drafting (negatives stage); trl would re-tokenize from strings

    return PretokenizedDPOTrainer


def _callbacks(total_steps_hint: int, cfg: TrainConfig, state: dict):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Loss, margin and ETA per step on stderr; the Ctrl-C flag and the loss watchdog."""

        def __init__(self):
            self.t0 = None
            self.first_step = None
            self.smoothed = None
            self.early = None

        def on_train_begin(self, args, st, control, **kw):
            self.t0, self.first_step = time.monotonic(), st.global_step

        def on_step_end(self, args, st, control, **kw):
            if state.get("interrupted"):
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, st, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs:
                return
            loss = float(logs["loss"])
            done = st.global_step - self.first_step
            rate = (time.monotonic() - self.t0) / max(1, done)
            eta = rate * (st.max_steps - st.global_step)
            print(f"dpo: step {st.global_step}/{st.max_steps} loss {loss:.4f} margin {logs.get('rewards/margins', 0.0):+.4f} "
                  f"acc {logs.get('rewards/accuracies', 0.0):.2f} {rate:.1f} s/step ETA {int(eta) // 60}:{int(eta) % 60:02d}",
                  file=sys.stderr, flush=True)
            if not math.isfinite(loss):
                state["diverged"] = f"loss became {loss}"
                control.should_training_stop = True
                return
            self.smoothed = loss if self.smoothed is None else 0.8 * self.smoothed + 0.2 * loss
            if self.early is None:
                self.early = max(loss, math.log(2))  # DPO starts near log 2; below it is only better
            if self.smoothed > cfg.watchdog_factor * self.early:
                state["diverged"] = f"smoothed loss {self.smoothed:.3f} > {cfg.watchdog_factor} x {self.early:.3f}"
                control.should_training_stop = True

    return [Progress()]


def make_trainer(policy, tokenizer, rows: list[dict], cfg: TrainConfig, work_dir: Path, *, callbacks=(), use_cpu=True):
    """A DPOTrainer whose reference is cfg.dpo_reference ("tam": adapter off; "sft": frozen SFT copy)."""
    from datasets import Dataset
    from trl import DPOConfig

    if cfg.dpo_reference not in ("tam", "sft"):
        raise CopeError(f"dpo_reference is {cfg.dpo_reference!r}; use \"tam\" (the paper) or \"sft\"")
    longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
    micro, accum = micro_batch(cfg.dpo_batch_size, longest, cfg.batch_tokens)
    args = DPOConfig(
        output_dir=str(work_dir / "checkpoints"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        learning_rate=cfg.dpo_lr,
        num_train_epochs=cfg.dpo_epochs,
        max_steps=cfg.max_steps if cfg.max_steps else -1,
        lr_scheduler_type="linear",
        warmup_steps=0,
        beta=cfg.dpo_beta,
        loss_type=["sigmoid"],  # standard DPO
        max_length=None,  # prompts/targets are already capped by the encoder (max_prompt_tokens, max_target_tokens)
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=max(1, cfg.checkpoint_every),
        save_total_limit=2,  # the newest may be half-written when killed; the one before stays
        report_to="none",
        disable_tqdm=True,  # our own progress line (loss, margin, ETA)
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
    )
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows])
    trainer = _trainer_class()(model=policy, ref_model=None, args=args, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=list(callbacks))
    peft_model = trainer.model
    if cfg.dpo_reference == "tam" and "ref" in peft_model.peft_config:
        peft_model.delete_adapter("ref")  # trl then scores the reference with the adapter disabled
    if cfg.dpo_reference == "sft" and "ref" not in peft_model.peft_config:
        raise CopeError("internal error: trl did not make a frozen copy of the SFT adapter as the DPO reference")
    return trainer


def latest_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint whose trainer_state.json (written last) parses; half-written ones are removed."""
    if not ckpt_dir.is_dir():
        return None
    found = []
    for d in ckpt_dir.glob("checkpoint-*"):
        try:
            step = int(d.name.split("-")[1])
            json.loads((d / "trainer_state.json").read_text())
            found.append((step, d))
        except (ValueError, IndexError, OSError):
            shutil.rmtree(d, ignore_errors=True)
    return str(max(found)[1]) if found else None


class _CtrlC:
    """First Ctrl-C: ask the trainer to stop after this step (with a checkpoint). Second: stop now."""

    def __init__(self, state: dict):
        self.state, self.prev = state, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.state.get("interrupted"):
            raise KeyboardInterrupt
        self.state["interrupted"] = True
        print("\ndpo: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)


# -- the stage -------------------------------------------------------------------------------------
def _adapter_done(out_dir: Path) -> bool:
    return (out_dir / "adapter_config.json").exists() and (out_dir / METRICS).exists()


def run_dpo(pairs_path, negatives_path, base_gguf, sft_peft_dir, out_dir, cfg: TrainConfig, *, tam_peft_dir=None) -> Path:
    """pairs + negatives + SFT adapter -> DPO-trained peft adapter folder `out_dir` (with dpo_metrics.json)."""
    import torch
    from transformers import set_seed

    out_dir = Path(out_dir)
    if _adapter_done(out_dir):
        return out_dir
    rows = build_rows(pairs_path, negatives_path)
    work = out_dir.with_name(out_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    set_seed(cfg.seed)
    policy, tokenizer = load_policy(base_gguf, sft_peft_dir, tam_peft_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.monotonic()

    # reference and "before" log-probs: fixed for the whole run, so computed once and kept for a resume
    before_path = work / "before.json"
    key = {"rows": [pair["id"] for pair in rows], "reference": cfg.dpo_reference, "n": len(rows),
           "digest": [hash_ids(r) for r in rows]}
    cached = _read_json(before_path)
    longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
    eval_batch = micro_batch(cfg.dpo_batch_size, longest, cfg.batch_tokens)[0]
    if cached and cached.get("key") == key:
        pol0, ref = tuple(cached["policy"]), tuple(cached["ref"])
    else:
        print(f"dpo: scoring {len(rows)} pairs under the policy and the reference ({cfg.dpo_reference})", file=sys.stderr)
        pol0 = sequence_logps(policy, rows, eval_batch, pad_id)
        if cfg.dpo_reference == "tam":
            with policy.disable_adapter():
                ref = sequence_logps(policy, rows, eval_batch, pad_id)
        else:
            ref = pol0  # the policy starts as the SFT adapter, which is the reference
        atomic_write_text(before_path, json.dumps({"key": key, "policy": pol0, "ref": ref}))
    before = preference_metrics(pol0, ref, cfg.dpo_beta)
    print(f"dpo: before: margin {before['margin_mean']:+.4f}, accuracy {before['accuracy']:.2f}, loss {before['loss']:.4f}",
          file=sys.stderr)

    state: dict = {}
    trainer = make_trainer(policy, tokenizer, rows, cfg, work, callbacks=_callbacks(0, cfg, state),
                           use_cpu=not torch.cuda.is_available())
    resume = latest_checkpoint(work / "checkpoints")
    if resume:
        print(f"dpo: resuming from {Path(resume).name}", file=sys.stderr)
    t_train = time.monotonic()
    with _CtrlC(state):
        result = trainer.train(resume_from_checkpoint=resume)
    train_s = time.monotonic() - t_train
    if state.get("interrupted"):
        raise KeyboardInterrupt("dpo interrupted; checkpoint saved, rerun to resume")
    if state.get("diverged"):
        raise CopeError(f"dpo: training diverged ({state['diverged']}); lower dpo_lr (now {cfg.dpo_lr}) and rerun")
    steps = trainer.state.global_step
    steps_run = steps - (int(Path(resume).name.split("-")[1]) if resume else 0)

    after = preference_metrics(sequence_logps(trainer.model, rows, eval_batch, pad_id), ref, cfg.dpo_beta)
    print(f"dpo: after: margin {after['margin_mean']:+.4f}, accuracy {after['accuracy']:.2f}, loss {after['loss']:.4f}",
          file=sys.stderr)
    metrics = {
        "reference": cfg.dpo_reference,
        "beta": cfg.dpo_beta,
        "lr": cfg.dpo_lr,
        "pairs": len(rows),
        "steps": steps,
        "steps_per_s": steps_run / train_s if train_s > 0 else None,
        "train_loss": getattr(result, "training_loss", None),
        "seconds": time.monotonic() - t0,
        "before": before,
        "after": after,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        trainer.model.save_pretrained(str(tmp), selected_adapters=["default"])
        (tmp / METRICS).write_text(json.dumps(metrics, indent=1) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o600)
        if out_dir.exists():  # a half-finished folder from an older run: never the result of this one
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return out_dir


def hash_ids(row: dict) -> int:
    """A cheap digest of one row's token ids (the before-cache must match the rows it was made from)."""
    return hash((tuple(row["prompt_ids"]), tuple(row["chosen_ids"]), tuple(row["rejected_ids"]))) & 0xFFFFFFFF


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
