"""DPO on the user adapter: the real text is preferred to the amateur's lowest-reward sample.

    chosen   = what the user wrote          rejected = the kept negative (negatives.py)
    policy   = base (+ TAM merged) + user LoRA, starting from the SFT adapter
    reference = cfg.dpo_reference: "tam" (default, the paper) = the user adapter switched off,
                i.e. the amateur; "sft" = a frozen copy of the SFT adapter

What trl 1.16 does, and what we do: DPOTrainer given a PeftModel that already
holds an adapter and no ref_model adds a frozen copy of that adapter named
"ref" and scores the reference with it (reference = SFT, not the paper's);
with no "ref" adapter it scores inside `disable_adapter()`. We make the
reference explicit instead: before training, the reference log-probs of every
pair are computed once with our own forward, inside `model.disable_adapter()`
for "tam" (the TAM is merged into the base weights first, so adapter-off IS
the amateur) or with the SFT adapter on for "sft", and handed to trl as its
precomputed reference (`precompute_ref_log_probs`, the columns
ref_chosen_logps / ref_rejected_logps); trl's unused "ref" copy is deleted.
One reference forward per step saved (~25 % of a step), the same numbers
before/after for the metrics, and a resume reuses them. tests/test_train_dpo.py
proves the loss reads exactly the adapter-off log-probs, and documents trl's
own default.

Tokens: the rows come pre-tokenized from the negatives file (prompt ids as
drafting builds them, chosen/rejected ending with the turn-end token, no
doubled BOS), so `_prepare_dataset` (trl's re-tokenization from strings) is
skipped. Each negatives row carries a digest of its pair; a mismatch means the
negatives are stale and is an error rather than silent training on old text.

Resumable: trl/transformers checkpoints (weights, optimizer, scheduler, RNG,
step) in `<out_dir>.work/checkpoints`, every cfg.checkpoint_every steps; the
newest complete one is resumed (the work folder is emptied when the inputs or
settings changed). Ctrl-C or SIGTERM finishes the current optimizer step,
saves a checkpoint and raises KeyboardInterrupt; a second Ctrl-C stops at
once (the previous checkpoint stays). The adapter folder appears only when
done (temp folder + rename).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cope_local.errors import CopeError
from cope_local.paths import atomic_write_text
from cope_local.train.config import TrainConfig
from cope_local.train.negatives import pair_digest, preference_indexes, read_jsonl, read_pairs

METRICS = "dpo_metrics.json"


# -- data ------------------------------------------------------------------------------------------
def build_rows(pairs_path, negatives_path, cfg: TrainConfig | None = None) -> list[dict]:
    """[{id, prompt_ids, chosen_ids, rejected_ids}] in the pairs' order, checked against the pairs.

    With cfg.dpo_max_pairs only the newest pairs, the ones the negatives stage mined."""
    pairs = read_pairs(pairs_path)
    if cfg is not None:
        pairs = [pairs[i] for i in preference_indexes(len(pairs), cfg)]
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


def micro_batch(batch_size: int, longest: int, cap_tokens: int) -> tuple[int, int]:
    """(pairs per forward, accumulation steps): the largest divisor of batch_size whose 2 x longest tokens fit."""
    fit = max(1, cap_tokens // max(1, 2 * longest))  # a pair is two sequences
    micro = max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= fit)
    return micro, batch_size // micro


def plan_batches(rows: list[dict], cfg: TrainConfig, plan, model_config) -> tuple[int, int]:
    """micro_batch with the device's token budget (cope_local.train.device: memory-aware, 512 tokens on CPU)."""
    from cope_local.train.device import micro_batch_tokens

    longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
    cap = micro_batch_tokens(plan, model_config, cfg.batch_tokens) if plan is not None else cfg.batch_tokens
    return micro_batch(cfg.dpo_batch_size, longest, cap)


# -- model -----------------------------------------------------------------------------------------
def load_policy(base_gguf, sft_peft_dir, tam_peft_dir=None):
    """(PeftModel with the SFT adapter trainable as "default", tokenizer); the TAM, if any, merged into the base."""
    from peft import PeftModel

    from cope_local.train.hf import load_base, offline, quiet_renames

    model, tokenizer = load_base(base_gguf)
    with offline(), quiet_renames():
        if tam_peft_dir is not None:
            model = PeftModel.from_pretrained(model, str(tam_peft_dir)).merge_and_unload()  # amateur = base + TAM
        policy = PeftModel.from_pretrained(model, str(sft_peft_dir), is_trainable=True)
    return policy, tokenizer


def sequence_logps(model, rows: list[dict], batch_size: int, pad_id: int, autocast=None) -> tuple[list[float], list[float]]:
    """Sum of log p over the completion tokens of chosen and rejected, per row (our own forward, not trl's).
    autocast: a context (DevicePlan.autocast) so the numbers match the precision trl trains in."""
    import contextlib

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
                ids, mask = ids.to(model.device), mask.to(model.device)
                with autocast or contextlib.nullcontext():
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

        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset  # ref_chosen_logps / ref_rejected_logps are ours (reference_logps)

    return PretokenizedDPOTrainer


