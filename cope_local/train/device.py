"""Where and in what precision training runs, and how big each micro-batch may be.

CUDA, else Apple MPS, else CPU (`--device` overrides). GPUs train in bfloat16
where supported, else float16 with a gradient scaler, the frozen base stored in
that precision. CPUs train in float32 by default: bf16 autocast
(`precision = "bfloat16"`, only where the CPU has AVX512-BF16 or AMX) made a
SmolLM2 LoRA step 1.6x faster here (1.7 vs 2.7 s, loss equal to 3 decimals)
but not bit-reproducible across processes (oneDNN), which exact resume
after a kill needs; so it is opt-in. The LoRA weights stay float32 either way (peft
keeps adapter weights in fp32).

An optimizer step is `batch_size` examples; they are split into micro-batches
whose padded token count fits the memory left after the model is loaded, and
their gradients accumulate. Activation memory per token is estimated from the
model's shape (calibrated on CPU: SmolLM2-135M keeps ~3.2 MB per token for
LoRA training in fp32, incl. the logits of target tokens), so a 4 GB laptop
GPU gets small micro-batches instead of an out-of-memory error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cope_local.errors import CopeError

DEVICES = ("auto", "cpu", "cuda", "mps")
CPU_MAX_MICRO_TOKENS = 512  # a CPU gains no speed from bigger micro-batches; this keeps peak RAM near 2.5 GB (135M model)
MEMORY_FRACTION = 0.6  # share of the free memory (after the model is loaded) activations may take
MIN_MICRO_TOKENS = 32  # below this a step is all overhead; one example always fits alone anyway


@dataclass
class DevicePlan:
    device: str  # torch device string: "cpu", "cuda", "cuda:1", "mps"
    dtype: str  # "float32" | "bfloat16" | "float16": the autocast (matmul) dtype
    scaler: bool  # float16: scale the loss so small gradients do not underflow
    threads: int  # CPU threads torch may use (also sets the arithmetic order: keep it fixed for exact resume)
    storage: str = ""  # the frozen base's dtype when it differs from `dtype` (CPU: float32 weights, bf16 matmuls)

    @property
    def kind(self) -> str:
        return self.device.split(":")[0]

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def storage_dtype(self):
        import torch

        return getattr(torch, self.storage or self.dtype)

    def autocast(self):
        """Context for forward passes: autocast to the plan's dtype; nothing in float32."""
        import contextlib

        import torch

        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.kind, dtype=self.torch_dtype())

    def describe(self) -> str:
        extra = ", loss scaling" if self.scaler else ""
        return f"{self.device} ({self.dtype}{extra}, {self.threads} CPU threads)"


