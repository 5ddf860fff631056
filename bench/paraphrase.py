"""How the base model's paraphrases of K users' texts turn out: answered, copied, refused, or echoing an example.

    python bench/paraphrase.py --data /work/shared/data/LaMP-7/dev.jsonl --users 3
    python bench/paraphrase.py --data F --users 40 --per-user 10 --model gemma3-270m

The inputs of LaMP-7-style training pairs and held-out queries are these paraphrases, so their
quality bounds everything measured on them. For each text: the raw answer to the task's
paraphrase chat (`tasks.paraphrase_messages`), then how `Task.make_inputs` classifies it. An echo
is an answer repeating an example's rewrite (`tasks.echoes_example`: the model answered the
prompt's examples, not the text); make_inputs falls back to the text itself for echoes, copies and
refusals. Also the mean ROUGE-L of kept paraphrases against their text (how much of it they keep),
and, side by side on each text, the time of the answer stopped at its first repeated sentence (what
the Paraphraser does) against the full answer to the token cap, with a check that both clean to the
same input. A temporary cache; the data file is only read. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    from cope_local.eval.data import load_users
    from cope_local.eval.metrics import rouge
    from cope_local.models import resolve_model
    from cope_local.tasks import clean_generated, echoes_example, get_task, paraphrase_messages
    from cope_local.train.paraphrase import Paraphraser

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--users", type=int, default=3, help="the first K users of the file (default 3)")
    ap.add_argument("--per-user", type=int, default=20, help="texts per user at most (default 20)")
    ap.add_argument("--model", default=None, help="base model (default: smollm2-135m)")
    args = ap.parse_args()

    users = load_users(args.data)[: args.users]
    counts = {"texts": 0, "generated": 0, "echo": 0, "copy": 0, "empty": 0}
    kept_rouge, kept_words = [], []
    stopped_s = full_s = 0.0
    looped = differ = 0
    full_cfg = Paraphraser.gen_config()  # the Paraphraser's settings, without its stop at a loop
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-para-") as tmp, \
            Paraphraser(resolve_model(args.model), Path(tmp) / "cache.jsonl", progress=False) as para:
        for user in users:
            task = get_task(user.task)
            for item in user.history[: args.per_user]:
                chat = paraphrase_messages(item.output.strip())
                t1 = time.monotonic()
                raw = para(chat)
                t2 = time.monotonic()
                full = para.decoder.generate(chat, full_cfg).text
                stopped_s, full_s = stopped_s + (t2 - t1), full_s + (time.monotonic() - t2)
                looped += raw != full
                answer = clean_generated(raw)
                differ += answer != clean_generated(full)
                made = task.make_inputs([item], lambda _m, a=answer: a)[0]  # how training would take it
                counts["texts"] += 1
                if not answer:
                    counts["empty"] += 1
                elif echoes_example(answer):
                    counts["echo"] += 1
                elif made.meta.get("input_from") == "generated-copy":
                    counts["copy"] += 1
                else:
                    counts["generated"] += 1
                    kept_rouge.append(rouge(answer, item.output)["rougeL"])
                    kept_words.append(len(answer.split()))
    seconds = time.monotonic() - t0
    n = max(1, counts["texts"])
    summary = {**counts, "users": len(users), "seconds": round(seconds, 1),
               "shares": {k: round(v / n, 3) for k, v in counts.items() if k != "texts"},
               "kept_rougeL_vs_text": round(sum(kept_rouge) / max(1, len(kept_rouge)), 3),
               "kept_words": round(sum(kept_words) / max(1, len(kept_words)), 1),
               "stopped_at_a_repeat": looped, "cleaned_differently": differ,
               "stopped_vs_full_seconds": round(stopped_s / max(full_s, 1e-9), 3)}
    for k, v in summary["shares"].items():
        print(f"{k:>9}: {counts[k]:>4} of {counts['texts']} ({v:.1%})", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
