"""DPO on the user adapter, real default model and trl: the reference is the adapter switched off
(the amateur, as in the paper), and training raises the implicit-reward margin on its pairs."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import train_tiny_cfg

from cope_local.train import dpo as dpo_mod
from cope_local.train.dpo import build_rows, load_policy, make_trainer, reference_logps, run_dpo
from cope_local.train.negatives import candidate_length

BETA = 0.1  # reference tests read the reference back as logps - rewards / beta: a tiny beta would magnify rounding


def _logp(model, prompt: list[int], completion: list[int]) -> float:
    """log p(completion | prompt) summed: one unpadded sequence, full log-softmax in float64 (not trl's code)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # (T, V)
    return sum(lp[i - 1, ids[0, i]].item() for i in range(len(prompt), ids.shape[1]))


def _pair_logps(model, rows):
    return ([_logp(model, r["prompt_ids"], r["chosen_ids"]) for r in rows],
            [_logp(model, r["prompt_ids"], r["rejected_ids"]) for r in rows])


@pytest.fixture(scope="module")
def dpo_policy(train_cache, default_model, train_random_user, train_tiny_pairs, train_tiny_negatives):
    """(policy, tokenizer, first 2 rows, logps with the adapter off, logps with it on)."""
    policy, tok = load_policy(default_model, train_random_user.peft)
    rows = build_rows(train_tiny_pairs, train_tiny_negatives)[:2]
    with policy.disable_adapter():
        off = _pair_logps(policy, rows)
    on = _pair_logps(policy, rows)
    # the test can tell the two apart: the user adapter moves every sequence's log-prob
    assert min(abs(a - b) for a, b in zip(off[0] + off[1], on[0] + on[1])) > 0.02
    return policy, tok, rows, off, on


def test_rows_are_tokenized_like_drafting(default_model, train_tiny_pairs, train_tiny_negatives):
    from cope_local.decode import Decoder
    from cope_local.train.data import turn_end_id

    pairs = [json.loads(x) for x in open(train_tiny_pairs)]
    rows = build_rows(train_tiny_pairs, train_tiny_negatives)
    with Decoder(default_model) as dec:
        eot = turn_end_id(dec.model, dec.chat_template)
        for pair, row in zip(pairs, rows):
            assert row["prompt_ids"] == dec.prompt_ids(pair["messages"])  # SmolLM2 adds no BOS: none is added
            assert row["chosen_ids"] == dec.model.tokenize(pair["target"], special=False) + [eot]
            assert row["rejected_ids"][-1] == eot or len(row["rejected_ids"]) == candidate_length(train_tiny_cfg(),
                                                                                                   len(row["chosen_ids"]))


def test_the_loss_uses_the_model_with_the_user_adapter_off_as_reference(dpo_policy, tmp_path):
    policy, tok, rows, off, on = dpo_policy
    cfg = train_tiny_cfg(dpo_beta=BETA, dpo_batch_size=2)
    ref = reference_logps(policy, rows, "tam", 2, tok.pad_token_id)
    for mine, independent in zip(ref[0] + ref[1], off[0] + off[1]):
        assert mine == pytest.approx(independent, abs=2e-3)
    trainer = make_trainer(policy, tok, rows, ref, cfg, tmp_path)
    assert list(trainer.model.peft_config) == ["default"]  # trl's copy of the SFT adapter is gone
    # float32 on a CPU: trl 1.16's DPOConfig would otherwise autocast to bfloat16 (bf16=True by default)
    assert not trainer.args.bf16 and trainer.accelerator.mixed_precision == "no"
    # what the loss reads: trl logs rewards = beta * (policy - reference) of the batch it was given (one pair here)
    policy.train()
    try:
        for i in range(len(rows)):
            trainer.compute_loss(trainer.model, trainer.data_collator([trainer.train_dataset[i]]))
            m = trainer._metrics["train"]
            for side, k in (("chosen", 0), ("rejected", 1)):
                policy_logp = m[f"logps/{side}"][-1]
                ref_used = policy_logp - m[f"rewards/{side}"][-1] / BETA
                assert policy_logp == pytest.approx(on[k][i], abs=2e-3)
                assert ref_used == pytest.approx(off[k][i], abs=2e-3)  # adapter off: the amateur
                assert abs(ref_used - on[k][i]) > 0.02  # not the SFT adapter
    finally:
        policy.eval()


def test_sft_reference_is_the_adapter_as_loaded(dpo_policy):
    policy, tok, rows, off, on = dpo_policy
    ref = reference_logps(policy, rows, "sft", 2, tok.pad_token_id)
    assert ref[0] + ref[1] == pytest.approx(on[0] + on[1], abs=2e-3)


def test_with_a_tam_the_reference_is_base_plus_tam(default_model, train_random_user, dpo_policy, tmp_path):
    """The paper's amateur is the TAM-merged base: load_policy merges the TAM, so adapter-off is exactly that."""
    from peft import LoraConfig, get_peft_model

    from cope_local.train.hf import load_base

    _policy, tok, rows, _off, _on = dpo_policy
    model, _ = load_base(default_model)
    torch.manual_seed(1)
    tam = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in tam.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    tam.save_pretrained(tmp_path / "tam")
    r = rows[0]
    with_tam = _logp(tam, r["prompt_ids"], r["chosen_ids"])
    with tam.disable_adapter():
        base_only = _logp(tam, r["prompt_ids"], r["chosen_ids"])
    del tam, model
    policy, _ = load_policy(default_model, train_random_user.peft, tmp_path / "tam")
    ref = reference_logps(policy, rows[:1], "tam", 1, tok.pad_token_id)
    assert ref[0][0] == pytest.approx(with_tam, abs=2e-3)
    assert abs(ref[0][0] - base_only) > 0.05


def test_trl_alone_would_take_the_sft_adapter_as_reference(dpo_policy, tmp_path):
    """What trl 1.16 does by itself with a PeftModel and no ref_model (why dpo.py sets the reference)."""
    from datasets import Dataset
    from trl import DPOConfig

    policy, tok, rows, off, on = dpo_policy
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=None, beta=BETA,
                     per_device_train_batch_size=2, precompute_ref_log_probs=False,
                     bf16=False)  # trl 1.16 defaults to bf16 autocast, on a CPU too
    data = Dataset.from_list([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows])
    trainer = dpo_mod._trainer_class()(model=policy, args=args, train_dataset=data, processing_class=tok)
    try:
        assert "ref" in trainer.model.peft_config  # trl copied the loaded adapter...
        batch = trainer.data_collator([data[i] for i in range(2)])
        chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
        assert chosen.tolist() == pytest.approx(on[0][:2], abs=2e-3)  # ...and scores the reference with it
        assert rejected.tolist() == pytest.approx(on[1][:2], abs=2e-3)
        trainer.model.delete_adapter("ref")
        chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
        assert chosen.tolist() == pytest.approx(off[0][:2], abs=2e-3)  # without the copy: adapter disabled
        assert rejected.tolist() == pytest.approx(off[1][:2], abs=2e-3)
    finally:
        if "ref" in policy.peft_config:
            policy.delete_adapter("ref")


