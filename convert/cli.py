"""`cope convert adapter|base|check`: registration is light; handlers import the heavy parts."""

from __future__ import annotations

import argparse
import json
import sys

OUTTYPE_CHOICES = ("f32", "f16", "q8_0")  # = convert.gguf_io.OUTTYPES (not imported: keeps --help fast)


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="export adapters and base models to GGUF; check GGUF files",
                              description="Bridge from training (peft, transformers) to decoding (GGUF). Offline, atomic writes.")
    sub = p.add_subparsers(dest="convert_command", metavar="WHAT")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    a = sub.add_parser("adapter", help="peft LoRA folder -> GGUF LoRA bound to its base",
                       description="Export a peft LoRA adapter to a GGUF LoRA that llama.cpp loads, bound to the base it was trained on.")
    a.add_argument("peft_dir", help="folder saved by peft (adapter_config.json, adapter_model.safetensors)")
    a.add_argument("--base", required=True, help="the base GGUF the adapter was trained on (path or model name)")
    a.add_argument("-o", "--output", required=True, help="adapter .gguf to write")
    a.add_argument("--outtype", choices=OUTTYPE_CHOICES, default="f32", help="tensor type (default f32; adapters are small)")
    a.add_argument("--task", help="training task recorded in the adapter (cope.train.task)")
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.set_defaults(func=_adapter)

    b = sub.add_parser("base", help="GGUF or transformers folder -> GGUF base (optionally merging a LoRA)",
                       description="Write a base GGUF with full tokenizer metadata from a GGUF file or a transformers folder.")
    b.add_argument("source", help=".gguf file, model name, or transformers folder (config.json + safetensors)")
    b.add_argument("-o", "--output", required=True, help="base .gguf to write")
    b.add_argument("--merge-adapter", metavar="PEFT_DIR", help="merge this peft LoRA into the weights first")
    b.add_argument("--outtype", choices=OUTTYPE_CHOICES, default="f32", help="tensor type (default f32)")
    b.add_argument("--name", help="general.name of the new file")
    b.add_argument("--tokenizer-from", metavar="GGUF", help="(folder sources) copy the tokenizer metadata of this GGUF, e.g. the one the folder came from")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(func=_base)

    c = sub.add_parser("check", help="what a GGUF is, and whether it fits a base",
                       description="Explain a GGUF file; with --base, say whether it fits that base (architecture, shapes, binding).")
    c.add_argument("file", help=".gguf file (model or adapter)")
    c.add_argument("--base", help="base GGUF (path or model name) to check the file against")
    c.add_argument("--load", action="store_true", help="also load the pair in llama.cpp")
    c.add_argument("--json", action="store_true", help="print the facts as JSON")
    c.set_defaults(func=_check)


def _model_path(name_or_path: str):
    from cope_local.models import resolve_model

    return resolve_model(name_or_path)


def _print(result: dict, as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(text)


def _adapter(args: argparse.Namespace) -> int:
    from convert.adapter import export_adapter

    summary = {"task": args.task} if args.task else None
    print(f"exporting {args.peft_dir} -> {args.output} ...", file=sys.stderr)
    r = export_adapter(args.peft_dir, _model_path(args.base), args.output, outtype=args.outtype, summary=summary)
    data = {"path": str(r.path), "architecture": r.architecture, "pairs": r.n_pairs, "rank": r.rank, "alpha": r.alpha,
            "bytes": r.bytes, "seconds": round(r.seconds, 2), "notes": r.notes}
    text = (f"wrote {r.path} ({r.bytes / 1e6:.1f} MB, {r.architecture}, {r.n_pairs} LoRA pairs, rank {r.rank}, "
            f"alpha {r.alpha:g}) in {r.seconds:.1f} s" + "".join(f"\n  note: {n}" for n in r.notes))
    _print(data, args.json, text)
    return 0


def _base(args: argparse.Namespace) -> int:
    from pathlib import Path

    from convert.base import export_base

    source = args.source if Path(args.source).is_dir() else _model_path(args.source)
    print(f"exporting {source} -> {args.output} ...", file=sys.stderr)
    r = export_base(source, args.output, outtype=args.outtype, merge_adapter=args.merge_adapter, name=args.name,
                    tokenizer_from=_model_path(args.tokenizer_from) if args.tokenizer_from else None)
    data = {"path": str(r.path), "architecture": r.architecture, "source": r.source_kind, "merged": r.merged,
            "tensors": r.n_tensors, "bytes": r.bytes, "seconds": round(r.seconds, 2), "notes": r.notes}
    text = (f"wrote {r.path} ({r.bytes / 1e6:.1f} MB, {r.architecture}, {r.n_tensors} tensors, {args.outtype}"
            f"{', LoRA merged' if r.merged else ''}) in {r.seconds:.1f} s" + "".join(f"\n  note: {n}" for n in r.notes))
    _print(data, args.json, text)
    return 0


def _check(args: argparse.Namespace) -> int:
    from convert.check import describe, render

    base = _model_path(args.base) if args.base else None
    info = describe(_model_path(args.file), base, load=args.load)
    _print(info, args.json, render(info))
    fit = info.get("fit")
    return 0 if fit is None or fit["ok"] else 1
