"""`cope convert check`: explains any GGUF in one screen and says whether it fits a base."""

from __future__ import annotations

import json
import shutil

import pytest

from convert.check import describe, render
from cope_local.cli import main
from cope_local.gguf_file import read_header


@pytest.fixture(scope="module")
def lora_for_q4(convert_smol, default_model, convert_dir):
    from convert.adapter import export_adapter

    return export_adapter(convert_smol.lora_dir, default_model, convert_dir / "check-lora.gguf",
                          summary={"task": "abstract", "examples": 5, "steps": 2}).path


def test_describes_the_default_base(default_model):
    info = describe(default_model)
    assert info["kind"] == "model" and info["architecture"] == "llama"
    assert info["tokenizer"] == "gpt2" and info["pre_tokenizer"] == "smollm"
    assert info["add_bos"] is False and info["chat_template"] is True
    assert info["layers"] == 30 and info["parameters"] > 130_000_000
    assert set(info["types"]) == {"Q4_1", "Q8_0"}
    text = render(info)
    assert "gpt2/smollm" in text and len(text.splitlines()) < 25


def test_adapter_fits_its_base_and_llama_cpp_loads_it(lora_for_q4, default_model):
    info = describe(lora_for_q4, default_model, load=True)
    assert info["kind"] == "adapter" and info["rank"] == [8] and info["alpha"] == 16.0
    assert set(info["targets"]) == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    assert info["fit"]["ok"] and info["fit"]["binding"] == "match"
    assert "loads" in info["fit"]["llama_cpp"]
    text = render(info)
    assert "task=abstract" in text and "FITS" in text and "made for" in text


def test_mismatches_are_explained(lora_for_q4, default_model, convert_tiny, convert_dir):
    from convert.adapter import export_adapter

    tiny = convert_tiny("gemma3")
    gemma_lora = export_adapter(tiny.lora_dir, tiny.gguf, convert_dir / "check-gemma-lora.gguf").path
    info = describe(gemma_lora, default_model)
    assert not info["fit"]["ok"] and "'gemma3'" in info["fit"]["reason"]
    modified = convert_dir / "check-modified.gguf"
    shutil.copyfile(default_model, modified)
    t = read_header(modified).tensors["blk.0.attn_v.weight"]
    with open(modified, "r+b") as f:
        f.seek(t.offset + 10)
        f.write(bytes(32))
    info = describe(lora_for_q4, modified)
    assert not info["fit"]["ok"] and "another model" in info["fit"]["reason"]
    assert "DOES NOT FIT" in render(info)
    # a base against a base: same lineage or not
    assert not describe(modified, default_model)["fit"]["ok"]


def test_cli_exit_codes_and_json(lora_for_q4, default_model, convert_tiny, tmp_path, capsys):
    assert main(["convert", "check", str(lora_for_q4), "--base", str(default_model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fit"]["ok"] is True
    gemma_base = convert_tiny("gemma3").gguf
    assert main(["convert", "check", str(lora_for_q4), "--base", str(gemma_base)]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\x00" * 64)
    assert main(["convert", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cope: error:") and str(bad) in err and "\n" not in err
