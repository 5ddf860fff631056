"""`cope eval compare`: rows of different runs, methods or grid points side by side, paired by query.

A training variant lives in a --out folder of its own (its adapters replace the folder's), so the
question issue 7 asks of every variant, "does it beat OPPU at the paper's settings, and the base,
on the same queries?", pairs rows across folders. A side is written

    DIR:METHOD[:KEY=VALUE,...]      e.g.  eval-out/strong:oppu+cd:alpha=0.3,adapter_scale=0.5

and means the rows of DIR/results.jsonl for METHOD whose settings hold those values, with the
decoding options not named at their defaults (SETTING_DEFAULTS; a row leaves out an option at its
default): `DIR:oppu` is plain OPPU, not OPPU under a sweep's repetition penalty. For each (user,
query) the last matching row written counts. A side may name a rows file instead of a folder,
`DIR/sweep-per-user.jsonl:oppu+cd` (what `cope eval sweep` chose per user): such a file is already
a selection, so only the values named filter it. The first side is the reference:
every other side gets paired bootstrap CIs of its difference to it, over the queries both have.
The style classifier is trained on the histories of the first run's users (its eval.json).

`--drop-mentions` scores every text with its @handles removed (outputs, references and the
classifier's training histories alike): on LaMP-7 most real tweets open with an @mention that the
paraphrased input does not name, so an adapter that learned whom its user talks to gains ROUGE
and attribution from the handle alone; this shows what is left beside it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from cope_local.errors import CopeError
from cope_local.eval.generate import SETTING_DEFAULTS

MENTION = re.compile(r"(?<!\w)@\w+")  # a Twitter-style @handle


def drop_mentions(text: str) -> str:
    return " ".join(MENTION.sub(" ", text).split())


@dataclass
class Side:
    spec: str  # as given
    path: Path  # a `cope eval run` --out folder, or a rows file (a selection, e.g. the sweep's per-user rows)
    method: str  # a row's method (generate.METHODS)
    where: dict  # settings the rows must hold

    @property
    def folder(self) -> Path:
        """The run's folder (its eval.json)."""
        return self.path.parent if self.path.is_file() else self.path

    @property
    def rows_file(self) -> Path:
        return self.path if self.path.is_file() else self.path / "results.jsonl"

    @property
    def label(self) -> str:
        where = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.where.items())
        name = f"{self.folder.name}/{self.path.stem}" if self.path.is_file() else self.path.name
        return f"{name}:{self.method}" + (f":{where}" if where else "")


def _value(text: str):
    """A setting's value as rows hold it: a number, true/false (one_paragraph=true), else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return float(text)
    except ValueError:
        return text


def parse_side(spec: str) -> Side:
    from cope_local.eval.generate import METHODS

    parts = spec.split(":")
    where = {}
    if len(parts) >= 3 and "=" in parts[-1]:
        for pair in parts.pop().split(","):
            key, eq, value = pair.partition("=")
            if not eq or not key.strip():
                raise CopeError(f"{spec}: {pair!r} is not KEY=VALUE; write DIR:METHOD:alpha=0.3,adapter_scale=0.5")
            where[key.strip()] = _value(value.strip())
    if len(parts) < 2 or parts[-1] not in METHODS:
        raise CopeError(f"{spec}: write DIR:METHOD[:KEY=VALUE,...] with METHOD one of {', '.join(METHODS)}")
    method, path = parts[-1], Path(":".join(parts[:-1])).expanduser()
    if not path.is_file() and not (path / "results.jsonl").exists():
        raise CopeError(f"{path / 'results.jsonl'}: no such file; give a folder written by `cope eval run --out`")
    return Side(spec, path, method, where)


def matches(row: dict, side: Side) -> bool:
    if row["method"] != side.method:
        return False
    settings = row["settings"]
    wanted = side.where if side.path.is_file() else {**SETTING_DEFAULTS, **side.where}  # a folder: options not named
    for key, want in wanted.items():                                                   # must be at their defaults
        have = settings.get(key, SETTING_DEFAULTS.get(key))
        if have != want and not (isinstance(want, float) and isinstance(have, (int, float)) and float(have) == want):
            return False
    return True


def side_rows(side: Side) -> list[dict]:
    """The side's rows, one per (user, query) (the last written), relabelled: method = side.label."""
    from cope_local.eval.results import read_rows

    out = {}
    for r in read_rows(side.rows_file):
        if matches(r, side):
            out[(r["user_id"], r["query_id"])] = {**r, "method": side.label}
    if not out:
        raise CopeError(f"{side.spec}: no rows of method {side.method} with {side.where or 'any settings'} in "
                        f"{side.rows_file}; check the method and settings (a row's \"settings\")")
    return list(out.values())


