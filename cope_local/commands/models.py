"""`cope models list|path`: which base models are here, and what they are."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("models", help="list the base models installed here")
    msub = p.add_subparsers(dest="models_command", metavar="VERB")
    ls = msub.add_parser("list", help="name, architecture, parameters, quantization, context, template, path")
    ls.add_argument("paths", nargs="*", help="extra .gguf files to describe")
    ls.add_argument("--json", action="store_true", help="one JSON array on stdout")
    ls.set_defaults(func=cmd_list)
    pa = msub.add_parser("path", help="print the file path of a model")
    pa.add_argument("name", nargs="?", default=None, help="model name or .gguf path (default: the default model)")
    pa.set_defaults(func=cmd_path)
    p.set_defaults(func=cmd_list, paths=[], json=False)


def model_rows(extra_paths=()) -> list[dict]:
    from cope_local.gguf_file import read_info
    from cope_local.models import DEFAULT_MODEL, KNOWN_MODELS, installed_models

    rows = []
    found = installed_models()
    for name in KNOWN_MODELS:
        if name in found:
            info = read_info(found[name]).as_dict()
            row = {**info, "name": name, "title": info["name"], "default": name == DEFAULT_MODEL, "installed": True}
        else:
            row = {"name": name, "installed": False, "install": KNOWN_MODELS[name].extra, "default": name == DEFAULT_MODEL}
        rows.append(row)
    for path in extra_paths:
        info = read_info(path)
        rows.append({**info.as_dict(), "name": str(path), "title": info.name, "default": False, "installed": True})
    return rows


def cmd_list(args) -> int:
    rows = model_rows(args.paths)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME':14} {'ARCH':7} {'PARAMS':>7} {'QUANT':7} {'CTX':>6} {'TMPL':4}  PATH")
    for r in rows:
        if not r["installed"]:
            print(f"{r['name']:14} (not installed: {r['install']})")
            continue
        params = f"{r['parameters'] / 1e6:.0f}M"
        mark = " *" if r["default"] else ""
        print(
            f"{r['name']:14} {r['architecture']:7} {params:>7} {r['quantization']:7} {r['context_length'] or '?':>6} "
            f"{'yes' if r['chat_template'] else 'no':4}  {r['path']}{mark}"
        )
    print("* default model")
    return 0


def cmd_path(args) -> int:
    from cope_local.models import resolve_model

    print(resolve_model(args.name))
    return 0