def train_threads() -> int:
    """COPE_THREADS, else the machine's cores (at most 8: more only adds sync overhead on 135M models)."""
    env = os.environ.get("COPE_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise CopeError(f"COPE_THREADS={env!r}: not a number; set it to the number of CPU threads to use") from None
    return max(1, min(os.cpu_count() or 1, 8))


def _mps_available(torch) -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def _supports_bf16(torch, device: str) -> bool:
    if device.startswith("cuda"):
        return bool(torch.cuda.is_bf16_supported())
    try:  # MPS gained bf16 with macOS 14; probe instead of guessing from versions
        (torch.ones(2, dtype=torch.bfloat16, device=device) * 2).cpu()
        return True
    except (RuntimeError, TypeError):
        return False


def cpu_has_bf16() -> bool:
    """The CPU executes bf16 dot products natively (Linux flags avx512_bf16 / amx_bf16); elsewhere False."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def choose_device(pref: str = "auto", precision: str = "auto") -> DevicePlan:
    """The device to train on; `pref` is "auto", "cpu", "cuda", "cuda:N" or "mps";
    `precision` "auto" (GPUs: bf16/fp16; CPUs: float32), "float32", or "bfloat16" (CPUs too, where fast)."""
    if precision not in ("auto", "float32", "bfloat16"):
        raise CopeError(f"precision = {precision!r}: use \"auto\", \"float32\" or \"bfloat16\"")
    import torch

    pref = (pref or "auto").strip().lower()
    threads = train_threads()
    torch.set_num_threads(threads)
    if pref == "auto":
        if torch.cuda.is_available():
            pref = "cuda"
        elif _mps_available(torch):
            pref = "mps"
        else:
            pref = "cpu"
    if pref == "cpu":
        fast = precision == "bfloat16" and cpu_has_bf16()  # opt-in: faster, not bit-reproducible
        return DevicePlan("cpu", "bfloat16" if fast else "float32", False, threads, storage="float32")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CopeError(f"--device {pref}: torch sees no CUDA GPU (this torch is {torch.__version__}); "
                            "use --device cpu, or install a CUDA build of torch")
        if ":" in pref:
            idx = pref.split(":", 1)[1]
            if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
                raise CopeError(f"--device {pref}: no such GPU; this machine has {torch.cuda.device_count()} (cuda:0...)")
    elif pref == "mps":
        if not _mps_available(torch):
            raise CopeError("--device mps: Apple Metal (MPS) is not available to torch here; use --device cpu")
    else:
        raise CopeError(f"--device {pref!r}: unknown; use one of: auto, cpu, cuda, cuda:N, mps")
    if precision == "float32":
        return DevicePlan(pref, "float32", False, threads)
    if _supports_bf16(torch, pref):
        return DevicePlan(pref, "bfloat16", False, threads)
    return DevicePlan(pref, "float16", True, threads)


# ---- memory ------------------------------------------------------------------------------------

def free_memory(plan: DevicePlan) -> int | None:
    """Bytes free for training on the plan's device right now, or None when unknown."""
    import torch

    try:
        if plan.kind == "cuda":
            free, _total = torch.cuda.mem_get_info(torch.device(plan.device))
            return int(free)
        if plan.kind == "mps":
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    except (RuntimeError, AttributeError):
        return None
    return _host_available()


def _host_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def bytes_per_token(model_config, dtype: str) -> int:
    """Activation bytes one token costs in a LoRA training step (forward kept for backward).

    Per layer ~16 hidden + 11 intermediate values per token (q/k/v/o inputs,
    norms, MLP gate/up/act/product, residuals), plus the float32 logits and
    their gradient for a target token (counted for every token: the upper bound).
    Calibrated on SmolLM2-135M on CPU (3.2 MB/token measured).
    """
    size = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    h = int(getattr(model_config, "hidden_size", 1024))
    inter = int(getattr(model_config, "intermediate_size", 4 * h))
    layers = int(getattr(model_config, "num_hidden_layers", 24))
    vocab = int(getattr(model_config, "vocab_size", 32000))
    return layers * (16 * h + 11 * inter) * size + vocab * 4 * 2


def micro_batch_tokens(plan: DevicePlan, model_config, batch_tokens: int, free_bytes: int | None = None) -> int:
    """Padded tokens per micro-batch: cfg.batch_tokens, lowered to what the free memory holds."""
    cap = int(batch_tokens)
    if plan.kind == "cpu":
        cap = min(cap, CPU_MAX_MICRO_TOKENS)
    free = free_memory(plan) if free_bytes is None else free_bytes
    if free is not None:
        cap = min(cap, int(free * MEMORY_FRACTION) // bytes_per_token(model_config, plan.dtype))
    return max(MIN_MICRO_TOKENS, cap)


def micro_batches(lengths: list[int], cap_tokens: int) -> list[list[int]]:
    """Split one optimizer batch (example lengths) into micro-batches of <= cap_tokens padded tokens.

    Longest first, greedily packed; an example longer than the cap goes alone.
    Returns lists of positions into `lengths`; deterministic for given inputs.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = max([lengths[j] for j in cur] + [lengths[i]])  # sorted: the first one is the widest
        if cur and width * (len(cur) + 1) > cap_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out
