"""What differs between the architectures we convert: names, rotary layout, norm convention.

llama.cpp stores llama-family q/k projections with their rows permuted (its
rotary kernel pairs neighbouring rows, HF pairs row i with row i + d/2). Any
tensor whose rows are q/k output features (the weight, a bias, a LoRA B) must
get the same permutation, or the model loads and silently computes garbage.
Gemma 3 stores RMSNorm weights as `w` where HF stores `w - 1`. Embedding
scaling (x * sqrt(n_embd)) is done at run time by both, so weights need none.
"""

from __future__ import annotations

from dataclasses import dataclass

from cope_local.errors import CopeError


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # general.architecture
    permute_qk: bool  # llama rotary layout: permute rows of q/k weights (and LoRA B)
    norm_shift: float  # added to every *norm.weight going HF -> GGUF (Gemma: +1)


ARCHS = {
    "llama": ArchSpec("llama", permute_qk=True, norm_shift=0.0),
    "qwen2": ArchSpec("qwen2", permute_qk=False, norm_shift=0.0),
    "gemma3": ArchSpec("gemma3", permute_qk=False, norm_shift=1.0),
}

# transformers config.model_type -> GGUF architecture
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",  # llama.cpp runs Mistral-7B-style models as llama
    "qwen2": "qwen2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",  # multimodal wrapper: its text_config is used
}

# module names whose LoRA llama.cpp cannot apply as a LoRA (or we refuse to write)
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out")
EMBEDDING_TENSORS = ("token_embd", "output")  # the same, as GGUF names


def spec_for(arch: str, path=None) -> ArchSpec:
    spec = ARCHS.get(arch)
    if spec is None:
        where = f"{path}: " if path else ""
        raise CopeError(f"{where}architecture {arch!r} is not supported (supported: {', '.join(ARCHS)}); use a llama, qwen2 or gemma3 model")
    return spec


def spec_for_hf(model_type: str, path=None) -> ArchSpec:
    arch = HF_MODEL_TYPES.get(model_type)
    if arch is None:
        raise CopeError(f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(HF_MODEL_TYPES)}); use a llama, mistral, qwen2 or gemma3 model")
    return ARCHS[arch]


def permute_rows(w, n_head: int, n_head_kv: int | None = None):
    """HF rotary layout -> llama.cpp layout, on the first axis (works on numpy and torch).

    w: (n_out, ...) with n_out = heads * head_dim; each head's rows [a0..a(d/2-1), b0..]
    become interleaved [a0, b0, a1, b1, ...].
    """
    if n_head_kv is not None and n_head_kv != n_head:
        n_head = n_head_kv
    shape = tuple(w.shape)
    if shape[0] % (2 * n_head):
        raise CopeError(f"cannot apply the rotary permutation: {shape[0]} rows are not a multiple of 2 x {n_head} heads; the base and the weights do not match")
    # (n_head, 2, d/2, ...) -> (n_head, d/2, 2, ...)
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def normalize_hf_name(name: str) -> str:
    """Strip wrappers so TensorNameMap sees plain decoder names."""
    for prefix in ("base_model.model.",):
        name = name.removeprefix(prefix)
    name = name.replace("model.language_model.", "model.").replace("language_model.model.", "model.")
    if name.startswith("language_model.lm_head"):
        name = name[len("language_model."):]
    return name


def gguf_name(arch: str, n_layers: int, hf_name: str, *, suffixes=(".weight", ".bias")) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (None when unknown)."""
    import gguf

    arch_enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_enum is None:
        return None
    name_map = _name_map(arch_enum, n_layers)
    return name_map.get_name(normalize_hf_name(hf_name), try_suffixes=suffixes)


_MAPS: dict = {}


def _name_map(arch_enum, n_layers: int):
    import gguf

    key = (arch_enum, n_layers)
    if key not in _MAPS:
        _MAPS[key] = gguf.get_tensor_name_map(arch_enum, n_layers)
    return _MAPS[key]


def head_counts(values: dict, arch: str) -> tuple[int, int]:
    """(n_head, n_head_kv) from GGUF key/values."""
    n_head = values.get(f"{arch}.attention.head_count")
    n_kv = values.get(f"{arch}.attention.head_count_kv", n_head)
    if isinstance(n_head, list) or isinstance(n_kv, list) or n_head is None:
        raise CopeError(f"per-layer head counts ({arch}.attention.head_count) are not supported")
    return int(n_head), int(n_kv)
