"""Decoding speed and memory of CoPe on llama.cpp, side by side in one run.

    python bench/decode.py [--reps 5] [--skip-transformers]

Measures, on the default model with a LoRA adapter (r8, q/v):
  user greedy   : one context with the adapter (what CoPe is compared against)
  cope naive    : expert + amateur evaluated every step (the reference rule)
  cope          : the lazy-amateur fast path (the product's decoder)
  transformers  : the same CoPe rule with two transformers models (+peft), as
                  the paper's code does
100-token prompt, 128 new tokens (EOS ignored so every run is the same length),
medians over repetitions interleaved so noise hits all decoders alike.
Peak RSS is measured in fresh subprocesses (one per decoder). The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = (
    "Dear Sam, thank you for the long letter about the harbour, the boats and the storm that kept you "
    "ashore for a week. I read it twice on the train. The garden here is finally green again, the tomatoes "
    "are climbing the fence, and the cat has decided that the greenhouse is her summer house. Work has been "
    "slow but pleasant: we finished the library project in May and the new one starts after the holidays. "
    "Tell me more about your plans for the autumn and whether you still want to sail north with your brother. "
    "Write back soon and give my best to everyone at the yard."
)


def prompt_ids(dec, n_tokens: int) -> list[int]:
    ids = dec.prompt_ids(f"Reply to this letter in your own words.\n\n{TEXT} {TEXT}")
    if len(ids) < n_tokens:
        raise SystemExit(f"bench prompt too short: {len(ids)} tokens")
    return ids[:n_tokens]


def make_adapter(base: Path, folder: Path) -> Path:
    from convert.synthetic import write_random_lora

    return write_random_lora(base, folder / "bench-lora.gguf", rank=8, alpha=8, targets=("attn_q", "attn_v"), std=0.05, seed=0)


def rss_probe(mode: str, base: str, adapter: str, n_prompt: int, n_new: int) -> None:
    """Runs in a subprocess: load, generate once, print peak RSS in MB."""
    from cope_local.decode import Decoder, GenConfig

    with Decoder(base, adapter) as dec:
        dec.generate(prompt_ids(dec, n_prompt), GenConfig(mode=mode, max_tokens=n_new, ignore_eos=True))
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's peak
    with open("/proc/self/status") as f:
        hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(hwm_kb / 1024)


def transformers_cope(base: Path, ids: list[int], n_new: int, alpha: float, tau: float, threads: int) -> float:
    """The paper's approach: two full models, both stepping every token. -> seconds."""
    import math

    import torch
    from peft import LoraConfig, get_peft_model

    from convert.torch_load import load_hf_model

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    amateur, _ = load_hf_model(base)
    expert, _ = load_hf_model(base)
    expert = get_peft_model(expert, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    amateur.eval(); expert.eval()
    with torch.inference_mode():
        t0 = time.perf_counter()
        x = torch.tensor([ids])
        out_u = expert(input_ids=x, use_cache=True)
        out_a = amateur(input_ids=x, use_cache=True)
        for _ in range(n_new):
            lu = torch.log_softmax(out_u.logits[0, -1].float(), -1)
            la = torch.log_softmax(out_a.logits[0, -1].float(), -1)
            head = lu >= lu.max() + math.log(tau)
            score = torch.where(head, lu - alpha * la, torch.tensor(-math.inf))
            tok = torch.tensor([[int(score.argmax())]])
            out_u = expert(input_ids=tok, past_key_values=out_u.past_key_values, use_cache=True)
            out_a = amateur(input_ids=tok, past_key_values=out_a.past_key_values, use_cache=True)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapter", default=None, help="user adapter .gguf (default: a random r8 q/v LoRA)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--transformers-reps", type=int, default=1)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--rss-probe", choices=("user", "cope"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    from cope_local.decode import Decoder, GenConfig
    from cope_local.models import resolve_model

    base = resolve_model(args.model)
    if args.rss_probe:
        return rss_probe(args.rss_probe, str(base), args.adapter, args.prompt_tokens, args.new_tokens)

    tmp = Path(tempfile.mkdtemp(prefix="cope-bench-"))
    adapter = Path(args.adapter) if args.adapter else make_adapter(base, tmp)
    n_new = args.new_tokens
    # peak RSS first, in fresh processes, before this one loads anything big
    rss = {}
    for mode in ("user", "cope"):
        cmd = [sys.executable, __file__, "--rss-probe", mode, "--adapter", str(adapter), "--prompt-tokens",
               str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)] + (["--model", args.model] if args.model else [])
        rss[mode] = float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(f"peak RSS: user {rss['user']:.0f} MB, cope {rss['cope']:.0f} MB")
    configs = {
        "user_greedy": GenConfig(mode="user", max_tokens=n_new, ignore_eos=True),
        "cope_naive": GenConfig(mode="cope", alpha=args.alpha, tau=args.tau, max_tokens=n_new, ignore_eos=True, lazy_amateur=False),
        "cope": GenConfig(mode="cope", alpha=args.alpha, tau=args.tau, max_tokens=n_new, ignore_eos=True),
    }
    times = {k: [] for k in configs}
    cpu_times = {k: [] for k in configs}  # process CPU time: steadier than wall time on a busy machine
    from cope_local.decode.llama import default_threads

    with Decoder(base, adapter, threads=default_threads()) as dec:  # fixed for the whole run: comparable reps
        ids = prompt_ids(dec, args.prompt_tokens)
        for cfg in configs.values():  # warm-up: page in weights, build graphs
            dec.generate(ids, cfg)
        results = {}
        for _ in range(args.reps):
            for name, cfg in configs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                results[name] = dec.generate(ids, cfg)
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
        threads_used = dec.context("expert").threads
        # the floor of the amateur's cost: every token must enter its KV cache, at best as one prompt-style batch
        amateur = dec.context("amateur", len(ids) + n_new)
        prefill = []
        for _ in range(args.reps):
            amateur.reset()
            t0 = time.perf_counter()
            amateur.decode(ids + results["cope"].tokens, (len(ids) + n_new - 1,))
            prefill.append((time.perf_counter() - t0) / (len(ids) + n_new))
    tok_s = {k: n_new / statistics.median(v) for k, v in times.items()}
    lazy, naive = results["cope"], results["cope_naive"]
    head1 = sum(1 for h in lazy.head_sizes if h == 1) / len(lazy.head_sizes)
    for name in configs:
        print(f"{name:14} {tok_s[name]:7.1f} tok/s  (median of {args.reps}: {[round(t, 3) for t in times[name]]})")
    print(f"|V_head|=1 at {head1:.0%} of steps; amateur decodes per token: {lazy.amateur_evals / n_new:.2f}; "
          f"lazy tokens == naive tokens: {lazy.tokens == naive.tokens}")

    # an upper bound for any decoder that gives the lockstep tokens: the one-context time plus the amateur
    # seeing all prompt + new tokens at batched speed (on this CPU a batched token costs ~half a single step)
    t_user = statistics.median(times["user_greedy"])
    t_floor = statistics.median(prefill) * (len(ids) + n_new)
    bound = t_user / (t_user + t_floor)
    print(f"amateur floor: {1000 * statistics.median(prefill):.2f} ms/token batched vs {1000 * t_user / n_new:.2f} ms per "
          f"one-context token -> cope_vs_user_greedy can be at most {bound:.2f} with exact lockstep tokens")
    out = {
        "cope_vs_user_greedy": round(tok_s["cope"] / tok_s["user_greedy"], 3),
        "cope_vs_user_greedy_bound": round(bound, 3),
        "cope_naive_vs_user_greedy": round(tok_s["cope_naive"] / tok_s["user_greedy"], 3),
        "cope_vs_user_greedy_cpu_time": round(statistics.median(cpu_times["user_greedy"]) / statistics.median(cpu_times["cope"]), 3),
    }
    if not args.skip_transformers:
        t_hf = [transformers_cope(base, ids, n_new, args.alpha, args.tau, threads_used) for _ in range(args.transformers_reps)]
        tok_s["transformers_cope"] = n_new / statistics.median(t_hf)
        print(f"{'transformers':14} {tok_s['transformers_cope']:7.1f} tok/s  (two models + peft, the paper's approach)")
        out["cope_vs_transformers"] = round(tok_s["cope"] / tok_s["transformers_cope"], 2)

    out["rss_ratio"] = round(rss["cope"] / rss["user"], 3)
    out.update({
        "tok_s": {k: round(v, 1) for k, v in tok_s.items()},
        "peak_rss_mb": {k: round(v) for k, v in rss.items()},
        "head1_fraction": round(head1, 3),
        "amateur_evals_per_token": round(lazy.amateur_evals / n_new, 3),
        "lazy_equals_naive": lazy.tokens == naive.tokens,
        "prompt_tokens": args.prompt_tokens, "new_tokens": n_new, "reps": args.reps,
        "threads": threads_used,
        "model": base.name, "cpus": os.cpu_count(), "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