def _callbacks(cfg: TrainConfig, state: dict):
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
            if state["stop"].requested:  # Ctrl-C / SIGTERM: finish this step, save a checkpoint, stop
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


def reference_logps(policy, rows: list[dict], reference: str, batch_size: int, pad_id: int, autocast=None):
    """Reference log-prob sums (chosen, rejected): "tam" = user adapter disabled, "sft" = the adapter as loaded."""
    if reference == "tam":
        with policy.disable_adapter():
            return sequence_logps(policy, rows, batch_size, pad_id, autocast)
    if reference == "sft":
        return sequence_logps(policy, rows, batch_size, pad_id, autocast)
    raise CopeError(f"dpo_reference is {reference!r}; use \"tam\" (the paper) or \"sft\"")


def make_trainer(policy, tokenizer, rows: list[dict], ref: tuple[list[float], list[float]], cfg: TrainConfig,
                 work_dir: Path, *, callbacks=(), plan=None, micro: int | None = None):
    """A DPOTrainer on `rows` whose reference log-probs are `ref` (see reference_logps), nothing else.

    micro: pairs per forward (a divisor of cfg.dpo_batch_size); None = from the device's memory.
    """
    from datasets import Dataset
    from trl import DPOConfig

    from cope_local.train.hf import quiet_renames

    micro = micro or plan_batches(rows, cfg, plan, policy.config)[0]
    accum = cfg.dpo_batch_size // micro
    max_steps = -1  # the trainer's "run the epochs"; cfg.max_steps caps, never extends, them
    if cfg.max_steps:
        per_epoch = math.ceil(math.ceil(len(rows) / micro) / accum)
        max_steps = min(cfg.max_steps, max(1, math.ceil(cfg.dpo_epochs * per_epoch)))
    with quiet_renames():  # DPOConfig's own gradient_checkpointing default warns
        args = DPOConfig(
            output_dir=str(work_dir / "checkpoints"),
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=accum,
            learning_rate=cfg.dpo_lr,
            num_train_epochs=cfg.dpo_epochs,
            max_steps=max_steps,
            lr_scheduler_type="linear",
            warmup_steps=0,
            beta=cfg.dpo_beta,
            loss_type=["sigmoid"],  # standard DPO
            precompute_ref_log_probs=True,  # the reference columns below; never trl's "ref" adapter copy
            max_length=None,  # prompts/targets are already capped by the encoder (max_prompt_tokens, max_target_tokens)
            seed=cfg.seed,
            data_seed=cfg.seed,
            logging_steps=1,
            save_strategy="steps",
            save_steps=max(1, cfg.checkpoint_every),
            save_total_limit=2,  # the newest may be half-written when killed; the one before stays
            report_to="none",
            disable_tqdm=True,  # our own progress line (loss, margin, ETA)
            use_cpu=plan is None or plan.kind == "cpu",
            dataloader_num_workers=0,
            remove_unused_columns=False,
            bf16=plan is not None and plan.dtype == "bfloat16",  # autocast (GPUs; CPUs with bf16 instructions); else float32
            fp16=plan is not None and plan.dtype == "float16",
        )
    dataset = Dataset.from_list([
        {"prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"],
         "ref_chosen_logps": rc, "ref_rejected_logps": rr}
        for r, rc, rr in zip(rows, *ref)
    ])
    trainer = _trainer_class()(model=policy, ref_model=None, args=args, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=list(callbacks))
    if "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")  # trl's copy of the SFT adapter: unused with precomputed reference log-probs
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # its raw log dicts on stdout; Progress prints the readable line
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


# -- the stage -------------------------------------------------------------------------------------
def _adapter_done(out_dir: Path) -> bool:
    return (out_dir / "adapter_config.json").exists() and (out_dir / METRICS).exists()


