"""Every training parameter in one place, with the paper's defaults.

Defaults follow the official CoPe code (see shared notes): TAM LoRA r16 on
q/k/v/o, user LoRA r8 on q/v, K=3 amateur samples per item, DPO beta 0.01.
Override from a TOML file (`[train]` table of the profile, or --config) and
from the command line; unknown keys are an error, not a silent no-op.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class LoraSpec:
    r: int  # rank
    alpha: int  # scaling = alpha / r
    targets: tuple[str, ...]  # peft module names
    lr: float  # AdamW learning rate
    epochs: float  # passes over the data
    dropout: float = 0.0  # LoRA dropout (0: deterministic, resumable bit-for-bit)


@dataclass
class TrainConfig:
    seed: int = 0  # one seed for data order, LoRA init, sampling
    device: str = "auto"  # auto: cuda, else mps, else cpu
    precision: str = "auto"  # auto: bf16/fp16 on GPUs, float32 on CPUs (exact resume); "bfloat16": also on CPUs with AVX512-BF16/AMX (1.6x faster, not bit-reproducible); "float32"
    max_prompt_tokens: int = 384  # longer prompts lose the end of their last message's text (the template's framing stays)
    max_target_tokens: int = 256  # longer targets are cut at the end (and get no end-of-turn token)
    batch_tokens: int = 2048  # memory budget per micro-batch (tokens); batches accumulate to batch_size
    # TAM: task adapter on non-personal data (paper: r16/alpha16 q,k,v,o, lr 1e-4, 3 epochs)
    tam: LoraSpec = field(default_factory=lambda: LoraSpec(16, 16, ("q_proj", "k_proj", "v_proj", "o_proj"), 1e-4, 3))
    tam_batch_size: int = 4  # examples per optimizer step
    # OPPU: the user adapter (paper: r8/alpha8 q,v, lr 1e-4, 2 epochs)
    user: LoraSpec = field(default_factory=lambda: LoraSpec(8, 8, ("q_proj", "v_proj"), 1e-4, 2))
    sft_batch_size: int = 4  # examples per optimizer step
    sft_val_fraction: float = 0.0  # > 0: this fraction of the user's newest pairs leaves the SFT and picks the kept
    #                                step (lowest held-out loss, checked sft_val_every steps); 0: off, the paper's setup
    sft_val_every: int = 0  # optimizer steps between held-out checks (0: twice per epoch)
    # synthetic negatives from the amateur (paper: K=3, T=1.0, top-p 0.95)
    neg_samples: int = 3  # K candidates per history item
    neg_temperature: float = 1.0  # sampling temperature
    neg_top_p: float = 0.95  # nucleus mass
    neg_max_tokens: int = 128  # length cap of a candidate
    neg_length_ratio: float = 2.0  # and at most this x the real text's tokens + 8: a 100-token ramble against a
    #                                30-token note teaches "be short", not the voice, and costs 3x the time (0: off)
    neg_reward_prompt: bool = False  # True: reward mean also over prompt tokens (the paper's code); False: completion only (negatives.py says why)
    # DPO on the user adapter (paper: beta 0.01, lr 5e-6, 1 epoch, batch 8, reference = TAM)
    dpo_beta: float = 0.01  # KL strength
    dpo_lr: float = 5e-6  # learning rate
    dpo_epochs: float = 1  # passes over the pairs
    dpo_batch_size: int = 8  # pairs per optimizer step
    dpo_reference: str = "tam"  # "tam": user adapter off (the paper); "sft": the SFT adapter
    dpo_max_pairs: int = 0  # > 0: negatives and DPO use only the newest N pairs (the history's end); 0: all (the paper).
    #                         They cost ~12 core-s per pair on a laptop CPU; a cap makes a 40-user evaluation fit
    dpo_crossfit: bool = False  # True: DPO on pairs the adapter never trained on. A second SFT adapter (stage
    #                             crossfit) trains on every pair but the newest dpo_max_pairs, mines their negatives
    #                             and is the adapter DPO trains (and its "sft" reference). Against the pilot's
    #                             saturation: an adapter SFT'd on the chosen texts prefers them before DPO starts.
    #                             Off: on 39 LaMP-7 users its CoPe trails the contrast without DPO (-0.015 ROUGE-L)
    # learning from edits (--from-edits, edits.py): DPO on the user's real corrections, reference = the trained adapter
    edits_lr: float = 5e-5  # 10x the paper's DPO lr: a few pairs and steps, and at 5e-6 the margin barely moves
    edits_epochs: float = 4  # passes over the edit pairs (few pairs: one pass is one or two steps)
    edits_beta: float = 0.1  # DPO's common beta: the margin starts at 0 (reference = policy) and moves visibly
    # pipeline (cope_local/train/pipeline.py)
    dpo: bool = False  # True (--dpo): negatives + DPO after SFT, the paper's CoPe training; False: the SFT (OPPU)
    #                    adapter is exported. Off by default: on the 39 LaMP-7 dev users CoPe with DPO (the paper's,
    #                    or SFT reference/beta 0.1/lr 5e-5; 16 pairs) ties the contrast on the SFT adapter (+0.007,
    #                    +0.009 ROUGE-L, CIs across 0), and uncapped it costs 6-9x the SFT's time (README "Results")
    paraphrase_model: str = ""  # model that writes missing inputs (LaMP-7's paraphrases): a name or .gguf; "" = the
    #                            model being trained. A base model without a chat template (Gemma 3 270M) copies the
    #                            text it should paraphrase; an instruct model writes the inputs for it
    tam_adapter: str = ""  # TAM the user adapter builds on: a name from `cope tam train` or its folder; "" = none (amateur = base)
    # safety
    watchdog_factor: float = 4.0  # stop when the smoothed loss exceeds this x its early value (divergence)
    checkpoint_every: int = 20  # optimizer steps between resumable checkpoints
    max_steps: int | None = None  # cap per stage (tests, demo); None = full epochs

    def as_dict(self) -> dict:
        return asdict(self)

    def updated(self, overrides: dict) -> TrainConfig:
        """A copy with `overrides` (flat keys; LoRA specs as `user.lr` or a nested table) applied."""
        data = self.as_dict()
        for key, value in _flatten(overrides).items():
            head, _, tail = key.partition(".")
            if head not in data:
                raise KeyError(f"unknown training setting {key!r}; known: {', '.join(sorted(data))}")
            if tail:
                if not isinstance(data[head], dict) or tail not in data[head]:
                    raise KeyError(f"unknown training setting {key!r}")
                data[head][tail] = value
            else:
                data[head] = value
        return from_dict(data)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def from_dict(data: dict) -> TrainConfig:
    kwargs = {}
    for f in fields(TrainConfig):
        if f.name not in data:
            continue
        v = data[f.name]
        if f.name in ("tam", "user") and isinstance(v, dict):
            v = LoraSpec(**{**v, "targets": tuple(v["targets"])})
        kwargs[f.name] = v
    return TrainConfig(**kwargs)
