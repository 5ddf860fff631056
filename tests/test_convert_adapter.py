"""convert.adapter: peft LoRA -> GGUF LoRA, applied by llama.cpp, compared with transformers + peft."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import blocked_network

from convert.adapter import export_adapter
from cope_local import binding
from cope_local.errors import CopeError
from cope_local.gguf_file import read_header


def gap(a_list, b_list) -> float:
    """Largest |log p_a - log p_b| over every position and vocabulary entry."""
    return float(max(np.abs(a - b).max() for a, b in zip(a_list, b_list)))


@pytest.fixture(scope="module")
def smol_adapter(convert_smol, convert_f32, convert_dir):
    """The random SmolLM2 LoRA exported against the F32 base, with sockets blocked throughout."""
    with blocked_network():
        return export_adapter(convert_smol.lora_dir, convert_f32, convert_dir / "smol-lora.gguf",
                              summary={"task": "news_headline", "examples": 12, "steps": 3})


def test_adapter_matches_transformers_peft_on_f32_base(smol_adapter, convert_smol, convert_f32, convert_llama_logprobs):
    lp = convert_llama_logprobs(convert_f32, convert_smol.ids, adapter=smol_adapter.path)
    assert gap(lp, convert_smol.lora_ref) < 0.05  # measured ~5e-5
    assert gap(convert_smol.lora_ref, convert_smol.base_ref) > 1.0  # the adapter really changes the model
    assert smol_adapter.n_pairs == 30 * 7 and smol_adapter.rank == 8 and smol_adapter.alpha == 16


def test_without_the_rotary_permutation_the_check_fails(smol_adapter, convert_smol, convert_f32, convert_dir,
                                                         convert_llama_logprobs):
    wrong = export_adapter(convert_smol.lora_dir, convert_f32, convert_dir / "smol-lora-unpermuted.gguf", permute_qk=False)
    lp = convert_llama_logprobs(convert_f32, convert_smol.ids, adapter=wrong.path)
    assert gap(lp, convert_smol.lora_ref) > 0.05  # measured ~7 nats: llama.cpp loads it silently, logits are wrong


def test_adapter_metadata_and_binding(smol_adapter, convert_f32, default_model):
    hdr = read_header(smol_adapter.path)
    assert hdr.get("general.type") == "adapter" and hdr.get("adapter.type") == "lora"
    assert hdr.get("general.architecture") == read_header(convert_f32).architecture == "llama"
    assert hdr.get("adapter.lora.alpha") == 16.0
    assert hdr.get(binding.KEY_BASE_FP) == binding.base_fingerprint(convert_f32)
    assert hdr.get(binding.KEY_BASE_SOURCE_FP) == binding.base_fingerprint(default_model)
    assert hdr.get("cope.train.task") == "news_headline" and hdr.get("cope.train.steps") == 3
    assert hdr.get(binding.KEY_VERSION) and hdr.get(binding.KEY_CREATED)
    names = set(hdr.tensors)
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.29.ffn_down.weight.lora_b" in names
    a, b = hdr.tensors["blk.0.attn_k.weight.lora_a"], hdr.tensors["blk.0.attn_k.weight.lora_b"]
    assert a.shape == (576, 8) and b.shape == (8, 192)  # GGUF order (ne0, ne1): A is (r, in), B is (out, r)
    assert smol_adapter.path.stat().st_mode & 0o777 == 0o600  # learned from private text
    assert binding.check_binding(smol_adapter.path, convert_f32).status == "match"
    assert binding.check_binding(smol_adapter.path, default_model).status == "match"  # same lineage (F32 re-encoding)


def test_adapter_on_the_quantized_base_keeps_the_top_token(smol_adapter, convert_smol, convert_llama_logprobs, default_model):
    lp = convert_llama_logprobs(default_model, convert_smol.ids, adapter=smol_adapter.path)
    for mine, ref in zip(lp, convert_smol.lora_ref):
        assert (np.exp(ref) * (ref - mine)).sum(-1).mean() < 0.1  # Q4_1 kernels quantize activations
        assert (mine.argmax(-1) == ref.argmax(-1)).mean() >= 0.7


def test_adapter_loads_in_the_project_decoder(smol_adapter, convert_f32, convert_tiny):
    from cope_local.decode import Decoder

    with Decoder(convert_f32, smol_adapter.path):
        pass
    with pytest.raises(CopeError, match="gemma3"):
        Decoder(convert_f32, _tiny_adapter(convert_tiny, "gemma3"))


def _tiny_adapter(convert_tiny, arch):
    tiny = convert_tiny(arch)
    out = tiny.gguf.with_name(f"tiny-{arch}-lora.gguf")
    if not out.exists():
        export_adapter(tiny.lora_dir, tiny.gguf, out)
    return out


@pytest.mark.parametrize("arch", ["gemma3", "qwen2", "llama"])
def test_tiny_architectures_adapter_exactness(arch, convert_tiny, convert_smol, convert_llama_logprobs):
    tiny = convert_tiny(arch)
    lp = convert_llama_logprobs(tiny.gguf, convert_smol.ids, adapter=_tiny_adapter(convert_tiny, arch))
    assert gap(lp, tiny.lora_ref) < 0.05
    assert gap(tiny.lora_ref, tiny.ref) > 0.1


def test_outtypes_f16_and_q8_0(smol_adapter, convert_smol, convert_f32, convert_dir, convert_llama_logprobs):
    f16 = export_adapter(convert_smol.lora_dir, convert_f32, convert_dir / "lora-f16.gguf", outtype="f16")
    q8 = export_adapter(convert_smol.lora_dir, convert_f32, convert_dir / "lora-q8.gguf", outtype="q8_0")
    assert q8.bytes < f16.bytes < smol_adapter.bytes
    types = {t.name: t.ggml_type for t in read_header(q8.path).tensors.values()}
    assert types["blk.0.attn_q.weight.lora_a"] == 8  # Q8_0 (rows of 576)
    assert types["blk.0.attn_q.weight.lora_b"] == 1  # F16: rows of r=8 cannot form 32-wide Q8_0 blocks
    for res in (f16, q8):
        lp = convert_llama_logprobs(convert_f32, convert_smol.ids, adapter=res.path)
        assert gap(lp, convert_smol.lora_ref) < 0.1


def test_rslora_and_alpha_patterns_are_folded_exactly(convert_tiny, convert_smol, convert_dir, convert_llama_logprobs):
    import torch
    from peft import LoraConfig, get_peft_model

    tiny = convert_tiny("llama")
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "down_proj"],
                     rank_pattern={"down_proj": 2}, alpha_pattern={"k_proj": 3})
    pm = get_peft_model(tiny.model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
        ref = [torch.log_softmax(pm(torch.tensor([i])).logits[0].double(), -1).numpy() for i in convert_smol.ids]
    folder = convert_dir / "tiny-rslora"
    pm.save_pretrained(folder)
    pm.unload()
    res = export_adapter(folder, tiny.gguf, convert_dir / "tiny-rslora.gguf")
    assert res.notes and "folded" in res.notes[0]
    assert gap(convert_llama_logprobs(tiny.gguf, convert_smol.ids, adapter=res.path), ref) < 0.05


@pytest.mark.parametrize("kwargs, needle", [
    (dict(target_modules=["embed_tokens", "q_proj"]), "embeddings / lm_head"),
    (dict(target_modules=["lm_head", "q_proj"]), "embeddings / lm_head"),
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(target_modules=["q_proj"], use_dora=True), "DoRA"),
])
def test_refuses_what_llama_cpp_cannot_apply(kwargs, needle, convert_tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    tiny = convert_tiny("llama")
    pm = get_peft_model(tiny.model, LoraConfig(r=2, lora_alpha=2, **kwargs))
    folder = tmp_path / "peft"
    pm.save_pretrained(folder)
    pm.unload()
    out = tmp_path / "out.gguf"
    with pytest.raises(CopeError, match=needle) as err:
        export_adapter(folder, tiny.gguf, out)
    assert str(folder) in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()
    # even if the config is edited to hide it, the tensors give it away
    if "embed_tokens" in kwargs["target_modules"]:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["target_modules"] = ["q_proj"]
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(CopeError, match="embedding"):
            export_adapter(folder, tiny.gguf, out)


def test_corrupt_and_mismatched_inputs(convert_smol, convert_f32, convert_tiny, tmp_path):
    import shutil

    out = tmp_path / "out.gguf"
    missing_cfg = tmp_path / "no-config"
    shutil.copytree(convert_smol.lora_dir, missing_cfg)
    (missing_cfg / "adapter_config.json").unlink()
    truncated = tmp_path / "truncated"
    shutil.copytree(convert_smol.lora_dir, truncated)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    bad_magic = tmp_path / "bad.gguf"
    bad_magic.write_bytes(b"NOPE" + convert_f32.read_bytes()[4:4096])
    cases = [
        (missing_cfg, convert_f32, "no adapter_config.json"),
        (truncated, convert_f32, "unreadable"),
        (tmp_path / "absent", convert_f32, "not a folder"),
        (convert_smol.lora_dir, bad_magic, "not a GGUF file"),
        (convert_smol.lora_dir, tmp_path / "absent.gguf", "no such"),
        (convert_tiny("llama").lora_dir, convert_f32, "trained on another base"),
    ]
    for peft_dir, base, needle in cases:
        with pytest.raises(CopeError, match=needle) as err:
            export_adapter(peft_dir, base, out)
        assert "\n" not in str(err.value)
        assert not out.exists()


def test_cli_adapter_and_check(convert_smol, convert_f32, convert_dir, capsys):
    from cope_local.cli import main

    out = convert_dir / "cli-lora.gguf"
    assert main(["convert", "adapter", str(convert_smol.lora_dir), "--base", str(convert_f32), "-o", str(out),
                 "--task", "review", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 210
    assert main(["convert", "check", str(out), "--base", "smollm2-135m", "--load", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "adapter" and info["fit"]["ok"] and info["fit"]["binding"] == "match"
    assert "loads" in info["fit"]["llama_cpp"]
    assert main(["convert", "check", str(out), "--base", "smollm2-135m"]) == 0
    text = capsys.readouterr().out
    assert "made for" in text and "task=review" in text and "FITS" in text
