"""Tokenizer metadata for a GGUF written from a transformers folder, and its proof.

The GGUF must tokenize exactly as transformers does, or every prompt the
adapter was trained on arrives as other ids. Two tokenizer families matter:
byte-level BPE (SmolLM2, Llama 3, Qwen2: tokenizer model `gpt2`, with the
pre-tokenizer named by hashing how it splits a probe text, as llama.cpp's
converter does) and SentencePiece-style BPE with byte fallback (Gemma, Llama 2,
Mistral v0.1: tokenizer model `llama`, with scores). After writing, the file is
loaded vocab-only by llama.cpp and must give the same ids as transformers on
unicode, emoji, code and chat-template strings; otherwise nothing is written.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

from convert.llama_probe import llama_tokenize
from cope_local.errors import CopeError

# llama.cpp's probe text for BPE pre-tokenizers (convert_hf_to_gguf.py, get_vocab_base_pre)
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
# sha256(str(ids)) of CHKTXT -> llama.cpp pre-tokenizer name (the families we support)
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-style
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}

PROBES = [
    "Hello world",
    " leading space, trailing space ",
    "Ünïcödé: naïve café, Привет мир, 日本語のテキスト, 한국어, עברית",
    "emoji 🚀🦙😶\u200d🌫️ ✅ 👩‍👩‍👧‍👦",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\tif x >= 10_000: pass\r\n",
    "numbers 3 33 333 3333 1.5e-3 0x1F",
    "   multiple    spaces\n\n\nnewlines",
]


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise CopeError(f"{folder}: tokenizer unreadable ({type(exc).__name__}: {exc}); the folder needs tokenizer.json and tokenizer_config.json") from None


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<unused") and text.endswith(">")) \
        or text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


def is_byte_level(folder: Path) -> bool:
    tj_path = folder / "tokenizer.json"
    if (folder / "tokenizer.model").exists() or not tj_path.exists():
        return False
    model = json.loads(tj_path.read_text(encoding="utf-8")).get("model", {})
    return model.get("type") == "BPE" and not model.get("byte_fallback")


def probe_hash(tok) -> str:
    return sha256(str(tok.encode(CHKTXT)).encode()).hexdigest()


def find_pre(tok, folder: Path, write_probe_file) -> str:
    """The llama.cpp pre-tokenizer for a byte-level BPE tokenizer.

    Known probe hashes map directly. Otherwise each known pre-tokenizer is tried
    on a vocab-only GGUF (`write_probe_file(pre) -> path`) and kept only if
    llama.cpp then splits the probe text and all probes exactly as transformers.
    """
    pre = KNOWN_PRE.get(probe_hash(tok))
    if pre is not None:
        return pre
    texts = [CHKTXT] + probe_texts(tok)
    want = [list(tok(t)["input_ids"]) for t in texts]
    for cand in dict.fromkeys(KNOWN_PRE.values()):
        path = write_probe_file(cand)
        try:
            if llama_tokenize(path, texts, add_special=True) == want:
                return cand
        finally:
            path.unlink(missing_ok=True)
    raise CopeError(f"{folder}: unknown BPE pre-tokenizer (probe hash {probe_hash(tok)[:16]}) and none of llama.cpp's "
                    f"{', '.join(dict.fromkeys(KNOWN_PRE.values()))} splits text the same way; export from the model's original GGUF instead")


def _spm_from_bpe_json(tj: dict) -> tuple[list, list, list]:
    """SentencePiece-style vocab (tokens, scores, types) from a byte-fallback BPE tokenizer.json.

    llama.cpp's SPM tokenizer merges the adjacent pair whose merged token has the highest
    score; BPE merges by rank. Scoring each token -(rank of the merge that makes it) gives the
    same order (gguf's LlamaHfVocab scores everything -1000, which ties every merge).
    """
    import gguf

    model = tj["model"]
    vocab = model["vocab"]
    rank = {}
    for i, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, i)
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    vocab_ids = set(vocab.values())
    n = max(list(vocab.values()) + list(added)) + 1
    tokens, scores, types = [b""] * n, [0.0] * n, [gguf.TokenType.UNUSED] * n
    unk = model.get("unk_token")
    for text, i in vocab.items():
        tokens[i] = text.encode("utf-8")
        scores[i] = -float(rank[text] + 1) if text in rank else 0.0
        if text == unk:
            types[i] = gguf.TokenType.UNKNOWN
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
    for i, t in added.items():
        tokens[i] = t["content"].encode("utf-8")
        scores[i] = -1000.0 if i not in vocab_ids else scores[i]
        types[i] = gguf.TokenType.CONTROL if t.get("special") or _looks_special(t["content"]) else gguf.TokenType.USER_DEFINED
    for i in range(n):
        if not tokens[i]:
            tokens[i] = f"[PAD{i}]".encode()
    return tokens, scores, types


def write_vocab(w, folder: Path, arch: str, vocab_size: int, pre: str | None = None, tok=None) -> dict:
    """Add the tokenizer.* keys for the model in `folder`; return {'tokenizer': tok, 'kind': ...} for verification."""
    import gguf

    tok = tok if tok is not None else load_tokenizer(folder)
    tj_path = folder / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.exists() else {}
    model = tj.get("model", {})
    byte_fallback = bool(model.get("byte_fallback")) or (folder / "tokenizer.model").exists()
    if model.get("type") not in ("BPE", None) and not (folder / "tokenizer.model").exists():
        raise CopeError(f"{folder}: tokenizer type {model.get('type')!r} is not supported (need BPE or SentencePiece); export from the original GGUF instead")
    special = gguf.SpecialVocab(folder, load_merges=not byte_fallback, n_vocab=vocab_size)
    if byte_fallback:
        kind = "llama"
        if (folder / "tokenizer.model").exists():
            tokens, scores, types = [], [], []
            for text, score, ttype in gguf.SentencePieceVocab(folder).all_tokens():
                tokens.append(text)
                scores.append(score)
                types.append(ttype)
        else:
            tokens, scores, types = _spm_from_bpe_json(tj)
        present = set(tokens)
        missing = [i for i in range(256) if f"<0x{i:02X}>".encode() not in present]
        if missing:  # llama.cpp's SPM loader aborts the process (uncaught C++ exception) without them
            raise CopeError(f"{folder}: SentencePiece-style tokenizer lacks byte tokens such as <0x{missing[0]:02X}>, which llama.cpp "
                            f"needs; export from the model's original GGUF instead (or pass --tokenizer-from BASE.gguf)")
        if len(tokens) > vocab_size:
            raise CopeError(f"{folder}: tokenizer has {len(tokens)} tokens but the model only {vocab_size}; the folder mixes two models")
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        if arch == "gemma3":
            w.add_add_space_prefix(False)
    else:
        kind = "gpt2"
        pre = pre or KNOWN_PRE.get(probe_hash(tok))
        if pre is None:
            raise CopeError(f"{folder}: unknown BPE pre-tokenizer (probe hash {probe_hash(tok)[:16]}); export from the model's original GGUF instead")
        vocab = tok.get_vocab()
        if max(vocab.values()) >= vocab_size:
            raise CopeError(f"{folder}: tokenizer ids go up to {max(vocab.values())} but the model has {vocab_size} rows; the folder mixes two models")
        reverse = {i: t for t, i in vocab.items()}
        added = tok.get_added_vocab()
        added_decoder = tok.added_tokens_decoder
        tokens, types = [], []
        for i in range(vocab_size):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
                continue
            text = reverse[i]
            if text in added:
                entry = added_decoder.get(i)
                if entry is not None and not entry.normalized:  # llama.cpp expects pre-normalized added tokens
                    text = tok.decode(tok.encode(text, add_special_tokens=False))
                if (entry is not None and entry.special) or _looks_special(text):
                    types.append(gguf.TokenType.CONTROL)
                else:
                    types.append(gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
            tokens.append(text)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
    # add_bos / add_eos: what the tokenizer actually does, not what a config claims
    ids = tok("a")["input_ids"]
    special.add_special_token["bos"] = bool(tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id)
    special.add_special_token["eos"] = bool(tok.eos_token_id is not None and len(ids) > 1 and ids[-1] == tok.eos_token_id)
    special.add_to_gguf(w, quiet=True)
    return {"tokenizer": tok, "kind": kind}


def probe_texts(tok) -> list[str]:
    texts = list(PROBES)
    if getattr(tok, "chat_template", None):
        try:
            texts.append(tok.apply_chat_template(
                [{"role": "user", "content": "Write a haiku about 🦙 and naïve code."},
                 {"role": "assistant", "content": "Sure:\n```py\nprint('hi')\n```"}],
                tokenize=False))
        except Exception:  # templates that demand a system turn etc.: the plain probes still run
            pass
    return texts


def verify_tokenizer(gguf_path: Path, tok, source: Path) -> None:
    """Raise CopeError unless llama.cpp tokenizes the probes exactly as transformers does."""
    texts = probe_texts(tok)
    mine = llama_tokenize(gguf_path, texts, add_special=True)
    for text, ids in zip(texts, mine):
        ref = tok(text)["input_ids"]
        if list(ref) != ids:
            raise CopeError(f"{source}: the written GGUF tokenizes {text[:30]!r}... differently from transformers "
                            f"({ids[:8]}... vs {list(ref)[:8]}...); nothing was written, export from the model's original GGUF instead")
