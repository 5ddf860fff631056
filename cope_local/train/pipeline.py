"""The personalization pipeline: stages from files to files, skipped when done, resumable.

    inputs     items.jsonl                         -> stages/inputs.jsonl (+ inputs.generated.jsonl cache)
    pairs      stages/inputs.jsonl                 -> stages/pairs.jsonl, pairs.meta.json
    sft        stages/pairs.jsonl (+ TAM peft)     -> stages/sft/adapter/ (peft), stages/sft/sft.gguf
    crossfit   pairs but the DPO pairs             -> stages/crossfit/adapter/, crossfit.gguf (dpo_crossfit only)
    negatives  pairs + sft.gguf (+ TAM gguf)       -> stages/negatives.jsonl          (negatives.py)
    dpo        pairs + negatives + sft adapter     -> stages/dpo/adapter/ (peft)      (dpo.py)
               (with dpo_crossfit the crossfit adapter takes the SFT adapter's place in these two)
    export     dpo (or sft) adapter                -> adapters/<name>-<time>.gguf (bound to the base)
    activate   the exported adapter                -> active.json, after the decoder loaded it and generated

Each stage records stages/<stage>.json: the hash of its inputs and settings
("key") and whether it finished. A finished stage whose key still matches
and whose outputs exist is skipped; a stage whose inputs changed since an
interrupted attempt starts clean; an interrupted stage with the same key
resumes (SFT/DPO from their checkpoints, negatives from its partial file,
paraphrases from their cache). `activate` is the only step that touches
what drafts use, and only after the new adapter loaded and generated in the
decoder: a failure anywhere before leaves the previous adapter active.

With dpo_crossfit the preference stages work on the `crossfit` adapter in
place of the SFT one: an SFT adapter of the same settings that did not see
the DPO pairs (the newest dpo_max_pairs) mines their negatives and is what
DPO trains, so its preference is learned on texts it was not fitted to.

A TAM (`cope tam train`) is the same machinery on a folder home()/tams/NAME
with the stages inputs, pairs, sft (cfg.tam LoRA) and export (tam.gguf +
peft/); a profile uses it through `tam_adapter = "NAME"` in its [train] table.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cope_local.errors import CopeError
from cope_local.paths import atomic_write_text
from cope_local.train.config import TrainConfig
from cope_local.train.tam import TamRef, Workspace, resolve_tam

STAGES = ("inputs", "pairs", "sft", "crossfit", "negatives", "dpo", "export", "activate")
PREFERENCE_STAGES = ("crossfit", "negatives", "dpo")  # off unless cfg.dpo (crossfit: unless cfg.dpo_crossfit too)
TAM_STAGES = ("inputs", "pairs", "sft", "export")
PIPELINE_VERSION = 1  # part of every key: bump to invalidate old stage outputs
KEEP_ADAPTERS = 2  # exported adapters kept in adapters/: the active one and the one before (to go back)


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" | "skipped" (up to date) | "off" (disabled by the config)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Pipeline:
    def __init__(self, ws: Workspace, cfg: TrainConfig, *, progress: bool = True, log=_log):
        from cope_local.models import resolve_model

        self.ws, self.cfg, self.progress, self.log = ws, cfg, progress, log
        self.base = resolve_model(ws.model).resolve()
        # the model that writes missing inputs: the base itself unless the config names another
        self.paraphraser = resolve_model(cfg.paraphrase_model).resolve() if cfg.paraphrase_model else self.base
        self.tam: TamRef | None = resolve_tam(cfg.tam_adapter, self.base) if ws.kind == "profile" else None
        self.stages_dir = ws.stages_dir
        self.stages_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def paraphraser_label(self) -> str:
        return "the base model" if self.paraphraser == self.base else self.paraphraser.name

    # ---- paths -------------------------------------------------------------------------------
    def p(self, name: str) -> Path:
        s = self.stages_dir
        return {"inputs": s / "inputs.jsonl", "generated": s / "inputs.generated.jsonl", "pairs": s / "pairs.jsonl",
                "pairs_meta": s / "pairs.meta.json", "sft": s / "sft", "sft_adapter": s / "sft" / "adapter",
                "sft_gguf": s / "sft" / "sft.gguf", "crossfit": s / "crossfit",
                "crossfit_pairs": s / "crossfit" / "pairs.jsonl", "crossfit_adapter": s / "crossfit" / "adapter",
                "crossfit_gguf": s / "crossfit" / "crossfit.gguf", "negatives": s / "negatives.jsonl", "dpo": s / "dpo",
                "dpo_adapter": s / "dpo" / "adapter"}[name]

    def marker(self, stage: str) -> Path:
        return self.stages_dir / f"{stage}.json"

    def read_marker(self, stage: str) -> dict:
        try:
            data = json.loads(self.marker(stage).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    # ---- keys: what each stage's result depends on ---------------------------------------------
    def _need(self, path: Path, stage: str) -> Path:
        if not path.exists():
            raise CopeError(f"{path}: missing; run the `{stage}` stage first "
                            f"({self.ws.train_command(stage)})")
        return path

    def _file_key(self, path: Path, stage: str) -> str:
        from cope_local.train.sft import dir_sha

        path = self._need(path, stage)
        return dir_sha(path) if path.is_dir() else _sha(path)

    def key(self, stage: str) -> str:
        from cope_local.binding import base_fingerprint
        from cope_local.train.sft import val_settings

        c = self.cfg
        d: dict = {"v": PIPELINE_VERSION, "stage": stage, "kind": self.ws.kind}
        if stage == "inputs":
            d |= {"items": self._file_key(self.ws.items_path, "create"), "task": self.ws.task.name,
                  "base": base_fingerprint(self.paraphraser)}
            if self.ws.task.missing == "paraphrase":  # another paraphrase prompt makes other inputs
                from cope_local.tasks.registry import paraphrase_fingerprint

                d["paraphrase"] = paraphrase_fingerprint()
        elif stage == "pairs":
            d |= {"inputs": self._file_key(self.p("inputs"), "inputs"), "base": base_fingerprint(self.base),
                  "limits": [c.max_prompt_tokens, c.max_target_tokens]}
        elif stage in ("sft", "crossfit"):  # crossfit: the user adapter again, on all but the DPO pairs
            spec = c.tam if self.ws.kind == "tam" else c.user
            batch = c.tam_batch_size if self.ws.kind == "tam" else c.sft_batch_size
            d |= {"pairs": self._file_key(self.p("pairs"), "pairs"), "spec": spec.__dict__, "batch": batch,
                  "seed": c.seed, "max_steps": c.max_steps, "tam": self.tam.key if self.tam else None,
                  "precision": c.precision}
            val = val_settings(c, "tam" if self.ws.kind == "tam" else stage)  # none for crossfit
            if val:  # only when on: the keys of runs without it stay valid
                d["val"] = val
            if stage == "crossfit":
                d["max_pairs"] = c.dpo_max_pairs
        elif stage == "negatives":
            d |= {"pairs": self._file_key(self.p("pairs"), "pairs"),
                  "sft": self._file_key(self.preference_start("gguf"), self.preference_source),
                  "tam": self.tam.key if self.tam else None, "seed": c.seed,
                  "neg": [c.neg_samples, c.neg_temperature, c.neg_top_p, c.neg_max_tokens, c.neg_reward_prompt,
                          c.neg_length_ratio]}
            if c.dpo_max_pairs:  # only when on: the keys of runs without it stay valid
                d["max_pairs"] = c.dpo_max_pairs
        elif stage == "dpo":
            d |= {"pairs": self._file_key(self.p("pairs"), "pairs"),
                  "negatives": self._file_key(self.p("negatives"), "negatives"),
                  "sft": self._file_key(self.preference_start("adapter"), self.preference_source),
                  "tam": self.tam.key if self.tam else None, "seed": c.seed,
                  "dpo": [c.dpo_beta, c.dpo_lr, c.dpo_epochs, c.dpo_batch_size, c.dpo_reference],
                  "max_steps": c.max_steps, "precision": c.precision}
            if c.dpo_max_pairs:
                d["max_pairs"] = c.dpo_max_pairs
        elif stage == "export":
            d |= {"adapter": self._file_key(self.final_adapter(), "dpo" if self.uses_dpo else "sft"),
                  "base": base_fingerprint(self.base), "tam": self.tam.key if self.tam else None}
        elif stage == "activate":
            info = self.read_marker("export")
            if info.get("state") != "done":
                raise CopeError(f"{self.ws.path}: nothing exported yet; run the `export` stage first "
                                f"({self.ws.train_command('export')})")
            d |= {"adapter": self._file_key(self.ws.path / info["info"]["adapter"], "export"),
                  "tam": self.tam.key if self.tam else None}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:24]

    @property
    def uses_dpo(self) -> bool:
        return self.ws.kind == "profile" and self.cfg.dpo

    @property
    def preference_source(self) -> str:
        """The stage whose adapter mines the negatives and starts the DPO: sft, or crossfit with dpo_crossfit."""
        return "crossfit" if self.cfg.dpo_crossfit else "sft"

    def preference_start(self, form: str) -> Path:
        """That adapter as "gguf" (for llama.cpp's sampling and scoring) or "adapter" (peft, for DPO)."""
        return self.p(f"{self.preference_source}_{form}")

    def final_adapter(self) -> Path:
        return self.p("dpo_adapter") if self.uses_dpo else self.p("sft_adapter")

    # ---- outputs and scratch (removed before a stage reruns on other inputs) -------------------
    def outputs(self, stage: str, marker: dict) -> list[Path]:
        if stage == "inputs":
            return [self.p("inputs")]
        if stage == "pairs":
            return [self.p("pairs"), self.p("pairs_meta")]
        if stage == "sft":
            return [self.p("sft_adapter")] + ([self.p("sft_gguf")] if self.ws.kind == "profile" else [])
        if stage == "crossfit":
            return [self.p("crossfit_adapter"), self.p("crossfit_gguf")]
        if stage == "negatives":
            return [self.p("negatives")]
        if stage == "dpo":
            return [self.p("dpo_adapter")]
        if stage == "export":
            rel = (marker.get("info") or {}).get("adapter")
            return [self.ws.path / rel] if rel else [self.ws.path / ".none"]
        if stage == "activate":
            return []
        raise KeyError(stage)

    def scratch(self, stage: str) -> list[Path]:
        s = self.stages_dir
        return {"inputs": [self.p("inputs")], "pairs": [self.p("pairs"), self.p("pairs_meta")], "sft": [self.p("sft")],
                "crossfit": [self.p("crossfit")], "negatives": [self.p("negatives"), s / "negatives.jsonl.partial"],
                "dpo": [self.p("dpo")], "export": [], "activate": []}[stage]

    def is_current(self, stage: str, key: str, marker: dict) -> bool:
        if marker.get("state") != "done" or marker.get("key") != key:
            return False
        if stage == "activate":
            return self.ws.is_active(self.ws.path / marker.get("info", {}).get("adapter", ".none"))
        return all(p.exists() for p in self.outputs(stage, marker))

    # ---- running --------------------------------------------------------------------------------
    def run(self, stages=None) -> list[StageResult]:
        allowed = TAM_STAGES if self.ws.kind == "tam" else STAGES
        wanted = list(allowed) if not stages else [s.strip() for s in stages]
        for s in wanted:
            if s not in allowed:
                raise CopeError(f"--stages {s!r}: unknown stage; choose from {','.join(allowed)}")
        results = []
        for stage in [s for s in allowed if s in wanted]:
            if stage in PREFERENCE_STAGES and not self.uses_dpo:
                results.append(StageResult(stage, "off", info={"why": "dpo = false"}))
                self.log(f"{stage}: off (the SFT adapter is exported; --dpo adds the paper's negatives + DPO)")
                continue
            if stage == "crossfit" and not self.cfg.dpo_crossfit:
                results.append(StageResult(stage, "off", info={"why": "dpo_crossfit = false"}))
                self.log(f"{stage}: off (negatives and DPO start from the SFT adapter; dpo_crossfit=true: from one "
                         "that did not train on their pairs)")
                continue
            results.append(self.run_stage(stage))
        return results

    def run_stage(self, stage: str) -> StageResult:
        key = self.key(stage)
        marker = self.read_marker(stage)
        if self.is_current(stage, key, marker):
            self.log(f"{stage}: up to date")
            return StageResult(stage, "skipped", info=marker.get("info", {}))
        if marker.get("key") != key:  # other inputs than the last attempt: nothing of it may be resumed
            for path in self.scratch(stage):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        started = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
        atomic_write_text(self.marker(stage), json.dumps({"stage": stage, "key": key, "state": "running",
                                                          "started": started}, indent=1) + "\n")
        t0 = time.monotonic()
        info = getattr(self, f"_run_{stage}")() or {}
        seconds = time.monotonic() - t0
        atomic_write_text(self.marker(stage), json.dumps({"stage": stage, "key": key, "state": "done", "started": started,
                                                          "seconds": round(seconds, 2), "info": info}, indent=1) + "\n")
        return StageResult(stage, "ran", seconds, info)

    # ---- stages -----------------------------------------------------------------------------------
    def _run_inputs(self) -> dict:
        from cope_local.ingest import write_items
        from cope_local.train.paraphrase import Paraphraser

        items = self.ws.items()
        self.ws.check_size(len(items), "history items")
        task = self.ws.task
        need = sum(task.needs_generated_input(i) for i in items)
        with Paraphraser(self.paraphraser, self.p("generated"), total=need, progress=self.progress) as para:
            made = task.make_inputs(items, para if need else None)
        self.ws.check_size(len(made), "usable history items")
        write_items(self.p("inputs"), made)
        info = {"items": len(items), "kept": len(made), "generated": need}
        made_by = f" ({need} inputs generated by {self.paraphraser_label})" if need else ""
        self.log(f"inputs: {len(made)} items{made_by}")
        return info

    def _run_pairs(self) -> dict:
        from cope_local.ingest import read_items
        from cope_local.train.data import make_pairs, read_pairs_meta

        items = read_items(self.p("inputs"))
        examples = make_pairs(items, self.ws.task, self.base, self.p("pairs"), max_prompt=self.cfg.max_prompt_tokens,
                              max_target=self.cfg.max_target_tokens)
        self.ws.check_size(len(examples), "training pairs")
        meta = read_pairs_meta(self.p("pairs"))
        info = {k: meta.get(k) for k in ("count", "prompt_tokens", "target_tokens", "truncated")}
        self.log(f"pairs: {info['count']} pairs, {info['prompt_tokens']} prompt + {info['target_tokens']} target tokens"
                 + (f", {info['truncated']} cut to the length limits" if info["truncated"] else ""))
        return info

    def _run_sft(self) -> dict:
        from cope_local.train.sft import train_lora

        tam = self.ws.kind == "tam"
        result = train_lora(self.p("pairs"), self.p("sft_adapter"), base_gguf=self.base,
                            spec=self.cfg.tam if tam else self.cfg.user,
                            batch_size=self.cfg.tam_batch_size if tam else self.cfg.sft_batch_size, cfg=self.cfg,
                            work_dir=self.p("sft"), tam_peft=self.tam.peft_dir if self.tam else None,
                            label="tam" if tam else "sft", progress=self.progress)
        s = result.summary()
        info = {k: s[k] for k in ("examples", "steps", "loss_first", "loss_last", "micro_batch_tokens", "device",
                                  "resumed_from")}
        info["train_seconds"] = round(result.seconds, 1)
        self.log(f"{result.label}: {result.steps} steps, loss {s['loss_first']:.3f} -> {s['loss_last']:.3f}")
        if result.val_examples:
            info |= {"val_examples": result.val_examples, "val_losses": result.val_losses, "kept_step": result.kept_step}
            curve = ", ".join(f"{st}: {loss:.3f}" for st, loss in result.val_losses)
            kept = f"step {result.kept_step}" if result.kept_step is not None else "the last step"
            self.log(f"{result.label}: held-out loss ({result.val_examples} pairs) {curve}; kept {kept}")
        if not tam:  # negatives sample and score in llama.cpp, which needs the adapter as GGUF
            self._export(self.p("sft_adapter"), self.p("sft_gguf"), {"stage": "sft"})
        return info

    def _run_crossfit(self) -> dict:
        """The user adapter again, on every pair but the ones negatives and DPO will use."""
        from cope_local.train.data import read_pairs, read_pairs_meta, write_pairs
        from cope_local.train.negatives import preference_indexes
        from cope_local.train.sft import train_lora

        c = self.cfg
        if c.dpo_max_pairs <= 0:
            raise CopeError(f"{self.ws.path}: dpo_crossfit needs dpo_max_pairs > 0 (how many of the newest pairs the "
                            "crossfit adapter leaves out for DPO); add --set dpo_max_pairs=16")
        pairs = read_pairs(self.p("pairs"))
        held = set(preference_indexes(len(pairs), c))
        kept = [p for i, p in enumerate(pairs) if i not in held]
        if not kept:
            raise CopeError(f"{self.p('pairs')}: {len(pairs)} pairs, all of them DPO pairs (dpo_max_pairs "
                            f"{c.dpo_max_pairs}); nothing is left to train the crossfit adapter on: lower dpo_max_pairs")
        meta = {k: v for k, v in read_pairs_meta(self.p("pairs")).items() if k not in ("format", "count")}
        self.p("crossfit").mkdir(parents=True, exist_ok=True, mode=0o700)
        write_pairs(self.p("crossfit_pairs"), kept, meta)
        result = train_lora(self.p("crossfit_pairs"), self.p("crossfit_adapter"), base_gguf=self.base, spec=c.user,
                            batch_size=c.sft_batch_size, cfg=c, work_dir=self.p("crossfit"),
                            tam_peft=self.tam.peft_dir if self.tam else None, label="crossfit", progress=self.progress)
        s = result.summary()
        self.log(f"crossfit: {result.steps} steps on {len(kept)} pairs (the newest {len(held)} left for DPO), "
                 f"loss {s['loss_first']:.3f} -> {s['loss_last']:.3f}")
        self._export(self.p("crossfit_adapter"), self.p("crossfit_gguf"), {"stage": "crossfit"})
        return {"examples": len(kept), "held_out": len(held), "steps": result.steps, "loss_first": s["loss_first"],
                "loss_last": s["loss_last"], "train_seconds": round(result.seconds, 1)}

    def _run_negatives(self) -> dict:
        from cope_local.train.negatives import run_negatives

        out = run_negatives(self.p("pairs"), self.base, self.preference_start("gguf"), self.p("negatives"), self.cfg,
                            tam_gguf=self.tam.gguf if self.tam else None)
        rows = [json.loads(x) for x in Path(out).read_text(encoding="utf-8").splitlines() if x.strip()]
        return {"rows": len(rows)}

    def _run_dpo(self) -> dict:
        from cope_local.train.dpo import METRICS, run_dpo

        out = run_dpo(self.p("pairs"), self.p("negatives"), self.base, self.preference_start("adapter"),
                      self.p("dpo_adapter"), self.cfg, tam_peft_dir=self.tam.peft_dir if self.tam else None)
        try:
            metrics = json.loads((Path(out) / METRICS).read_text())
        except (OSError, ValueError):
            metrics = {}
        return {k: metrics.get(k) for k in ("steps", "before", "after", "seconds")}

    def _export(self, peft_dir: Path, out: Path, summary: dict):
        from convert.adapter import export_adapter

        return export_adapter(peft_dir, self.base, out, summary={k: v for k, v in summary.items() if v is not None},
                              name=f"{self.ws.name}-{out.stem}")

    def train_summary(self) -> dict:
        """cope.train.* keys written into the exported GGUF: what the adapter was trained on, and how."""
        sft = self.read_marker("sft").get("info", {})
        c = self.cfg
        spec = c.tam if self.ws.kind == "tam" else c.user
        out = {"kind": self.ws.kind, "profile": self.ws.name, "task": self.ws.task.name, "examples": sft.get("examples"),
               "sft_steps": sft.get("steps"), "sft_loss_first": sft.get("loss_first"),
               "sft_loss_last": sft.get("loss_last"), "lora_r": spec.r, "lora_alpha": spec.alpha,
               "lora_targets": ",".join(spec.targets), "lora_lr": spec.lr, "lora_epochs": float(spec.epochs),
               "seed": c.seed, "tam": self.tam.name if self.tam else "", "dpo": self.uses_dpo}
        if self.uses_dpo:
            dpo = self.read_marker("dpo").get("info", {})
            out |= {"dpo_steps": dpo.get("steps"), "dpo_beta": c.dpo_beta, "dpo_lr": c.dpo_lr,
                    "dpo_reference": c.dpo_reference, "dpo_crossfit": c.dpo_crossfit,
                    "dpo_margin_before": (dpo.get("before") or {}).get("margin_mean"),
                    "dpo_margin_after": (dpo.get("after") or {}).get("margin_mean")}
        return out

    def _run_export(self) -> dict:
        out = self.ws.export_path()
        if self.ws.kind == "tam":  # tam.json marks a complete TAM: gone while tam.gguf and peft/ are replaced
            (self.ws.path / "tam.json").unlink(missing_ok=True)
        exp = self._export(self.final_adapter(), out, self.train_summary())
        if self.ws.kind == "tam":
            self.ws.finish_tam(self.final_adapter(), self.base, self.read_marker("sft").get("info", {}))
        rel = str(Path(exp.path).relative_to(self.ws.path))
        self.log(f"export: {rel} ({exp.bytes / 1e6:.1f} MB, {exp.n_pairs} LoRA pairs, r{exp.rank})")
        return {"adapter": rel, "bytes": exp.bytes, "source": "dpo" if self.uses_dpo else "sft"}

    def _run_activate(self) -> dict:
        adapter = self.ws.path / self.read_marker("export")["info"]["adapter"]
        check = verify_adapter(self.base, adapter, self.tam.gguf if self.tam else None, self.p("pairs"))
        self.ws.activate(adapter, self.tam.gguf if self.tam else None, keep=KEEP_ADAPTERS)
        self.log(f"activate: {adapter.name} is now active (the decoder loaded it; on your first text it gives "
                 f"{check['target_logprob_user']:+.2f} vs {check['target_logprob_amateur']:+.2f} nats/token "
                 f"with and without it)")
        return {"adapter": str(adapter.relative_to(self.ws.path)), **check}


def verify_adapter(base: Path, adapter: Path, tam_gguf: Path | None, pairs_path: Path) -> dict:
    """Load `adapter` in the decoder, generate a few tokens and score one real text; raise CopeError if anything is off."""
    import numpy as np

    from cope_local.decode import Decoder, GenConfig
    from cope_local.train.data import read_pairs

    example = read_pairs(pairs_path)[0]
    try:
        with Decoder(base, adapter, tam=tam_gguf, n_ctx=max(512, example.length + 16)) as dec:
            gen = dec.generate(example.prompt_ids, GenConfig(mode="user", max_tokens=8, seed=0))
            ids = example.prompt_ids + example.target_ids
            user = dec.token_logprobs(ids, len(example.prompt_ids), role="expert")
            amateur = dec.token_logprobs(ids, len(example.prompt_ids), role="amateur")
    except CopeError as exc:
        raise CopeError(f"{adapter}: the new adapter failed to load in the decoder ({exc}); "
                        "the previous adapter stays active") from None
    if not (np.isfinite(user).all() and np.isfinite(amateur).all()) or (gen.steps == 0 and gen.stop_reason != "eos"):
        raise CopeError(f"{adapter}: the new adapter gives non-finite scores; the previous adapter stays active. "
                        "Train again with a lower learning rate")
    return {"target_logprob_user": round(float(user.mean()), 4), "target_logprob_amateur": round(float(amateur.mean()), 4),
            "sample": gen.text}


def train_profile(name: str, cfg: TrainConfig, stages=None, *, progress: bool = True, log=_log) -> list[StageResult]:
    """All (or the chosen) stages for profile NAME."""
    from cope_local.profile import load_profile

    return Pipeline(Workspace.from_profile(load_profile(name)), cfg, progress=progress, log=log).run(stages)
