"""`cope tui`: the terminal UI (Textual), imported only when the command runs."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("tui", help="the terminal UI: draft, chat, history, profiles",
                              description="Draft in your voice, compare with the base model, chat, search past drafts, "
                                          "create and train profiles. Enter sends; Shift+Enter or Ctrl+J adds a line; "
                                          "F1-F4 switch screens; Ctrl+T light/dark; Ctrl+Q quits.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--profile", default="", help="profile to start with (default: the one used last)")
    src.add_argument("--no-profile", action="store_true", help="start with the base model alone")
    p.add_argument("--model", default=None, help="base model name or .gguf path (default: the profile's, else smollm2-135m)")
    p.add_argument("--task", default=None, help="task template to start with (default: the profile's or the last used)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per draft or reply (default: the task's)")
    p.add_argument("--ctx", type=int, default=2048, help="context size in tokens (default 2048)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores, at most 8)")
    p.add_argument("--gpu-layers", type=int, default=None, help="layers on the GPU (default: all with Metal/CUDA)")
    p.add_argument("--theme", choices=("dark", "light"), default=None, help="colours (default: the last used, else dark)")
    p.set_defaults(func=cmd_tui)


def cmd_tui(args) -> int:
    import tui

    return tui.run(profile=None if args.no_profile else args.profile, model=args.model, task=args.task,
                   max_tokens=args.max_tokens, n_ctx=args.ctx, threads=args.threads, gpu_layers=args.gpu_layers,
                   theme=args.theme)
