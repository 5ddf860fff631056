"""Training: history -> pairs -> LoRA SFT (OPPU) -> negatives -> DPO -> GGUF adapter.

Modules import torch/transformers/peft inside their functions, so importing
this package (e.g. for TrainConfig) stays cheap; the drafting path never
imports it at all. Entry point: `cope_local.train.pipeline.run_pipeline`.
"""