def _everyone(folder: Path):
    from cope_local.eval.data import load_users

    info_path = folder / "eval.json"
    if not info_path.exists():
        raise CopeError(f"{info_path}: no such file; the first side must be a folder of `cope eval run`")
    info = json.loads(info_path.read_text())
    return load_users(info["data"], info.get("outputs"), holdout=info.get("holdout") or 0)


def _without_mentions(rows: list[dict]) -> None:
    from cope_local.eval.metrics import rouge

    for r in rows:
        r["output"], r["reference"] = drop_mentions(r["output"]), drop_mentions(r["reference"])
        r |= {k: round(v, 6) for k, v in rouge(r["output"], r["reference"]).items()}


def _attribute(rows: list[dict], everyone, mentions: bool):
    """report.attribute, with the classifier's histories stripped of @handles when the rows are."""
    from cope_local.eval.report import attribute

    if mentions:
        return attribute(rows, everyone)
    stripped = [replace(u, history=[replace(i, output=drop_mentions(i.output)) for i in u.history]) for u in everyone]
    return attribute(rows, stripped)


def compare(specs: list[str], *, mentions: bool = True) -> tuple[str, dict]:
    """(markdown, figures) for sides[1:] against sides[0] on the (user, query) pairs every side has;
    mentions=False: every text scored without its @handles."""
    from cope_local.eval.metrics import paired, summarize
    from cope_local.eval.report import ci, kind_lines, same_outputs

    if len(specs) < 2:
        raise CopeError("cope eval compare: give at least two sides (the first is the reference)")
    sides = [parse_side(s) for s in specs]
    labels = [s.label for s in sides]
    if len(set(labels)) != len(labels):
        raise CopeError(f"cope eval compare: two sides are the same ({', '.join(labels)})")
    per_side = [side_rows(s) for s in sides]
    shared = set.intersection(*({(r["user_id"], r["query_id"]) for r in rows} for rows in per_side))
    rows = [r for side in per_side for r in side if (r["user_id"], r["query_id"]) in shared]
    if not rows:
        raise CopeError("cope eval compare: the sides share no query; compare runs on the same --data and --holdout")
    if not mentions:
        _without_mentions(rows)
    ceiling = _attribute(rows, _everyone(sides[0].folder), mentions)
    summary = summarize(rows, labels)
    users = len({k[0] for k in shared})
    lines = [f"# cope eval compare ({users} users, {len(shared)} queries that every side has"
             + ("" if mentions else "; every text without its @handles") + ")", "",
             "| side | ROUGE-1 [95 % CI] | ROUGE-L [95 % CI] | attribution [95 % CI] | words | length ratio [95 % CI] |",
             "|---|---|---|---|---|---|"]
    figures: dict = {"users": users, "queries": len(shared), "mentions": mentions,
                     "attribution_of_real_texts": ceiling.mean, "sides": {}}
    for label in labels:
        s = summary[label]
        lines.append(f"| {label} | {s.rouge1:.3f} {ci(s.rouge1_ci)} | {s.rougeL:.3f} {ci(s.rougeL_ci)} | "
                     f"{s.attribution.mean:.3f} {ci(s.attribution)} | {s.words:.1f} | {s.length_ratio:.2f} "
                     f"{ci(s.length_ratio_ci, 2)} |")
        figures["sides"][label] = {
            "rouge1": s.rouge1, "rouge1_ci": [s.rouge1_ci.low, s.rouge1_ci.high], "rougeL": s.rougeL,
            "rougeL_ci": [s.rougeL_ci.low, s.rougeL_ci.high], "attribution": s.attribution.mean,
            "attribution_ci": [s.attribution.low, s.attribution.high], "words": s.words,
            "length_ratio": s.length_ratio, "length_ratio_ci": [s.length_ratio_ci.low, s.length_ratio_ci.high]}
    lines += [f"| (real texts) | | | {ceiling.mean:.3f} {ci(ceiling)} | | 1.00 |", "",
              f"Paired differences to {labels[0]} (95 % CI; query bootstrap, then user bootstrap):", "",
              "| side | ROUGE-L | ROUGE-L, users | attribution | same output |", "|---|---|---|---|---|"]
    for label in labels[1:]:
        (q, u, n), (aq, _, _) = paired(rows, label, labels[0]), paired(rows, label, labels[0], "attr")
        same = same_outputs(rows, label, labels[0])
        lines.append(f"| {label} | {q.fmt()} | [{u.low:+.3f}, {u.high:+.3f}] | {aq.fmt()} | {same} of {n} |")
        figures["sides"][label] |= {"diff": q.mean, "query_ci": [q.low, q.high], "user_ci": [u.low, u.high],
                                    "attribution_diff": aq.mean, "attribution_diff_ci": [aq.low, aq.high],
                                    "same_output": same}
    lines += kind_lines(rows, [(label, labels[0]) for label in labels[1:]])
    return "\n".join(lines) + "\n", figures
