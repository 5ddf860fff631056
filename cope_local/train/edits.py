"""Learn from the user's edits: DPO on (prompt, chosen = the user's edit, rejected = the draft).

The paper trains DPO on synthetic negatives only. When a user edits a draft
before saving it, the store keeps a real preference pair (cope_local.store):
what they kept beats what the model wrote. `cope profile train NAME
--from-edits` runs one DPO update on those pairs, then the pipeline's usual
export -> verify in the decoder -> activate.

    stages/edits/pairs.jsonl       the kept pairs as training rows (chosen = the edit)
    stages/edits/negatives.jsonl   their rejected side, in the negatives-stage format (dpo.py reads both)
    stages/edits/adapter/          peft: the profile's trained adapter + DPO on every edit pair so far
    stages/edits.json              marker: key, pairs kept/skipped, margins, the exported adapter

Every update starts from the adapter the pipeline last exported (dpo or sft) and
trains on ALL edit pairs kept so far, so the result depends on the pairs and
the profile's training only, never on how many times it ran. The reference is
that starting adapter (dpo_reference "sft"): a handful of pairs should move
the model a little away from what it already does, not first pull it back to
the amateur. Retraining the profile (`cope profile train NAME`) activates the
pipeline's adapter again; run --from-edits after it to apply the edits again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from cope_local.errors import CopeError
from cope_local.paths import atomic_write_text
from cope_local.train.config import TrainConfig

MIN_EDIT_PAIRS = 3  # fewer pairs teach noise, not a preference


def select_pairs(pairs: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """The edit pairs worth learning from, and how many were skipped, by reason.

    unchanged: the edit only changed whitespace; empty: one side is empty;
    continued: the user stopped the draft and only wrote on from where it
    stopped (a preference for length, not for a voice).
    """
    kept, skipped = [], {}
    for p in pairs:
        chosen, rejected = (p.get("chosen") or "").strip(), (p.get("rejected") or "").strip()
        if not chosen or not rejected:
            why = "empty"
        elif " ".join(chosen.split()) == " ".join(rejected.split()):
            why = "unchanged"
        elif p.get("rejected_stop_reason") == "stopped" and chosen.startswith(rejected):
            why = "continued"
        else:
            kept.append(p)
            continue
        skipped[why] = skipped.get(why, 0) + 1
    return kept, skipped


def write_edit_rows(pairs: list[dict], base_gguf, folder: Path, cfg: TrainConfig) -> tuple[Path, Path]:
    """Edit pairs -> (pairs.jsonl, negatives.jsonl) in `folder`, tokenized as drafting tokenizes them."""
    from cope_local.decode.llama import Model
    from cope_local.train.data import encode_row, turn_end_id
    from cope_local.train.negatives import pair_digest

    model = Model(base_gguf)
    try:
        template = model.chat_template()
        eot = turn_end_id(model, template)
        pair_rows, neg_rows = [], []
        for p in pairs:
            row = {"id": f"edit-{p['id']}", "messages": p["messages"], "target": p["chosen"]}
            prompt_ids, chosen_ids = encode_row(row, model, template, cfg)
            rejected_ids = model.tokenize(p["rejected"], special=False)[: cfg.max_target_tokens - 1]
            if p.get("rejected_stop_reason") == "eos":  # the draft ended by itself: its end is part of what was rejected
                rejected_ids.append(eot)
            row |= {"prompt_ids": prompt_ids, "target_ids": chosen_ids}
            pair_rows.append(row)
            neg_rows.append({"id": row["id"], "pair": pair_digest(row), "prompt_ids": prompt_ids,
                             "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "source": "edit"})
    finally:
        model.close()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    pairs_path, neg_path = folder / "pairs.jsonl", folder / "negatives.jsonl"
    atomic_write_text(pairs_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pair_rows))
    atomic_write_text(neg_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in neg_rows))
    return pairs_path, neg_path


def edits_config(cfg: TrainConfig, n_pairs: int) -> TrainConfig:
    """The DPO settings of an edits update (cfg.edits_*), reference = the starting adapter."""
    return replace(cfg, dpo_lr=cfg.edits_lr, dpo_epochs=cfg.edits_epochs, dpo_beta=cfg.edits_beta,
                   dpo_reference="sft", dpo_batch_size=max(1, min(cfg.dpo_batch_size, n_pairs)))


def train_from_edits(pipe, *, log=print) -> dict:
    """DPO on the profile's edit pairs, export, verify, activate. `pipe`: the profile's Pipeline."""
    from cope_local.store import export_edit_pairs, store_path
    from cope_local.train.dpo import METRICS, run_dpo
    from cope_local.train.pipeline import KEEP_ADAPTERS, verify_adapter

    ws = pipe.ws
    if ws.kind != "profile":
        raise CopeError("--from-edits trains a profile, not a TAM")
    exported = pipe.read_marker("export")  # the pipeline's last export says which adapter it was: dpo or sft
    source = (exported.get("info") or {}).get("source") if exported.get("state") == "done" else None
    start = pipe.p(f"{source}_adapter") if source in ("dpo", "sft") else None
    if start is None or not (start / "adapter_config.json").exists():
        raise CopeError(f"{ws.path}: the profile has no trained adapter to refine yet; "
                        f"train it first: cope profile train {ws.name}")
    kept, skipped = select_pairs(export_edit_pairs(ws.profile))
    why = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items()))
    log(f"edits: {len(kept)} edit pairs" + (f" (skipped: {why})" if why else ""))
    if len(kept) < MIN_EDIT_PAIRS:
        raise CopeError(f"{store_path(ws.profile)}: {len(kept)} usable edit pairs, need at least {MIN_EDIT_PAIRS}; "
                        "edit and save more drafts (cope tui), then run --from-edits again")
    folder = ws.stages_dir / "edits"
    marker = pipe.marker("edits")
    cfg = edits_config(pipe.cfg, len(kept))
    key = _key(kept, start, pipe, cfg)
    done = pipe.read_marker("edits")
    adapter_dir = folder / "adapter"
    if done.get("key") == key and done.get("state") == "done" and (ws.path / done.get("adapter", ".none")).exists():
        log("edits: up to date (no new edits since the last update)")
        return done
    if done.get("key") != key:  # other pairs or settings: a half-finished run of the old ones is no use
        shutil.rmtree(folder, ignore_errors=True)
    atomic_write_text(marker, json.dumps({"key": key, "state": "running"}) + "\n")
    t0 = time.monotonic()
    pairs_path, neg_path = write_edit_rows(kept, pipe.base, folder, cfg)
    tam_peft = pipe.tam.peft_dir if pipe.tam else None
    run_dpo(pairs_path, neg_path, pipe.base, start, adapter_dir, cfg, tam_peft_dir=tam_peft)
    metrics = json.loads((adapter_dir / METRICS).read_text())
    summary = pipe.train_summary() | {"edit_pairs": len(kept), "edits_lr": cfg.dpo_lr, "edits_beta": cfg.dpo_beta,
                                      "edits_steps": metrics.get("steps")}
    exp = pipe._export(adapter_dir, ws.export_path(), summary)
    log(f"export: {exp.path.name} ({exp.bytes / 1e6:.1f} MB)")
    tam_gguf = pipe.tam.gguf if pipe.tam else None
    check = verify_adapter(pipe.base, exp.path, tam_gguf, pipe.p("pairs"))  # loads, generates, scores a real text
    ws.activate(exp.path, tam_gguf, keep=KEEP_ADAPTERS)
    log(f"activate: {exp.path.name} is now active (trained on {len(kept)} of your edits)")
    info = {"key": key, "state": "done", "pairs": len(kept), "skipped": skipped, "start": str(start.relative_to(ws.path)),
            "adapter": str(exp.path.relative_to(ws.path)), "steps": metrics.get("steps"),
            "margin_before": metrics["before"]["margin_mean"], "margin_after": metrics["after"]["margin_mean"],
            "accuracy_before": metrics["before"]["accuracy"], "accuracy_after": metrics["after"]["accuracy"],
            "seconds": round(time.monotonic() - t0, 2), **check}
    atomic_write_text(marker, json.dumps(info, indent=1) + "\n")
    return info


def _key(pairs: list[dict], start: Path, pipe, cfg: TrainConfig) -> str:
    from cope_local.train.sft import dir_sha

    data = {"pairs": [[p["id"], p["messages"], p["chosen"], p["rejected"], p.get("rejected_stop_reason")] for p in pairs],
            "start": dir_sha(start), "tam": pipe.tam.key if pipe.tam else None,
            "cfg": [cfg.dpo_lr, cfg.dpo_epochs, cfg.dpo_beta, cfg.dpo_batch_size, cfg.seed, cfg.max_steps]}
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]

