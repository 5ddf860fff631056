"""Training examples: (prompt ids, target ids) built exactly as the decoder builds prompts.

The prompt is the task's chat messages rendered with the GGUF's own chat
template (`cope_local.decode.prompt.render_chat`) and tokenized by the HF
tokenizer loaded from the same GGUF, with BOS added once by `with_bos` when
the GGUF's add_bos flag asks for it: the ids equal `Decoder.prompt_ids` for
the same messages (tests/test_train_data.py). The target is the user's text
followed by the token the template closes an assistant turn with (SmolLM2:
<|im_end|>), so the adapter learns where to stop; loss is on target tokens
only. The target is tokenized on its own, as the decoder will generate it,
and literal control-token text in it stays plain text.

    stages/pairs.jsonl      one example per line: id, messages, prompt (text), target (text),
                            prompt_ids, target_ids, truncated
    stages/pairs.meta.json  base, fingerprint, add_bos, bos/eot ids, limits, count
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cope_local.errors import CopeError
from cope_local.paths import atomic_write_text

PAIRS_FORMAT = 1  # bump when the pairs.jsonl layout changes
_MARK = "\u2063COPE-TARGET\u2063"  # stands in for the target when finding the template's end-of-turn text


@dataclass
class Example:
    id: str  # history item id
    messages: list  # chat messages of the prompt (task template applied)
    prompt: str  # rendered prompt text (BOS not included as text when add_bos adds it as an id)
    target: str  # what the user wrote (possibly cut)
    prompt_ids: list = field(repr=False)  # token ids fed to the model, BOS included when the model wants one
    target_ids: list = field(repr=False)  # target tokens + end-of-turn id (no end-of-turn when cut)
    truncated: bool = False  # prompt or target was cut to the configured limits

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Example:
        return cls(id=str(d["id"]), messages=list(d["messages"]), prompt=str(d["prompt"]), target=str(d["target"]),
                   prompt_ids=[int(x) for x in d["prompt_ids"]], target_ids=[int(x) for x in d["target_ids"]],
                   truncated=bool(d.get("truncated", False)))


class ChatEncoder:
    """Messages -> ids the way the llama.cpp decoder makes them, with the HF tokenizer of the same GGUF."""

    def __init__(self, base_gguf: str | os.PathLike, tokenizer=None):
        from cope_local.gguf_file import read_header

        self.base = Path(base_gguf)
        hdr = read_header(self.base, what="base model")
        self.template = hdr.get("tokenizer.chat_template") or None
        if tokenizer is None:
            from cope_local.train.hf import load_tokenizer

            tokenizer = load_tokenizer(self.base)
        self.tok = tokenizer
        self.bos_id = _int(hdr.get("tokenizer.ggml.bos_token_id"), tokenizer.bos_token_id)
        self.eos_id = _int(hdr.get("tokenizer.ggml.eos_token_id"), tokenizer.eos_token_id)
        add_bos = hdr.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:  # llama.cpp's default when the key is absent: SentencePiece vocabularies add BOS
            add_bos = hdr.get("tokenizer.ggml.model") == "llama"
        self.add_bos = bool(add_bos)
        self.bos_text = self._token_text(self.bos_id)
        self.eos_text = self._token_text(self.eos_id)
        self.eot_id = self._end_of_turn_id()

    def _token_text(self, tid: int | None) -> str:
        if tid is None or tid < 0:
            return ""
        return self.tok.convert_ids_to_tokens(int(tid)) or ""

    def render(self, messages: list, add_generation_prompt: bool = True) -> str:
        from cope_local.decode.prompt import render_chat

        return render_chat(messages, self.template, bos_token=self.bos_text, eos_token=self.eos_text,
                           add_bos=self.add_bos, add_generation_prompt=add_generation_prompt)

    def encode_text(self, text: str) -> list[int]:
        """Prompt text -> ids; control tokens written in the template (<|im_start|>) are parsed, as llama.cpp does."""
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: list) -> list[int]:
        from cope_local.decode.prompt import with_bos

        return with_bos(self.encode_text(self.render(messages)), self.bos_id, self.add_bos)

    def target_ids(self, text: str) -> list[int]:
        """The user's text as plain text: a literal '<|im_end|>' in it is not a control token."""
        return list(self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def _end_of_turn_id(self) -> int:
        """The token that closes an assistant turn in this template (<|im_end|>, <end_of_turn>), else EOS."""
        if self.template:
            probe = [{"role": "user", "content": "x"}]
            head = self.render(probe)
            full = self.render(probe + [{"role": "assistant", "content": _MARK}], add_generation_prompt=False)
            if _MARK in full and full.startswith(head):
                tail = full.split(_MARK, 1)[1]
                ids = self.encode_text(tail)
                special = set(self.tok.all_special_ids) | set(self.tok.get_added_vocab().values())
                if ids and ids[0] in special:
                    return int(ids[0])
        if self.eos_id is None or self.eos_id < 0:
            raise CopeError(f"{self.base}: the model has no end-of-sequence token and no chat template; "
                            "use a chat (instruct) model")
        return int(self.eos_id)

    def example(self, item_id: str, messages: list, target: str, max_prompt: int, max_target: int) -> Example:
        ids = self.prompt_ids(messages)
        truncated = False
        if len(ids) > max_prompt:
            messages, ids = self._fit_prompt(messages, max_prompt)
            truncated = True
        tgt = self.target_ids(target)
        if len(tgt) + 1 > max_target:
            tgt = tgt[:max_target]  # no end-of-turn after a cut text: the model must not learn to stop mid-sentence
            target = self.tok.decode(tgt)
            truncated = True
        else:
            tgt = tgt + [self.eot_id]
        return Example(item_id, messages, self.render(messages), target, ids, tgt, truncated)

    def _fit_prompt(self, messages: list, max_prompt: int) -> tuple[list, list[int]]:
        """Cut the end of the last message's text until the rendered prompt fits (the template's framing stays)."""
        last = messages[-1]["content"]
        lo, hi = 0, len(last)
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            trial = messages[:-1] + [{**messages[-1], "content": last[:mid].rstrip() + " …"}]
            ids = self.prompt_ids(trial)
            if len(ids) <= max_prompt:
                best, lo = (trial, ids), mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise CopeError(f"max_prompt_tokens={max_prompt} is too small for the task's prompt template; "
                            "raise it with --set max_prompt_tokens=384")
        return best


def _int(value, fallback) -> int | None:
    if value is None:
        return None if fallback is None else int(fallback)
    return int(value)


# ---- the pairs file --------------------------------------------------------------------------

def build_examples(items, task, encoder: ChatEncoder, max_prompt: int, max_target: int) -> list[Example]:
    """History items (inputs filled by task.make_inputs) -> examples, in item order."""
    out = []
    for item in items:
        messages, target = task.training_pair(item)
        if not target.strip():
            continue
        out.append(encoder.example(item.id, messages, target, max_prompt, max_target))
    return out


def write_pairs(path: str | os.PathLike, examples: list[Example], meta: dict) -> Path:
    """pairs.jsonl (+ .meta.json beside it), both atomic and private (the texts are the user's)."""
    path = Path(path)
    atomic_write_text(meta_path(path), json.dumps({"format": PAIRS_FORMAT, "count": len(examples), **meta}, indent=1) + "\n")
    atomic_write_text(path, "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in examples))
    return path


def meta_path(pairs_path: str | os.PathLike) -> Path:
    p = Path(pairs_path)
    return p.with_name(p.stem + ".meta.json")


def read_pairs(path: str | os.PathLike) -> list[Example]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CopeError(f"{path}: no training pairs yet; run the `pairs` stage first") from None
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(Example.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                raise CopeError(f"{path}:{n}: not a training pair ({exc}); delete the file and train again") from None
    return out


def read_pairs_meta(path: str | os.PathLike) -> dict:
    try:
        return json.loads(meta_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def make_pairs(items, task, base_gguf: str | os.PathLike, out: str | os.PathLike, *, max_prompt: int,
               max_target: int, tokenizer=None) -> list[Example]:
    """The `pairs` stage body: items -> pairs.jsonl for `base_gguf`'s tokenizer and chat template."""
    from cope_local.binding import base_fingerprint

    enc = ChatEncoder(base_gguf, tokenizer)
    examples = build_examples(items, task, enc, max_prompt, max_target)
    meta = {"base": str(Path(base_gguf).resolve()), "base_fingerprint": base_fingerprint(base_gguf),
            "task": task.name, "add_bos": enc.add_bos, "bos_id": enc.bos_id, "eot_id": enc.eot_id,
            "max_prompt_tokens": max_prompt, "max_target_tokens": max_target,
            "truncated": sum(e.truncated for e in examples),
            "prompt_tokens": sum(len(e.prompt_ids) for e in examples),
            "target_tokens": sum(len(e.target_ids) for e in examples)}
    write_pairs(out, examples, meta)
    return examples


# ---- the same rules on llama.cpp's side (no torch): used by negatives.py ----------------------

def turn_end_id(model, template: str | None) -> int:
    """The id closing an assistant turn, found with llama.cpp's vocabulary (`decode.llama.Model`)."""
    from cope_local.decode.prompt import render_chat

    if template:
        probe = [{"role": "user", "content": "x"}]
        bos = model.piece(model.bos_id, special=True).decode("utf-8", "replace") if model.bos_id >= 0 else ""
        eos = model.piece(model.eos_id, special=True).decode("utf-8", "replace") if model.eos_id >= 0 else ""
        kw = {"bos_token": bos, "eos_token": eos, "add_bos": model.add_bos}
        head = render_chat(probe, template, **kw)
        full = render_chat(probe + [{"role": "assistant", "content": _MARK}], template, add_generation_prompt=False, **kw)
        if _MARK in full and full.startswith(head):
            ids = model.tokenize(full.split(_MARK, 1)[1])
            if ids and ids[0] in model.eog_ids:
                return int(ids[0])
    return int(model.eos_id)


def encode_row(row: dict, model, template: str | None, cfg) -> tuple[list[int], list[int]]:
    """(prompt_ids, target_ids) of a pairs.jsonl row: its stored ids, or (rows without ids) encoded by llama.cpp."""
    if "prompt_ids" in row and "target_ids" in row:
        return [int(x) for x in row["prompt_ids"]], [int(x) for x in row["target_ids"]]
    from cope_local.decode.prompt import render_chat, with_bos

    bos = model.piece(model.bos_id, special=True).decode("utf-8", "replace") if model.bos_id >= 0 else ""
    eos = model.piece(model.eos_id, special=True).decode("utf-8", "replace") if model.eos_id >= 0 else ""
    text = render_chat(row["messages"], template, bos_token=bos, eos_token=eos, add_bos=model.add_bos)
    prompt = with_bos(model.tokenize(text), model.bos_id, model.add_bos)
    if len(prompt) > cfg.max_prompt_tokens:
        raise CopeError(f"pair {row.get('id')!r}: prompt is {len(prompt)} tokens (max_prompt_tokens={cfg.max_prompt_tokens}); "
                        "rebuild pairs.jsonl with the `pairs` stage")
    target = model.tokenize(row["target"], special=False)
    if len(target) + 1 > cfg.max_target_tokens:
        return prompt, target[: cfg.max_target_tokens]
    return prompt, target + [turn_end_id(model, template)]
