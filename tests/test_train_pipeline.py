"""The personalization pipeline end to end on a tiny history: files per stage, skips, activation, failures."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest

from cope_local import profile as profiles
from cope_local.errors import CopeError
from cope_local.train.config import TrainConfig

PERSONA = files("cope_local").joinpath("data/persona/history.jsonl")
PROMPT = "Hi Ro, can you patch the spinnaker before Sunday's race?"


@pytest.fixture(autouse=True)
def _train_env(monkeypatch, pytestconfig):
    """The HF copy of the base, kept in .pytest_cache across sessions (building it costs ~20-40 s; loading ~0.5 s)."""
    monkeypatch.setenv("COPE_CACHE", str(pytestconfig.cache.mkdir("cope-train-cache")))
    monkeypatch.setenv("COPE_THREADS", "2")


def history(tmp_path: Path, n: int) -> Path:
    path = tmp_path / f"ro{n}.jsonl"
    lines = PERSONA.read_text(encoding="utf-8").splitlines()[:n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_cfg(**kw) -> TrainConfig:
    """Few, short, bold steps: enough to change the drafts of a 135M model, fast on 2 cores. All stages (--dpo)."""
    cfg = TrainConfig(seed=0, max_steps=3, max_target_tokens=32, neg_samples=2, neg_max_tokens=8,
                      dpo_batch_size=8, dpo=True).updated({"user.lr": 3e-3, "sft_batch_size": 4})
    return cfg.updated(kw) if kw else cfg


def stage_files(p) -> dict:
    s = p.stages_dir
    return {"inputs": [s / "inputs.jsonl"], "pairs": [s / "pairs.jsonl", s / "pairs.meta.json"],
            "sft": [s / "sft" / "adapter" / "adapter_model.safetensors", s / "sft" / "sft.gguf"],
            "negatives": [s / "negatives.jsonl"], "dpo": [s / "dpo" / "adapter" / "adapter_model.safetensors"]}


def draft(model, adapter, mode: str) -> str:
    from cope_local.decode import Decoder, GenConfig
    from cope_local.tasks import get_task

    with Decoder(model, adapter, n_ctx=512) as dec:
        return dec.generate(get_task("email-reply").draft_messages(PROMPT), GenConfig(mode=mode, max_tokens=24)).text


def test_full_pipeline_activates_an_adapter_that_changes_drafts(default_model, tmp_path):
    from cope_local.train.pipeline import STAGES, train_profile

    p, _, _ = profiles.create_profile("ro", [history(tmp_path, 8)], task="email-reply")
    results = train_profile("ro", tiny_cfg(), progress=False)
    assert [(r.stage, r.status) for r in results] == [(s, "off" if s == "crossfit" else "ran") for s in STAGES]
    for stage, paths in stage_files(p).items():
        assert all(x.exists() for x in paths), stage
        marker = json.loads((p.stages_dir / f"{stage}.json").read_text())
        assert marker["state"] == "done" and len(marker["key"]) == 24
    pairs = [json.loads(x) for x in (p.stages_dir / "pairs.jsonl").read_text().splitlines()]
    negs = [json.loads(x) for x in (p.stages_dir / "negatives.jsonl").read_text().splitlines()]
    assert len(pairs) == len(negs) == 8 and [n["id"] for n in negs] == [x["id"] for x in pairs]
    sft = json.loads((p.stages_dir / "sft.json").read_text())["info"]
    assert sft["steps"] == 3 and sft["examples"] == 8

    active = profiles.active_adapter("ro")
    assert active is not None and active.parent == p.adapters_dir and active.suffix == ".gguf"
    from cope_local.gguf_file import read_header

    meta = read_header(active, what="adapter").values
    assert meta["cope.train.profile"] == "ro" and meta["cope.train.sft_steps"] == 3 and meta["cope.train.dpo"] is True
    base_text, user_text = draft(default_model, None, "base"), draft(default_model, active, "user")
    assert user_text != base_text
    from cope_local.decode.decoder import default_mode_for

    assert default_mode_for(active) == "cope" and default_mode_for(None) == "base"  # a DPO adapter drafts in cope mode

    # a second run has nothing to do
    again = train_profile("ro", tiny_cfg(), progress=False)
    assert [r.status for r in again] == ["off" if s == "crossfit" else "skipped" for s in STAGES]

    # an export that fails (the DPO adapter's weights are damaged) leaves the active adapter as it was
    before = p.active_path.read_text()
    weights = p.stages_dir / "dpo" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CopeError):
        train_profile("ro", tiny_cfg(), stages=["export", "activate"], progress=False)
    assert p.active_path.read_text() == before and active.exists()
    assert draft(default_model, active, "user") == user_text  # the old adapter still works
    assert sorted(p.adapters_dir.glob("*.gguf")) == [active]  # no half-written export left behind


def lora_weights(adapter_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def mean_logprob(model, adapter, pairs: list[dict]) -> float:
    """Mean log-probability per target token of `pairs` under the base with `adapter` (None: the base alone)."""
    import numpy as np

    from cope_local.decode import Decoder

    with Decoder(model, adapter, n_ctx=512) as dec:
        return float(np.mean([dec.token_logprobs(x["prompt_ids"] + x["target_ids"], len(x["prompt_ids"]),
                                                 role="expert" if adapter else "amateur").mean() for x in pairs]))


def test_crossfit_dpo_starts_from_an_adapter_that_never_saw_the_dpo_pairs(default_model, tmp_path):
    import numpy as np

    from cope_local.train.pipeline import train_profile

    p, _, _ = profiles.create_profile("ro", [history(tmp_path, 10)], task="email-reply")
    with pytest.raises(CopeError, match=r"dpo_crossfit needs dpo_max_pairs > 0.*--set dpo_max_pairs=16"):
        train_profile("ro", tiny_cfg(dpo_crossfit=True), stages=["inputs", "pairs", "sft", "crossfit"], progress=False)
    cfg = tiny_cfg(dpo_crossfit=True, dpo_max_pairs=3, dpo_reference="sft", dpo_lr=1e-3)
    stages = ["inputs", "pairs", "sft", "crossfit", "negatives", "dpo"]
    results = train_profile("ro", cfg, stages=stages, progress=False)
    assert [r.status for r in results] == ["skipped"] * 3 + ["ran"] * 3  # the failed attempt made inputs, pairs, sft
    s = p.stages_dir
    pairs = [json.loads(x) for x in (s / "pairs.jsonl").read_text().splitlines()]
    trained = [json.loads(x) for x in (s / "crossfit" / "pairs.jsonl").read_text().splitlines()]
    negs = [json.loads(x) for x in (s / "negatives.jsonl").read_text().splitlines()]
    assert [x["id"] for x in trained] == [x["id"] for x in pairs[:7]]  # every pair but the newest 3
    assert [n["id"] for n in negs] == [x["id"] for x in pairs[7:]]  # which are the ones mined (and DPO'd)
    info = json.loads((s / "crossfit.json").read_text())["info"]
    assert (info["examples"], info["held_out"], info["steps"]) == (7, 3, 3)

    # the SFT adapter trained on the DPO pairs and raised their likelihood more than the crossfit adapter did
    held = pairs[7:]
    base_lp = mean_logprob(default_model, None, held)
    sft_gain = mean_logprob(default_model, s / "sft" / "sft.gguf", held) - base_lp
    crossfit_gain = mean_logprob(default_model, s / "crossfit" / "crossfit.gguf", held) - base_lp
    assert sft_gain > crossfit_gain + 0.05, (sft_gain, crossfit_gain)

    # DPO trained the crossfit adapter, not the SFT one: its weights moved away from the crossfit adapter's only
    dpo, cross, sft = (lora_weights(s / d / "adapter") for d in ("dpo", "crossfit", "sft"))
    assert dpo.keys() == cross.keys() == sft.keys()
    dist = {name: sum(float(np.linalg.norm(dpo[k] - other[k])) for k in dpo) for name, other in (("crossfit", cross),
                                                                                                ("sft", sft))}
    assert 0 < dist["crossfit"] < dist["sft"] / 2, dist

    # switching it off again: the SFT adapter mines and is trained; the sft stage is not redone
    off = train_profile("ro", cfg.updated({"dpo_crossfit": False}), stages=stages, progress=False)
    assert [(r.stage, r.status) for r in off] == [("inputs", "skipped"), ("pairs", "skipped"), ("sft", "skipped"),
                                                 ("crossfit", "off"), ("negatives", "ran"), ("dpo", "ran")]


def test_stages_skip_when_done_and_rerun_when_inputs_change(default_model, tmp_path):
    from cope_local.train.pipeline import train_profile

    p, _, _ = profiles.create_profile("ro", [history(tmp_path, 9)], task="email-reply")
    cfg = tiny_cfg()
    first = train_profile("ro", cfg, stages=["inputs", "pairs"], progress=False)
    assert [(r.stage, r.status) for r in first] == [("inputs", "ran"), ("pairs", "ran")]
    mtime = (p.stages_dir / "pairs.jsonl").stat().st_mtime_ns
    second = train_profile("ro", cfg, stages=["inputs", "pairs"], progress=False)
    assert [r.status for r in second] == ["skipped", "skipped"]
    assert (p.stages_dir / "pairs.jsonl").stat().st_mtime_ns == mtime
    # a setting the stage depends on changes: it reruns (and only it)
    third = train_profile("ro", cfg.updated({"max_target_tokens": 16}), stages=["inputs", "pairs"], progress=False)
    assert [r.status for r in third] == ["skipped", "ran"]
    assert max(len(json.loads(x)["target_ids"]) for x in (p.stages_dir / "pairs.jsonl").read_text().splitlines()) == 16
    # a setting it does not depend on changes: still skipped
    fourth = train_profile("ro", cfg.updated({"max_target_tokens": 16, "dpo_beta": 0.5}), stages=["pairs"], progress=False)
    assert [r.status for r in fourth] == ["skipped"]
    # an output removed by hand: rebuilt
    (p.stages_dir / "pairs.jsonl").unlink()
    assert train_profile("ro", cfg.updated({"max_target_tokens": 16}), stages=["pairs"], progress=False)[0].status == "ran"
    # a stage whose input is missing says which stage to run first
    with pytest.raises(CopeError, match=r"run the `sft` stage first \(cope profile train ro --stages sft\)"):
        train_profile("ro", cfg, stages=["negatives"], progress=False)


def test_too_small_history_is_refused_with_the_fix(default_model, tmp_path):
    from cope_local.ingest import read_items, write_items
    from cope_local.train.pipeline import train_profile

    p, _, _ = profiles.create_profile("few", [history(tmp_path, 8)], task="email-reply")
    write_items(p.items_path, read_items(p.items_path)[:5])  # edited down by hand below the minimum
    with pytest.raises(CopeError, match=r"items.jsonl: only 5 history items, need at least 8.*add more of your writing"):
        train_profile("few", tiny_cfg(), progress=False)
    assert not (p.stages_dir / "inputs.jsonl").exists() and profiles.active_adapter("few") is None


def test_settings_merge_in_order(tmp_path):
    from cope_local.train.settings import load_config

    p, _, _ = profiles.create_profile("cfg", [history(tmp_path, 8)], task="email-reply")
    p.extra["train"] = {"seed": 7, "user": {"lr": 2e-4}, "dpo_beta": 0.05}
    profiles.save_profile(p)
    p = profiles.load_profile("cfg")
    conf = tmp_path / "c.toml"
    conf.write_text('[train]\ndpo_beta = 0.1\nuser.epochs = 3\n', encoding="utf-8")
    cfg = load_config(p, config_file=conf, sets=["user.targets=[\"q_proj\", \"k_proj\"]", "dpo_beta=0.2", "dpo=false"],
                      device="cpu", max_steps=5)
    assert (cfg.seed, cfg.user.lr, cfg.user.epochs, cfg.dpo_beta, cfg.dpo, cfg.device, cfg.max_steps) == \
        (7, 2e-4, 3, 0.2, False, "cpu", 5)
    assert cfg.user.targets == ("q_proj", "k_proj") and cfg.user.r == 8  # untouched defaults stay the paper's
    with pytest.raises(CopeError, match="--set: unknown training setting 'user_lr'"):
        load_config(p, sets=["user_lr=1"])
    with pytest.raises(CopeError, match=r"c2.toml: dpo_beta = 'high' should be of type float"):
        (tmp_path / "c2.toml").write_text('dpo_beta = "high"\n')
        load_config(p, config_file=tmp_path / "c2.toml")


@pytest.fixture
def cope(monkeypatch):
    """cope_local.cli.main without command modules other engineers have not written yet."""
    import importlib

    from cope_local import cli

    usable = []
    for name in cli.COMMAND_MODULES:
        try:
            importlib.import_module(name)
            usable.append(name)
        except ModuleNotFoundError as exc:
            if not (exc.name and name.startswith(exc.name)):
                raise
    monkeypatch.setattr(cli, "COMMAND_MODULES", usable)
    return cli.main


def test_cli_train_stages_and_errors(default_model, tmp_path, capsys, cope):
    assert cope(["profile", "create", "ro", "--from", str(history(tmp_path, 8))]) == 0
    capsys.readouterr()
    assert cope(["profile", "train", "ro", "--stages", "inputs,pairs", "--set", "max_target_tokens=20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(s["stage"], s["status"]) for s in out["stages"]] == [("inputs", "ran"), ("pairs", "ran")]
    assert cope(["profile", "train", "ro", "--stages", "pairs,bogus"]) == 2
    assert "--stages 'bogus': unknown stage" in capsys.readouterr().err
    assert cope(["profile", "train", "ro", "--set", "user.lr=fast"]) == 2
    assert "user.lr = 'fast' should be of type float" in capsys.readouterr().err
    assert cope(["profile", "train", "nobody"]) == 2
    capsys.readouterr()
    # the default leaves out the paper's negatives + DPO; --dpo runs them (settings line says so)
    from cope_local.train.settings import load_config

    assert load_config(None).dpo is False
    assert cope(["profile", "train", "ro", "--dpo", "--stages", "inputs", "--json"]) == 0
    assert "dpo=True" in capsys.readouterr().err


def test_tam_then_profile_on_top_of_it(default_model, tmp_path, cope):
    from cope_local.train.pipeline import train_profile

    corpus = tmp_path / "corpus.jsonl"  # non-personal replies: the task, not the voice
    corpus.write_text("".join(json.dumps({"input": f"Can we meet on day {i}?", "output": f"Yes, day {i} works for me. "
                                          "Best regards, Sam"}) + "\n" for i in range(10)), encoding="utf-8")
    assert cope(["tam", "train", "--task", "email-reply", "--data", str(corpus), "--name", "replies",
                     "--max-steps", "2", "--set", "max_target_tokens=16"]) == 0
    from cope_local.train.tam import resolve_tam

    tam = resolve_tam("replies", default_model)
    assert tam.gguf.exists() and (tam.peft_dir / "adapter_config.json").exists()
    assert json.loads((tam.path / "tam.json").read_text())["steps"] == 2

    profiles.create_profile("ro", [history(tmp_path, 8)], task="email-reply")
    results = train_profile("ro", tiny_cfg(max_steps=1, dpo=False, tam_adapter="replies"), progress=False)
    assert [r.status for r in results] == ["ran", "ran", "ran", "off", "off", "off", "ran", "ran"]  # crossfit, negatives, dpo
    assert profiles.active_tam("ro") == tam.gguf.resolve()
    from cope_local.gguf_file import read_header

    assert read_header(profiles.active_adapter("ro"), what="adapter").values["cope.train.tam"] == "replies"
    from cope_local.decode.decoder import default_mode_for

    assert default_mode_for(profiles.active_adapter("ro")) == "user"  # an SFT (OPPU) adapter drafts alone by default
    with pytest.raises(CopeError, match="no trained TAM"):
        train_profile("ro", tiny_cfg(tam_adapter="nothere"), progress=False)


def test_a_named_paraphrase_model_writes_the_missing_inputs(default_model, convert_f32, tmp_path):
    """paraphrase_model: another model than the one trained writes LaMP-7's inputs (Gemma 3 270M, a base
    model, copies the tweet it should paraphrase; an instruct model writes them for it). Its answers are
    cached under its own fingerprint, and naming another writer reruns the inputs stage."""
    from cope_local.binding import base_fingerprint
    from cope_local.train.paraphrase import Paraphraser
    from cope_local.train.pipeline import Pipeline, train_profile
    from cope_local.train.tam import Workspace

    tweets = tmp_path / "tweets.jsonl"
    tweets.write_text("".join(json.dumps({"output": f"@pal_{i} lol the bus was late again today, {i} times this week"})
                              + "\n" for i in range(8)), encoding="utf-8")
    p, _, _ = profiles.create_profile("tw", [tweets], task="lamp7")
    ws = Workspace.from_profile(p)
    cfg = tiny_cfg(paraphrase_model=str(convert_f32))
    pipe = Pipeline(ws, cfg, progress=False)
    assert pipe.paraphraser == convert_f32.resolve() and pipe.base == default_model.resolve()
    assert base_fingerprint(convert_f32) != base_fingerprint(default_model)  # F32 tensors: another writer
    assert pipe.key("inputs") != Pipeline(ws, tiny_cfg(), progress=False).key("inputs")

    assert [r.status for r in train_profile("tw", cfg, stages=["inputs"], progress=False)] == ["ran"]
    cached = [json.loads(x)["key"] for x in (p.stages_dir / "inputs.generated.jsonl").read_text().splitlines()]
    from cope_local.tasks import paraphrase_messages

    first = paraphrase_messages("@pal_0 lol the bus was late again today, 0 times this week")
    assert len(cached) == 8 and Paraphraser(convert_f32, tmp_path / "x.jsonl").key(first) in cached
    assert Paraphraser(default_model, tmp_path / "x.jsonl").key(first) not in cached
    # the same writer again: nothing to do; the trained model writing them instead: the stage reruns
    assert [r.status for r in train_profile("tw", cfg, stages=["inputs"], progress=False)] == ["skipped"]
    assert [r.status for r in train_profile("tw", tiny_cfg(), stages=["inputs"], progress=False)] == ["ran"]
    with pytest.raises(CopeError, match="unknown model"):
        Pipeline(ws, tiny_cfg(paraphrase_model="no-such-model"), progress=False)
