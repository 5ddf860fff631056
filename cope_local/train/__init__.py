"""Training: history -> pairs -> LoRA SFT (OPPU) -> negatives -> DPO -> GGUF adapter.

Modules import torch/transformers/peft inside their functions, so importing
this package (e.g. for TrainConfig) stays cheap; the drafting path never
imports it at all. Entry point: `cope_local.train.pipeline`.

OMP_WAIT_POLICY=PASSIVE (unless the user set it): torch's OpenMP threads
otherwise spin while waiting, and on a machine whose cores are busy with
anything else (a browser, a second job) a 2-thread training step took 15-19 s
instead of 4 s (measured here, SmolLM2-135M, 4 x 95 tokens, load ~4 on 2
cores). It only takes effect if torch is not imported yet, hence here.
"""

import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
