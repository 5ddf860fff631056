"""Export time and file size of `convert` on the default model.

    python bench/convert.py [--reps 3] [--skip-torch]

Measures (medians over repetitions, files written to a temp folder):
  base f32/f16/q8_0 : GGUF -> GGUF re-encoding, torch-free (dequantize with gguf.quants)
  fingerprint       : base fingerprint uncached (full content hash) and cached
  load_hf_model     : GGUF -> transformers (dequantized), once
  base from folder  : transformers folder -> F32 GGUF (tokenizer verified by llama.cpp)
  adapter           : peft LoRA r8 on q/k/v/o/gate/up/down -> GGUF LoRA (F32)
  merge             : GGUF base + the LoRA -> merged F32 GGUF
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, reps: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each cheap export (median reported)")
    ap.add_argument("--skip-torch", action="store_true", help="only the torch-free measurements")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="cope-bench-convert-") as tmp:
        tmp = Path(tmp)
        os.environ["COPE_HOME"] = str(tmp / "home")  # fingerprint cache in the temp folder
        from convert.base import export_base
        from cope_local import binding
        from cope_local.models import resolve_model

        base = resolve_model()
        res: dict = {"model": base.name, "model_bytes": base.stat().st_size, "cpu": platform.processor() or platform.machine(),
                     "cores": os.cpu_count()}
        sec, _ = timed(lambda: binding._compute(base), args.reps)
        res["fingerprint_s"] = round(sec, 3)
        binding.base_fingerprint(base)
        sec, _ = timed(lambda: binding.base_fingerprint(base), args.reps)
        res["fingerprint_cached_s"] = round(sec, 5)
        for outtype in ("f32", "f16", "q8_0"):
            sec, r = timed(lambda outtype=outtype: export_base(base, tmp / f"base-{outtype}.gguf", outtype=outtype), args.reps)
            res[f"base_{outtype}_s"] = round(sec, 2)
            res[f"base_{outtype}_bytes"] = r.bytes
            print(f"base {outtype:5s}: {sec:6.2f} s  {r.bytes / 1e6:7.1f} MB", file=sys.stderr)
        sec, _ = timed(lambda: binding._compute(tmp / "base-f32.gguf"), 1)
        res["fingerprint_f32_s"] = round(sec, 3)
        print(f"fingerprint: {res['fingerprint_s'] * 1000:.0f} ms ({res['model_bytes'] / 1e6:.0f} MB), "
              f"{res['fingerprint_f32_s'] * 1000:.0f} ms (F32), cached {res['fingerprint_cached_s'] * 1000:.2f} ms", file=sys.stderr)

        if not args.skip_torch:
            import torch
            from peft import LoraConfig, get_peft_model

            from convert.adapter import export_adapter
            from convert.torch_load import load_hf_model

            sec, (model, tok) = timed(lambda: load_hf_model(base), 1)
            res["load_hf_model_s"] = round(sec, 2)
            folder = tmp / "hf"
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            sec, r = timed(lambda: export_base(folder, tmp / "from-hf.gguf"), 1)
            res["base_from_folder_s"] = round(sec, 2)
            torch.manual_seed(0)
            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
            with torch.no_grad():
                for name, p in pm.named_parameters():
                    if "lora_" in name:
                        p.normal_(0.0, 0.02)
            pm.save_pretrained(tmp / "lora")
            sec, r = timed(lambda: export_adapter(tmp / "lora", base, tmp / "lora.gguf"), args.reps)
            res["adapter_s"] = round(sec, 3)
            res["adapter_bytes"] = r.bytes
            sec, r = timed(lambda: export_base(base, tmp / "merged.gguf", merge_adapter=tmp / "lora"), 1)
            res["merge_f32_s"] = round(sec, 2)
            print(f"load_hf_model {res['load_hf_model_s']} s, base from folder {res['base_from_folder_s']} s, "
                  f"adapter {res['adapter_s']} s ({res['adapter_bytes'] / 1e6:.1f} MB), merge {res['merge_f32_s']} s", file=sys.stderr)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
