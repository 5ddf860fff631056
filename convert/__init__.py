"""convert: the bridge from training (peft, transformers) to decoding (GGUF, llama.cpp).

    export_adapter(peft_dir, base_gguf, out, summary=...)  # peft LoRA -> GGUF LoRA bound to its base
    export_base(source, out, outtype="f32", merge_adapter=None)  # GGUF or HF folder -> GGUF base
    load_hf_model(base_gguf, dtype=torch.float32) -> (model, tokenizer)  # GGUF -> trainable transformers model
    describe(path, base=None) -> dict  # what a GGUF is and whether it fits a base

Never touches the network. Importing this package is light; torch and
transformers load only inside the functions that need them.
"""

from __future__ import annotations

__all__ = ["describe", "export_adapter", "export_base", "load_hf_model"]


def __getattr__(name: str):
    if name == "export_adapter":
        from convert.adapter import export_adapter

        return export_adapter
    if name == "export_base":
        from convert.base import export_base

        return export_base
    if name == "load_hf_model":
        from convert.torch_load import load_hf_model

        return load_hf_model
    if name == "describe":
        from convert.check import describe

        return describe
    raise AttributeError(name)