def run_dpo(pairs_path, negatives_path, base_gguf, sft_peft_dir, out_dir, cfg: TrainConfig, *, tam_peft_dir=None) -> Path:
    """pairs + negatives + SFT adapter -> DPO-trained peft adapter folder `out_dir` (with dpo_metrics.json)."""
    from transformers import set_seed

    from cope_local.train.device import choose_device
    from cope_local.train.sft import StopRequests

    out_dir = Path(out_dir)
    if _adapter_done(out_dir):
        return out_dir
    rows = build_rows(pairs_path, negatives_path, cfg)
    work = _work_dir(out_dir, _inputs_key(rows, base_gguf, sft_peft_dir, tam_peft_dir, cfg))
    plan = choose_device(cfg.device, cfg.precision)  # also fixes torch's thread count
    print(f"dpo: {len(rows)} pairs on {plan.describe()}, reference = {cfg.dpo_reference}", file=sys.stderr)
    set_seed(cfg.seed)
    policy, tokenizer = load_policy(base_gguf, sft_peft_dir, tam_peft_dir)
    policy.to(plan.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.monotonic()

    # reference and "before" log-probs are fixed for the whole run, and the micro-batch size must not change
    # under a resume (the trainer skips consumed data in micro-batches): computed once, kept in the work folder
    before_path = work / "before.json"
    cached = _read_json(before_path)
    if cached and len(cached.get("ref", [[]])[0]) == len(rows):
        pol0, ref, micro = tuple(cached["policy"]), tuple(cached["ref"]), int(cached["micro"])
    else:
        micro = plan_batches(rows, cfg, plan, policy.config)[0]
        print(f"dpo: scoring {len(rows)} pairs under the policy and the reference ({cfg.dpo_reference})", file=sys.stderr)
        ref = reference_logps(policy, rows, cfg.dpo_reference, micro, pad_id, plan.autocast())
        pol0 = ref if cfg.dpo_reference == "sft" else sequence_logps(policy, rows, micro, pad_id, plan.autocast())
        atomic_write_text(before_path, json.dumps({"policy": pol0, "ref": ref, "micro": micro}))
    before = preference_metrics(pol0, ref, cfg.dpo_beta)
    print(f"dpo: before: margin {before['margin_mean']:+.4f}, accuracy {before['accuracy']:.2f}, loss {before['loss']:.4f}",
          file=sys.stderr)

    stop = StopRequests("dpo")
    state: dict = {"stop": stop}
    trainer = make_trainer(policy, tokenizer, rows, ref, cfg, work, callbacks=_callbacks(cfg, state), plan=plan,
                           micro=micro)
    resume = latest_checkpoint(work / "checkpoints")
    if resume:
        print(f"dpo: resuming from {Path(resume).name}", file=sys.stderr)
    t_train = time.monotonic()
    with stop:
        result = trainer.train(resume_from_checkpoint=resume)
    train_s = time.monotonic() - t_train
    if stop.requested:
        raise KeyboardInterrupt("dpo interrupted; checkpoint saved, rerun to resume")
    if state.get("diverged"):
        raise CopeError(f"dpo: training diverged ({state['diverged']}); lower dpo_lr (now {cfg.dpo_lr}) and rerun")
    steps = trainer.state.global_step
    steps_run = steps - (int(Path(resume).name.split("-")[1]) if resume else 0)

    after = preference_metrics(sequence_logps(trainer.model, rows, micro, pad_id, plan.autocast()), ref, cfg.dpo_beta)
    print(f"dpo: after: margin {after['margin_mean']:+.4f}, accuracy {after['accuracy']:.2f}, loss {after['loss']:.4f}",
          file=sys.stderr)
    metrics = {
        "reference": cfg.dpo_reference,
        "beta": cfg.dpo_beta,
        "lr": cfg.dpo_lr,
        "pairs": len(rows),
        "steps": steps,
        "micro_batch": micro,  # pairs per forward; gradients accumulate to dpo_batch_size
        "steps_per_s": steps_run / train_s if train_s > 0 else None,
        "train_loss": getattr(result, "training_loss", None),
        "seconds": time.monotonic() - t0,
        "before": before,
        "after": after,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        trainer.model.save_pretrained(str(tmp), selected_adapters=["default"], save_embedding_layers=False)
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


def _digest(path) -> str | None:
    """sha256 of a file, or of every file in a folder (adapter folders), or None."""
    if path is None:
        return None
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file() and f.name != "README.md":
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _inputs_key(rows, base_gguf, sft_peft_dir, tam_peft_dir, cfg: TrainConfig) -> str:
    """Everything the checkpoints and cached reference log-probs depend on."""
    from cope_local.binding import base_fingerprint

    data = {
        "rows": [[r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]] for r in rows],
        "base": base_fingerprint(base_gguf),
        "sft": _digest(sft_peft_dir),
        "tam": _digest(tam_peft_dir),
        "cfg": [cfg.dpo_beta, cfg.dpo_lr, cfg.dpo_epochs, cfg.dpo_batch_size, cfg.dpo_reference, cfg.seed,
                cfg.max_steps, cfg.batch_tokens, cfg.precision],
    }
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:24]


def _work_dir(out_dir: Path, key: str) -> Path:
    """`<out_dir>.work`, emptied when it belongs to other inputs (a resume must never mix runs)."""
    work = out_dir.with_name(out_dir.name + ".work")
    stamp = work / "inputs.key"
    if work.exists() and (not stamp.exists() or stamp.read_text().strip() != key):
        shutil.rmtree(work)
    if not work.exists():
        work.mkdir(parents=True, mode=0o700)
        atomic_write_text(stamp, key + "\n")
    return work


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
