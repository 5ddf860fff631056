"""Shared fixtures: the real default model, small adapters, and no network.

Session-scoped fixtures are prefixed by the area that owns them
(`decode_`, `convert_`, ...). Everything is seeded.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest

from cope_local.models import resolve_model


@pytest.fixture(scope="session")
def default_model() -> Path:
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session", autouse=True)
def _session_home(tmp_path_factory):
    """COPE_HOME for session fixtures, which run before the per-test home below exists."""
    mp = pytest.MonkeyPatch()
    mp.setenv("COPE_HOME", str(tmp_path_factory.mktemp("session-home")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own COPE_HOME: nothing touches the real user data."""
    monkeypatch.setenv("COPE_HOME", str(tmp_path / "cope-home"))


@contextlib.contextmanager
def blocked_network():
    """Inside: any attempt to open a network connection fails (usable in fixtures of any scope)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    mp = pytest.MonkeyPatch()
    for obj, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection"), (socket, "getaddrinfo")):
        mp.setattr(obj, name, refuse)
    try:
        yield
    finally:
        mp.undo()


@pytest.fixture
def no_network():
    """Any attempt to open a network connection fails the test."""
    with blocked_network():
        yield


# --- convert_ : shared by tests/test_convert_*.py and tests/test_binding.py --------------------

CONVERT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "def add(a, b):\n    return a + b  # 🚀 code",
    "Émilie a écrit un poème: naïve café, Привет, 日本語",
]
CONVERT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def convert_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="session")
def convert_f32(convert_dir, default_model) -> Path:
    """The default model re-encoded to F32 by the torch-free GGUF path (exactness checks need F32)."""
    from convert.base import export_base

    return export_base(default_model, convert_dir / "smollm2-f32.gguf", outtype="f32").path


@pytest.fixture(scope="session")
def convert_llama_logprobs():
    """fn(model_path, token_lists, adapter=None, flash=False) -> [(n_tokens, n_vocab) log-probs] from llama.cpp.

    Low-level API, one batch per prompt, 1 thread (on 2 busy cores llama.cpp's spinning thread
    barrier made 2 threads ~25x slower, measured), F32 KV cache. Flash attention is off by
    default for the exactness checks: llama.cpp's CPU flash-attention kernel alone moves
    log-probs by up to ~0.025 nats against an exact F32 reference (measured), which
    would mask a conversion error of that size.
    """
    import ctypes

    import llama_cpp as L
    import numpy as np

    from convert.llama_probe import captured_llama_log

    def run(model_path, token_lists, adapter=None, flash=False, threads=1):
        with captured_llama_log() as log:
            L.llama_backend_init()
            model = L.llama_model_load_from_file(str(model_path).encode(), L.llama_model_default_params())
            if not model:
                raise AssertionError(f"llama.cpp could not load {model_path}: {log[-3:]}")
            lora = None
            try:
                if adapter is not None:
                    lora = L.llama_adapter_lora_init(model, str(adapter).encode())
                    if not lora:
                        raise AssertionError(f"llama.cpp could not load adapter {adapter}: {log[-3:]}")
                n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
                out = []
                for toks in token_lists:
                    cp = L.llama_context_default_params()
                    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(64, len(toks) + 8)
                    cp.n_threads = cp.n_threads_batch = threads
                    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
                    cp.type_k = cp.type_v = 0  # GGML_TYPE_F32: no f16 rounding in the KV cache
                    ctx = L.llama_init_from_model(model, cp)
                    if not ctx:
                        raise AssertionError(f"llama.cpp could not create a context: {log[-3:]}")
                    batch = L.llama_batch_init(len(toks), 0, 1)
                    try:
                        if lora is not None:
                            arr = (L.llama_adapter_lora_p_ctypes * 1)(lora)
                            scales = (ctypes.c_float * 1)(1.0)
                            assert L.llama_set_adapters_lora(ctx, arr, 1, scales) == 0
                        # one batch with logits at every position (llama_batch_get_one would give only the
                        # last); on F32 weights this equals token-by-token decoding to ~4e-5
                        for i, t in enumerate(toks):
                            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
                            batch.seq_id[i][0] = 0
                        batch.n_tokens = len(toks)
                        assert L.llama_decode(ctx, batch) == 0
                        rows = []
                        for i in range(len(toks)):
                            ptr = L.llama_get_logits_ith(ctx, i)
                            if not ptr:
                                raise AssertionError("llama.cpp returned no logits")
                            rows.append(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float64))
                    finally:
                        L.llama_batch_free(batch)
                        L.llama_free(ctx)
                    x = np.stack(rows)
                    x = x - x.max(-1, keepdims=True)
                    out.append(x - np.log(np.exp(x).sum(-1, keepdims=True)))
                return out
            finally:
                if lora:
                    L.llama_adapter_lora_free(lora)
                L.llama_model_free(model)

    return run


def _convert_torch_logprobs(model, token_lists):
    """[(n_tokens, n_vocab) float64 log-probs] from a transformers model."""
    import torch

    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy() for ids in token_lists]


@pytest.fixture(scope="session")
def convert_smol(convert_dir, default_model):
    """The default model in transformers (dequantized), saved as a folder, plus a random LoRA.

    Returns a namespace: model, tok, ids (CONVERT_PROMPTS), base_ref (log-probs), hf_dir,
    lora_dir (peft, random non-zero A and B on q/k/v/o/gate/up/down), lora_ref.
    The model is left without the LoRA.
    """
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model

    from convert.torch_load import load_hf_model

    with blocked_network():
        model, tok = load_hf_model(default_model)
    ids = [tok(p)["input_ids"] for p in CONVERT_PROMPTS]
    base_ref = _convert_torch_logprobs(model, ids)
    hf_dir = convert_dir / "smollm2-hf"
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    torch.manual_seed(1234)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=CONVERT_LORA_TARGETS))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0.0, 0.03)
    lora_ref = _convert_torch_logprobs(peft_model, ids)
    lora_dir = convert_dir / "smollm2-lora"
    peft_model.save_pretrained(lora_dir)
    model = peft_model.unload()  # back to the plain base for other tests
    model.eval()
    return SimpleNamespace(model=model, tok=tok, ids=ids, base_ref=base_ref, hf_dir=hf_dir,
                           lora_dir=lora_dir, lora_ref=lora_ref)


@pytest.fixture(scope="session")
def convert_tiny(convert_dir, convert_smol):
    """fn(arch) -> namespace(folder, gguf, model, ref, lora_dir, lora_ref): a tiny random transformers
    model (gemma3 / qwen2 / llama with llama3 rope) using SmolLM2's tokenizer, exported to F32 GGUF.

    Random weights, no download: they prove the per-architecture conventions (Gemma norm +1,
    embedding scale, sliding window, Qwen2 biases, llama3 rope factors, GQA permutation).
    """
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from convert.base import export_base

    cache = {}

    def make(arch: str):
        if arch in cache:
            return cache[arch]
        common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        if arch == "gemma3":
            cls, cfg = Gemma3ForCausalLM, Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, sliding_window=128, **common)
        elif arch == "qwen2":
            cls, cfg = Qwen2ForCausalLM, Qwen2Config(tie_word_embeddings=True, **common)
        else:
            rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
            cls, cfg = LlamaForCausalLM, LlamaConfig(tie_word_embeddings=False, rope_scaling=rope, **common)
        torch.manual_seed(7)
        model = cls(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.3)  # non-trivial norms: a missing Gemma +1 shows
        folder = convert_dir / f"tiny-{arch}"
        model.save_pretrained(folder)
        convert_smol.tok.save_pretrained(folder)
        gguf_path = export_base(folder, convert_dir / f"tiny-{arch}.gguf").path
        ref = _convert_torch_logprobs(model, convert_smol.ids)
        torch.manual_seed(8)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=CONVERT_LORA_TARGETS))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.normal_(0.0, 0.2)
        lora_ref = _convert_torch_logprobs(peft_model, convert_smol.ids)
        lora_dir = convert_dir / f"tiny-{arch}-lora"
        peft_model.save_pretrained(lora_dir)
        cache[arch] = SimpleNamespace(folder=folder, gguf=gguf_path, model=peft_model.unload(), ref=ref,
                                      lora_dir=lora_dir, lora_ref=lora_ref)
        return cache[arch]

    return make


# --- train_ : shared by tests/test_train_negatives.py and tests/test_train_dpo.py --------------

TRAIN_TINY_HISTORY = [  # (topic, what the invented user wrote): short, lowercase, hashtag-y
    ("the morning bus", "bus late AGAIN. standing in the rain like a sad heron. #commute"),
    ("a new cafe", "new cafe on elm st. flat white = perfect. barista = grumpy. 8/10 #coffee"),
    ("weekend plans", "weekend plan: nothing. maybe soup. #lazy"),
    ("a book you finished", "finished the lighthouse book at 2am. cried twice. #books"),
    ("your cat", "cat knocked my tea off the desk. eye contact the whole time. #catlife"),
    ("running", "first 5k in months. legs = jelly. heart = happy. #running"),
]


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory, pytestconfig):
    """COPE_HOME and COPE_CACHE for train_ session fixtures. The cache is the one tests/test_train_*.py share
    (pytest's cache folder): the dequantized base is built once (~15-40 s), then loads in ~1 s."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("train-home")
    mp.setenv("COPE_HOME", str(root))
    mp.setenv("COPE_CACHE", str(pytestconfig.cache.mkdir("cope-train-cache")))
    yield root
    mp.undo()


@pytest.fixture(scope="session")
def train_tiny_pairs(train_cache, default_model, tmp_path_factory) -> Path:
    """A pairs.jsonl of TRAIN_TINY_HISTORY: rows as data.py writes them, two of them without ids
    (id, messages, target only), so both ways of reading a pair are used."""
    import json

    from cope_local.train.data import ChatEncoder

    enc = ChatEncoder(default_model)
    path = tmp_path_factory.mktemp("train-pairs") / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, (topic, text) in enumerate(TRAIN_TINY_HISTORY):
            row = enc.example(f"t{i}", [{"role": "user", "content": f"Write a short post about {topic}."}], text,
                              384, 256).to_dict()
            if i >= len(TRAIN_TINY_HISTORY) - 2:
                row = {k: row[k] for k in ("id", "messages", "target")}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def train_random_user(train_cache, default_model, tmp_path_factory):
    """A random-init user LoRA (r8 q/v, B scaled so user and amateur differ by ~0.05 nats/token on average):
    namespace(peft = peft folder, gguf = the same adapter exported by convert.adapter.export_adapter)."""
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model

    from convert.adapter import export_adapter
    from cope_local.train.hf import load_base

    folder = tmp_path_factory.mktemp("train-user")
    model, _tok = load_base(default_model)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    peft_model.save_pretrained(folder / "peft")
    gguf = export_adapter(folder / "peft", default_model, folder / "user.gguf").path
    return SimpleNamespace(peft=folder / "peft", gguf=gguf)


def train_tiny_cfg(**overrides):
    """Small, fast settings for the negatives/DPO tests (K=3 as the paper, short candidates)."""
    from dataclasses import replace

    from cope_local.train.config import TrainConfig

    return replace(TrainConfig(), neg_max_tokens=12, **overrides)


@pytest.fixture(scope="session")
def train_tiny_negatives(train_cache, default_model, train_tiny_pairs, train_random_user, tmp_path_factory) -> Path:
    """negatives.jsonl for train_tiny_pairs from train_random_user, made by one uninterrupted run."""
    from cope_local.train.negatives import run_negatives

    out = tmp_path_factory.mktemp("train-neg") / "negatives.jsonl"
    return run_negatives(train_tiny_pairs, default_model, train_random_user.gguf, out, train_tiny_cfg())