def test_dpo_raises_the_margin_and_a_killed_run_resumes_to_the_same_weights(
        default_model, train_tiny_pairs, train_tiny_negatives, train_random_user, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    # lr 2e-3, not the paper's 5e-6: AdamW moves each weight by ~lr per step whatever the gradient's scale,
    # and 2 steps at 5e-6 would move the margin by less than float noise; the paper runs hundreds of steps.
    cfg = train_tiny_cfg(dpo_lr=2e-3, dpo_batch_size=2, max_steps=2, checkpoint_every=1)
    pairs = tmp_path / "pairs.jsonl"  # 4 of the 6 pairs: each run scores its pairs 3 times (before, reference, after)
    pairs.write_text("".join(open(train_tiny_pairs).readlines()[:4]))
    args = (pairs, train_tiny_negatives, default_model, train_random_user.peft)
    out = run_dpo(*args, tmp_path / "a" / "adapter", cfg)
    m = json.loads((out / "dpo_metrics.json").read_text())
    assert m["reference"] == "tam" and m["steps"] == 2 and m["pairs"] == 4
    before, after = m["before"], m["after"]
    print(f"DPO margin {before['margin_mean']:+.4f} -> {after['margin_mean']:+.4f}, accuracy {before['accuracy']:.2f} -> "
          f"{after['accuracy']:.2f}, loss {before['loss']:.4f} -> {after['loss']:.4f}, {m['steps_per_s']:.2f} steps/s")
    assert after["margin_mean"] > before["margin_mean"] + 0.01
    assert after["accuracy"] >= before["accuracy"]
    assert after["loss"] < before["loss"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                      "dpo_metrics.json"]
    assert not (tmp_path / "a" / "adapter.work").exists()
    # a plain peft LoRA: convert.adapter exports it and the decoder drafts with it
    from convert.adapter import export_adapter
    from cope_local.decode import Decoder, GenConfig

    gguf = export_adapter(out, default_model, tmp_path / "dpo.gguf").path
    with Decoder(default_model, gguf) as dec:
        assert dec.generate("Say hi.", GenConfig(mode="cope", max_tokens=4)).steps > 0
    # done: a rerun returns at once
    monkeypatch.setattr(dpo_mod, "load_policy", lambda *a, **k: pytest.fail("a finished stage ran again"))
    assert run_dpo(*args, out, cfg) == out
    monkeypatch.undo()

    # Ctrl-C during step 1: that step ends, a checkpoint is saved, KeyboardInterrupt is raised
    real_callbacks = dpo_mod._callbacks

    def with_ctrl_c(cfg, state):
        from transformers import TrainerCallback

        class CtrlC(TrainerCallback):
            def on_step_begin(self, args, st, control, **kw):
                if st.global_step == 0:  # Ctrl-C while step 1 runs
                    os.kill(os.getpid(), signal.SIGINT)

        return real_callbacks(cfg, state) + [CtrlC()]

    monkeypatch.setattr(dpo_mod, "_callbacks", with_ctrl_c)
    out_b = tmp_path / "b" / "adapter"
    with pytest.raises(KeyboardInterrupt):
        run_dpo(*args, out_b, cfg)
    assert not out_b.exists()
    ckpts = sorted(p.name for p in (tmp_path / "b" / "adapter.work" / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-1"]
    monkeypatch.undo()
    capsys.readouterr()
    run_dpo(*args, out_b, cfg)
    assert "resuming from checkpoint-1" in capsys.readouterr().err
    a = load_file(out / "adapter_model.safetensors")
    b = load_file(out_b / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    mb = json.loads((out_b / "dpo_metrics.json").read_text())
    assert mb["after"]["margin_mean"] == pytest.approx(after["margin_mean"], abs=1e-6)
