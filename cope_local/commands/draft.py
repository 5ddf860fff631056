"""`cope draft`: write in the user's voice, streamed to the terminal."""

from __future__ import annotations

import json
import sys


def add_decoding_args(p) -> None:
    """Flags shared by every command that drafts text."""
    p.add_argument("--model", default=None, help="base model name or .gguf path (default: smollm2-135m)")
    p.add_argument("--mode", choices=("cope", "user", "base"), default=None,
                   help="cope: contrast user vs amateur (default for an adapter trained with --dpo, and on lamp7); "
                        "user: the adapter alone (default for other adapters); base: no adapter")
    p.add_argument("--alpha", type=float, default=None, help="contrast strength (default: the task's)")
    p.add_argument("--tau", type=float, default=None,
                   help="head set: p_user >= tau * max p_user (default: the task's; 0.1, lamp7 0.3)")
    p.add_argument("--adapter-scale", type=float, default=1.0, metavar="S",
                   help="weight of your adapter's update in the expert: 1 as trained (default), 0.5 half, 0 the base")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens at most (default: the task's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass when sampling (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ctx", type=int, default=2048, help="context size in tokens (default 2048)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores, at most 8)")
    p.add_argument("--gpu-layers", type=int, default=None,
                   help="layers on the GPU (default: all when llama.cpp was built with Metal/CUDA, else 0)")
    p.add_argument("--force", action="store_true", help="load an adapter even if it was made for another base")


def register(sub) -> None:
    p = sub.add_parser("draft", help="draft a text in your voice (streams to the terminal)")
    p.add_argument("prompt", help="what to write or reply to; '-' reads stdin")
    p.add_argument("--task", default="free", help="task template (default: free); see `cope_local.tasks`")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--profile", help="use this profile's active adapter")
    src.add_argument("--adapter", help="a user LoRA adapter (.gguf)")
    p.add_argument("--tam", help="a task adapter (.gguf) for the amateur (default: the profile's, else none)")
    add_decoding_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(func=cmd_draft)


def resolve_sources(args):
    """-> (model, adapter, tam, task name) from --profile / --adapter / --tam / --task."""
    model, adapter, tam, task = args.model, args.adapter, args.tam, args.task
    if getattr(args, "profile", None):
        from cope_local import profile as profiles

        prof = profiles.load_profile(args.profile)
        adapter = profiles.active_adapter(prof)
        if adapter is None:
            from cope_local.errors import CopeError

            raise CopeError(f"profile {args.profile!r} has no trained adapter yet; run `cope profile train {args.profile}`")
        tam = tam or profiles.active_tam(prof)
        model = model or prof.model
        if task == "free" and prof.task:
            task = prof.task
    return model, adapter, tam, task


def gen_config(args, task):
    from cope_local.decode import GenConfig

    return GenConfig(
        mode=args.mode,
        sft_mode=task.sft_mode,
        alpha=task.default_alpha if args.alpha is None else args.alpha,
        tau=task.default_tau if args.tau is None else args.tau,
        max_tokens=task.max_new_tokens if args.max_tokens is None else args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def cmd_draft(args) -> int:
    from cope_local.decode import Decoder
    from cope_local.errors import CopeError
    from cope_local.tasks import get_task

    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text.strip():
        raise CopeError("empty prompt; pass the text to reply to or a description (or '-' with text on stdin)")
    model, adapter, tam, task_name = resolve_sources(args)
    task = get_task(task_name)
    cfg = gen_config(args, task)
    if adapter is None and cfg.mode is None:
        print("cope: no adapter given (--profile or --adapter): drafting with the base model (mode base)", file=sys.stderr)
    if not 0 <= args.adapter_scale <= 4:
        raise CopeError(f"--adapter-scale {args.adapter_scale:g}: give a weight between 0 and 4 (1 = as trained)")
    with Decoder(model, adapter, tam=tam, adapter_scale=args.adapter_scale, n_ctx=args.ctx, threads=args.threads,
                 gpu_layers=args.gpu_layers, force=args.force) as dec:
        messages = task.draft_messages(text)
        if args.json:
            g = dec.generate(messages, cfg)
            out = {"text": g.text, "mode": g.mode, "stop_reason": g.stop_reason, "prompt_tokens": g.n_prompt,
                   "new_tokens": g.steps, "alpha": cfg.alpha, "tau": cfg.tau, "adapter": str(adapter) if adapter else None,
                   "adapter_scale": args.adapter_scale}
            print(json.dumps(out, ensure_ascii=False))
        else:
            dec.generate(messages, cfg, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
            sys.stdout.write("\n")
    return 0
