"""`cope eval`: the metrics on hand-made numbers, the TAM split, and a real 2-user run end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cope_local.eval.data import EvalUser, Query, fold_of, load_users, other_fold, tam_history
from cope_local.eval.metrics import bootstrap_clustered, bootstrap_mean, bootstrap_ratio, paired, rouge

TWEETS = [
    "sunny again today, off to the beach with the dogs",
    "coffee first, then emails. always in that order",
    "cant believe the bus was late AGAIN this morning",
    "finally finished that book, the ending was wild",
    "rainy sunday = soup and old movies, perfect",
    "new running shoes!! legs feel fast already",
    "garden tomatoes are finally turning red",
    "long day at work, pizza tonight for sure",
    "my cat knocked the plant over again lol",
    "weekend plans: nothing at all and i love it",
]


# ---- metrics ------------------------------------------------------------------------------------

def test_rouge_on_hand_made_strings():
    assert rouge("the cat sat", "the cat sat") == {"rouge1": 1.0, "rougeL": 1.0}
    assert rouge("dogs bark", "the cat sat") == {"rouge1": 0.0, "rougeL": 0.0}
    # 2 of 4 output words and 2 of 3 reference words overlap: P 1/2, R 2/3, F = 4/7; LCS "cat sat" the same
    s = rouge("a cat sat down", "the cat sat")
    assert s["rouge1"] == pytest.approx(4 / 7) and s["rougeL"] == pytest.approx(4 / 7)
    # order matters for L only: unigrams all match, longest common subsequence is 2 of 3
    s = rouge("sat cat the", "the cat sat")
    assert s["rouge1"] == pytest.approx(1.0) and s["rougeL"] == pytest.approx(1 / 3)
    assert rouge("", "the cat")["rougeL"] == 0.0
    assert rouge("Cats running", "cats run")["rouge1"] == pytest.approx(0.5)  # no stemming; lowercased


def test_bootstrap_contains_the_difference_and_is_seeded():
    rng = np.random.default_rng(1)
    big = 0.2 + rng.normal(0, 0.05, size=200)  # a large, clear difference
    ci = bootstrap_mean(big)
    assert ci.low < ci.mean < ci.high and ci.low <= 0.2 <= ci.high and ci.excludes_zero()
    assert bootstrap_mean(big) == ci  # seeded: the same interval again
    assert bootstrap_mean(big, seed=5) != ci
    noise = rng.normal(0, 0.05, size=200)
    assert not bootstrap_mean(noise).excludes_zero()
    users = [f"u{i // 10}" for i in range(200)]  # 20 users of 10 queries
    cl = bootstrap_clustered(big, users)
    assert cl.mean == pytest.approx(ci.mean) and cl.low <= 0.2 <= cl.high and cl.excludes_zero()
    assert bootstrap_clustered(big, users) == cl
    # one user's 10 identical differences: no spread between users, but the CI still holds the mean
    one = bootstrap_clustered([0.1] * 10, ["a"] * 10)
    assert one.low == pytest.approx(0.1) and one.high == pytest.approx(0.1)
    # a ratio of means (the length ratio): outputs ~half as long as their references
    refs = rng.integers(5, 30, size=200)
    outs = np.round(refs * 0.5 + rng.normal(0, 1, size=200))
    ratio = bootstrap_ratio(outs, refs)
    assert ratio.mean == pytest.approx(outs.sum() / refs.sum()) and ratio.low < ratio.mean < ratio.high
    assert 0.45 < ratio.low and ratio.high < 0.55 and bootstrap_ratio(outs, refs) == ratio


def test_paired_matches_queries_by_user_and_id():
    rows = [{"user_id": u, "query_id": q, "method": m, "rougeL": v}
            for u, q, m, v in [("a", "1", "cope", 0.5), ("a", "1", "oppu", 0.3), ("b", "1", "cope", 0.4),
                               ("b", "1", "oppu", 0.4), ("b", "2", "cope", 0.9)]]
    q, u, n = paired(rows, "cope", "oppu")
    assert n == 2 and q.mean == pytest.approx(0.1) and u.mean == pytest.approx(0.1)


# ---- data and the TAM split -------------------------------------------------------------------------

def _user_row(uid: str, n_profile: int = 10, n_queries: int = 1) -> dict:
    return {"user_id": uid, "task": "LaMP-7",
            "profile": [{"text": f"{t} #{uid}"} for t in TWEETS[:n_profile]],
            "queries": [{"id": f"{uid}-q{i}",
                         "input": f"Paraphrase the following tweet without any explanation before or after it: "
                                  f"It rained all day so I stayed inside {i}.",
                         "output": f"rain all day, staying in {i} #{uid}"} for i in range(n_queries)]}


def test_cross_fitted_choice_picks_on_the_other_half():
    from cope_local.eval.sweep import cross_fitted_choice, query_half

    qids = [f"q{i}" for i in range(8)]
    assert {query_half(q) for q in qids} == {0, 1}

    def rows(user, score):  # score(query id) -> ROUGE-L of the swept method at this point
        return [{"user_id": user, "query_id": q, "method": "cope", "rougeL": score(q)} for q in qids]

    # point "a" is better on half 0 only, "b" on half 1 only: each half gets the point that won the OTHER half
    a = lambda q: 0.9 if query_half(q) == 0 else 0.1
    b = lambda q: 0.1 if query_half(q) == 0 else 0.9
    out = cross_fitted_choice({"a": rows("ann", a), "b": rows("ann", b)}, "cope")
    assert sorted(r["query_id"] for r in out) == qids
    assert all(r["chosen_point"] == ("b" if query_half(r["query_id"]) == 0 else "a") for r in out)
    assert all(r["rougeL"] == 0.1 for r in out)  # a choice that over-fits its own half scores worse on the other
    # a point better on both halves is chosen everywhere; ties go to the first point; users are separate
    c = lambda q: 0.5
    grid = {"c": rows("bo", c) + rows("cy", c), "d": rows("bo", lambda q: 0.7) + rows("cy", c)}
    out = cross_fitted_choice(grid, "cope")
    assert {(r["user_id"], r["chosen_point"]) for r in out} == {("bo", "d"), ("cy", "c")}
    # one point for everyone (a tuned default): d's mean over both users is higher, so cy gets d too
    out = cross_fitted_choice(grid, "cope", per_user=False)
    assert len(out) == 16 and {(r["user_id"], r["chosen_point"]) for r in out} == {("bo", "d"), ("cy", "d")}
    # and it is chosen on the other half of every user's queries: a and b swap as they did per user
    out = cross_fitted_choice({"a": rows("ann", a) + rows("bo", a), "b": rows("ann", b) + rows("bo", b)}, "cope",
                              per_user=False)
    assert all(r["chosen_point"] == ("b" if query_half(r["query_id"]) == 0 else "a") and r["rougeL"] == 0.1 for r in out)


def test_tam_split_is_fixed_and_never_sees_the_user(tmp_path):
    ids = [f"user-{i}" for i in range(40)]
    folds = [fold_of(u) for u in ids]
    assert folds == [fold_of(u) for u in ids] and set(folds) == {"A", "B"}  # deterministic (not salted hash())
    assert 10 <= folds.count("A") <= 30  # a hash split, roughly balanced
    assert fold_of("lamp7-dev-q618") == fold_of("lamp7-dev-q618") and other_fold("A") == "B"
    path = tmp_path / "users.jsonl"
    path.write_text("".join(json.dumps(_user_row(u)) + "\n" for u in ids[:8]), encoding="utf-8")
    users = load_users(path, holdout=2)
    for u in users:
        tam = tam_history(users, u.fold)
        assert tam and all(f"#{u.user_id}" not in item.output for item in tam)  # the user's own text is excluded
        assert {i.output.split("#")[1] for i in tam} == {v.user_id for v in users if v.fold != u.fold}
        # held out: the last 2 profile texts leave the history (of the user and of every TAM)
        assert [i.output for i in u.holdout] == [f"{t} #{u.user_id}" for t in TWEETS[8:10]]
        assert len(u.history) == 8 and not {i.id for i in u.holdout} & {i.id for i in tam + u.history}


def test_held_out_items_whose_input_gives_the_text_away_are_not_queries(tmp_path, default_model):
    from types import SimpleNamespace

    from cope_local.eval.runner import holdout_queries
    from cope_local.tasks import get_task
    from cope_local.tasks.registry import gives_away, paraphrase_messages
    from cope_local.train.paraphrase import Paraphraser

    path = tmp_path / "users.jsonl"
    path.write_text(json.dumps(_user_row("ann")) + "\n", encoding="utf-8")
    [user] = load_users(path, holdout=2)
    copied, paraphrased = user.holdout
    # the base model's answers, as the paraphrase cache holds them: one holds the whole text (case and punctuation aside)
    cache = tmp_path / "holdout.generated.jsonl"
    key = Paraphraser(default_model, cache).key
    answers = {copied.output: f"So: {copied.output.upper()} ! Rewritten:",
               paraphrased.output: "I have no plans for the weekend."}
    cache.write_text("".join(json.dumps({"key": key(paraphrase_messages(t)), "text": a}) + "\n"
                             for t, a in answers.items()), encoding="utf-8")
    queries = holdout_queries(user, SimpleNamespace(task=get_task(user.task), path=tmp_path), default_model)
    assert [(q.reference, q.kind) for q in queries] == [(paraphrased.output, "holdout")]
    assert queries[0].prompt.endswith("I have no plans for the weekend.") and copied.output not in queries[0].prompt
    assert gives_away("x: A SAD story, that... will make you cry !", "a sad story that will make you cry")
    assert not gives_away("I love cats", "cat") and not gives_away("anything", " !! ")  # whole words; no text


def test_one_paragraph_ends_every_output_at_its_first_blank_line(tmp_path, default_model, no_network):
    """--one-paragraph: the same greedy output cut at its first blank line (a base model without a chat
    template repeats its answer after one); rows made without it keep their keys."""
    from cope_local.eval.generate import Adapters, Decoding, generate_user
    from cope_local.eval.results import read_rows

    user = EvalUser(user_id="ann", task="lamp7", history=[], queries=[])
    # SmolLM2 answers this with "Dear [Landlord's Name],", a blank line, then more (64 tokens, no end of turn)
    prompt = "Give me a two-paragraph note to my landlord about the broken heater."
    query = Query("q0", prompt, "Dear Sam, the heater is broken again.", "query")
    ad = Adapters(base=default_model)
    rows = {}
    for flag in (False, True):
        results = tmp_path / f"rows-{flag}.jsonl"
        generate_user(user, [query], ("base",), ad, Decoding(0.7, 0.3, 64, one_paragraph=flag), results, set(),
                      log=lambda m: None)
        [rows[flag]] = read_rows(results)
    whole, first = rows[False], rows[True]
    assert "\n\n" in whole["output"] and whole["stop_reason"] == "length"
    assert first["output"] == whole["output"].split("\n\n")[0].strip() and first["stop_reason"] == "stop"
    assert first["output"].startswith("Dear") and len(first["output"]) < len(whole["output"]) / 3
    assert first["settings"]["one_paragraph"] is True and "one_paragraph" not in whole["settings"]
    assert first["key"] != whole["key"]


def test_lamp_pair_files_and_bad_input(tmp_path):
    from cope_local.errors import CopeError

    q = [{"id": "310", "input": "Generate a headline for the following article: Rain fell.",
          "profile": [{"text": f"article {i}", "title": f"Headline {i}"} for i in range(9)]}]
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "o.json").write_text(json.dumps({"task": "LaMP_4", "golds": [{"id": "310", "output": "Rain"}]}))
    [u] = load_users(tmp_path / "q.json", tmp_path / "o.json")
    assert u.task == "headline" and u.queries == [Query("310", q[0]["input"], "Rain")]
    assert u.history[0].input == "article 0" and u.history[0].output == "Headline 0"
    (tmp_path / "o.json").write_text(json.dumps({"task": "LaMP-9", "golds": [{"id": "310", "output": "Rain"}]}))
    with pytest.raises(CopeError, match="task 'LaMP-9' is not one cope eval knows"):
        load_users(tmp_path / "q.json", tmp_path / "o.json")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(CopeError, match="bad.jsonl:1: not JSON"):
        load_users(tmp_path / "bad.jsonl")
    assert isinstance(u, EvalUser)


def test_longlamp_rows_use_the_benchmarks_prompts(tmp_path):
    from cope_local.tasks import get_task

    review = {"overall": 4.0, "description": "A cast-iron pan.", "summary": "Heavy but great",
              "reviewText": "Seasoned it twice and it works."}
    rows = [{"user_id": "r1", "task": "LongLaMP-3", "profile": [review] * 1 + [{**review, "summary": f"s{i}"} for i in range(8)],
             "queries": [{"id": "q", "input": "Generate the review text ...", "output": "Fine."}]},
            {"user_id": "t1", "task": "LongLaMP-4", "profile": [{"summary": f"topic {i}", "content": f"post {i}"} for i in range(9)],
             "queries": []},
            {"user_id": "a1", "task": "LongLaMP-2", "profile": [{"title": f"T{i}", "abstract": f"We show {i}."} for i in range(9)],
             "queries": []}]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r1, t1, a1 = load_users(tmp_path / "l.jsonl", holdout=1)
    msgs, target = get_task(r1.task).training_pair(r1.history[0])
    assert msgs[0]["content"] == ('Generate the review text written by a reviewer who has a given an overall rating of "4.0" '
                                  'for a product with description "A cast-iron pan.". The summary of the review text is '
                                  '"Heavy but great".') and target == review["reviewText"]
    assert get_task(t1.task).training_pair(t1.history[0])[0][0]["content"] == "Generate the content for a reddit post topic 0"
    assert get_task(a1.task).training_pair(a1.history[0]) == (
        [{"role": "user", "content": 'Generate an abstract for the title "T0"'}], "We show 0.")
    assert [len(u.history) for u in (r1, t1, a1)] == [8, 8, 8] and a1.holdout[0].output == "We show 8."


# ---- the real thing: 2 users, --no-tam, every method --------------------------------------------------

@pytest.fixture
def _eval_env(monkeypatch, pytestconfig):
    """The HF copy of the base shared with tests/test_train_*.py (built once, then loads in ~1 s)."""
    monkeypatch.setenv("COPE_CACHE", str(pytestconfig.cache.mkdir("cope-train-cache")))
    monkeypatch.setenv("COPE_THREADS", "1")


def test_drop_mentions_removes_handles_only():
    from cope_local.eval.compare import drop_mentions

    assert drop_mentions("@ann_1 lol  yes @Bob! mail me@home.org") == "lol yes ! mail me@home.org"
    assert drop_mentions("@only") == ""



def test_without_mentions_rescores_rows_on_the_text_beside_the_handles():
    from cope_local.eval.compare import _without_mentions

    rows = [{"output": "@bob see you at noon", "reference": "@ann see you at noon", "rouge1": 0.8, "rougeL": 0.8},
            {"output": "@ann @ann @ann", "reference": "@ann lunch?", "rouge1": 0.5, "rougeL": 0.5}]
    _without_mentions(rows)
    assert [r["rougeL"] for r in rows] == [1.0, 0.0] and rows[1]["output"] == ""  # a chain of handles says nothing


def test_a_side_selects_rows_by_numbers_and_by_true_or_false(tmp_path):
    from cope_local.eval.compare import matches, parse_side

    (tmp_path / "results.jsonl").write_text("", encoding="utf-8")
    row = lambda **s: {"method": "oppu+cd", "settings": {"alpha": 0.7, "tau": 0.3, **s}}  # noqa: E731
    cut = parse_side(f"{tmp_path}:oppu+cd:alpha=0.7,one_paragraph=true")
    assert cut.where == {"alpha": 0.7, "one_paragraph": True}
    assert matches(row(one_paragraph=True), cut) and not matches(row(), cut)
    plain = parse_side(f"{tmp_path}:oppu+cd:alpha=0.7")  # a folder: options not named must be at their defaults
    assert matches(row(), plain) and not matches(row(one_paragraph=True), plain)
    assert parse_side(f"{tmp_path}:oppu+cd:one_paragraph=False").where == {"one_paragraph": False}


def test_eval_run_end_to_end_and_cached(tmp_path, capsys, no_network, _eval_env):
    from cope_local.cli import main
    from cope_local.eval.generate import METHODS
    from cope_local.eval.results import read_rows
    from cope_local.tasks import get_task

    data = tmp_path / "users.jsonl"
    data.write_text("".join(json.dumps(_user_row(u)) + "\n" for u in ("ann", "bob")), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["eval", "run", "--data", str(data), "--out", str(out), "--no-tam", "--holdout", "1", "--max-steps", "1",
            "--max-tokens", "8", "--set", "neg_samples=2", "--set", "neg_max_tokens=8", "--set", "max_target_tokens=32",
            "--set", "dpo_batch_size=4", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert first["users"] == 2 and first["queries"] == 4  # 1 benchmark query + 1 held-out tweet each
    assert len(rows) == first["generated"] == 2 * 2 * len(METHODS) and first["cached"] == 0
    assert {(r["user_id"], r["method"]) for r in rows} == {(u, m) for u in ("ann", "bob") for m in METHODS}
    for r in rows:
        assert 0.0 <= r["rouge1"] <= 1.0 and 0.0 <= r["rougeL"] <= 1.0
        assert r["settings"]["tam_split"].startswith("none") and r["settings"]["model"].endswith(".gguf")
    held = [r for r in rows if r["query_kind"] == "holdout"]
    assert {r["reference"] for r in held} == {f"{TWEETS[9]} #ann", f"{TWEETS[9]} #bob"}
    assert all(r["prompt"].startswith("Paraphrase the following tweet") for r in held)
    ws = out / "users" / "ann"
    assert TWEETS[9] not in (ws / "items.jsonl").read_text()  # the held-out tweet is not trained on
    cope_rows = [r for r in rows if r["method"] == "cope"]
    assert get_task("lamp7").default_alpha == 0.7  # the task's alpha and tau, as no --alpha or --tau was given
    tau = get_task("lamp7").default_tau
    assert all(r["settings"]["alpha"] == 0.7 and r["settings"]["tau"] == tau and r["settings"]["mode"] == "cope"
               for r in cope_rows)
    base = {(r["user_id"], r["query_id"]): r["output"] for r in rows if r["method"] == "base"}
    assert all(base[(r["user_id"], r["query_id"])] == r["output"] for r in rows if r["method"] == "tam")

    table = (out / "table.md").read_text()
    for m in METHODS:
        assert f"| {m} | " in table
    assert "- cope - oppu, rougeL:" in table and "- cope - tam, rougeL:" in table and "user bootstrap" in table
    assert "TAM split: none" in table and "eval run" in table
    # the style metric: every output attributed to a user by the classifier trained on both histories
    assert "| ROUGE-L 95 % CI | attribution | attribution 95 % CI |" in table and "| (real texts) |" in table
    assert "| ROUGE-1 95 % CI |" in table and "| length ratio | length ratio 95 % CI |" in table
    for m in METHODS:  # every pooled figure comes with its interval, and the interval holds it
        f = first["methods"][m]
        for key in ("rouge1", "rougeL", "attribution", "length_ratio"):
            assert f[f"{key}_ci"][0] <= f[key] <= f[f"{key}_ci"][1], (m, key)
    assert all(0.0 <= first["methods"][m]["attribution"] <= 1.0 for m in METHODS)
    assert first["attribution_of_real_texts"] >= 0.5 and "- cope - oppu, attr:" in table
    assert (out / "rougeL.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the differences split by query kind, with how many outputs the two methods share
    assert "| difference | all | holdout | query | same output |" in table
    cd_row = next(x for x in table.splitlines() if x.startswith("| oppu+cd - oppu |"))
    oppu = {(r["user_id"], r["query_id"]): r["output"] for r in rows if r["method"] == "oppu"}
    same = sum(oppu[(r["user_id"], r["query_id"])] == r["output"] for r in rows if r["method"] == "oppu+cd")
    assert "(n = 4)" in cd_row and cd_row.count("(n = 2)") == 2 and cd_row.endswith(f" | {same} |")
    assert json.loads((ws / "stages" / "dpo.json").read_text())["state"] == "done"

    # the same command again, users in 2 spawned workers: every stage skipped, nothing decoded, results untouched
    size = (out / "results.jsonl").stat().st_size
    assert main([*argv, "--jobs", "2"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["generated"] == 0 and again["cached"] == len(rows)
    assert all(s["status"] == ("off" if stage == "crossfit" else "skipped")  # crossfit: only with dpo_crossfit
               for u in again["phases"]["users"] for stage, s in u["stages"].items())
    assert (out / "results.jsonl").stat().st_size == size
    assert again["methods"] == first["methods"]

    # a torn last line (a killed run) is ignored, and a sweep decodes only what is new: CoPe at another alpha
    with open(out / "results.jsonl", "a") as f:
        f.write('{"user_id": "ann", "query')
    assert main(["eval", "sweep", "--data", str(data), "--out", str(out), "--alpha", "0.7,0.5", "--tau", f"{tau:g}",
                 "--protect", "none,eos", "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 4 queries x (alpha 0.5, the paper's rule) + 4 x 2 alphas with the end of turn protected
    assert sweep["generated"] == 12 and set(sweep["points"]) == {f"0.7,{tau}", f"0.5,{tau}", f"0.7,{tau},eos",
                                                                f"0.5,{tau},eos", "per-user", "tuned"}
    assert sweep["points"][f"0.7,{tau}"]["cope_rougeL"] == pytest.approx(first["methods"]["cope"]["rougeL"])
    assert 0.0 <= sweep["points"][f"0.7,{tau},eos"]["cope_attribution"] <= 1.0
    md = (out / "sweep.md").read_text()
    assert f"| 0.5 | {tau:g} | off | none | 1 |" in md and f"| 0.5 | {tau:g} | off | eos | 1 |" in md
    per_user = sweep["points"].pop("per-user")  # a point chosen per user on the other half of the user's queries
    assert set(per_user["points_chosen"]) <= set(sweep["points"]) and per_user["n"] == 4
    assert min(p["cope_rougeL"] for p in sweep["points"].values()) <= per_user["cope_rougeL"] \
        <= max(p["cope_rougeL"] for p in sweep["points"].values())
    tuned = sweep["points"].pop("tuned")  # one point for everyone, chosen on the other half of the queries
    assert set(tuned["points_chosen"]) <= set(sweep["points"]) and tuned["n"] == 4
    assert "| per user | per user |" in md and "| tuned | tuned |" in md
    assert md.index("| tuned | tuned |") < md.index("per user: each user's point")  # the table, then the notes
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(rows) + 1 + 12 and json.loads(lines[-1])["settings"]["protect"] == "eos"
    # the contrast on the SFT adapter (oppu+cd) can be swept too: only its new alpha is decoded
    assert main(["eval", "sweep", "--data", str(data), "--out", str(out), "--alpha", "0.5", "--tau", "0.1",
                 "--method", "oppu+cd", "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sweep["generated"] == 4 and "swept: oppu+cd" in (out / "sweep.md").read_text()
    # a repetition penalty applies to both rows compared: oppu and oppu+cd are decoded again
    assert main(["eval", "sweep", "--data", str(data), "--out", str(out), "--alpha", "0.5", "--tau", "0.1",
                 "--method", "oppu+cd", "--repetition-penalty", "1.3", "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sweep["generated"] == 8 and set(sweep["points"]) == {"0.5,0.1,rp1.3"}
    # so does no_repeat_ngram (n = 1: no token twice)
    assert main(["eval", "sweep", "--data", str(data), "--out", str(out), "--alpha", "0.5", "--tau", "0.1",
                 "--method", "oppu+cd", "--no-repeat-ngram", "1", "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sweep["generated"] == 8 and set(sweep["points"]) == {"0.5,0.1,nr1"}
    assert "| 0.5 | 0.1 | off | none | 1 | 1 |" in (out / "sweep.md").read_text()
    assert sum(r["settings"].get("no_repeat_ngram") == 1 for r in read_rows(out / "results.jsonl")) == 8
    # and the adapter's weight in the expert: at scale 0 the expert is the base, so OPPU writes the base's text
    assert main(["eval", "sweep", "--data", str(data), "--out", str(out), "--alpha", "0.5", "--tau", "0.1",
                 "--method", "oppu+cd", "--adapter-scale", "0", "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sweep["generated"] == 8 and set(sweep["points"]) == {"0.5,0.1,s0"}
    scaled = [r for r in read_rows(out / "results.jsonl") if r["settings"].get("adapter_scale") == 0]
    assert sorted(r["method"] for r in scaled) == ["oppu"] * 4 + ["oppu+cd"] * 4
    assert all(r["output"] == base[(r["user_id"], r["query_id"])] for r in scaled if r["method"] == "oppu")
    assert "| 0.5 | 0.1 | off | none | 1 | off | 0 |" in (out / "sweep.md").read_text()
    # without --json: a line per point, the per-user choice included, all cached now (oppu and cope per point)
    assert main(["eval", "sweep", "--data", str(data), "--out", str(out), "--alpha", "0.7,0.5", "--tau", f"{tau:g}"]) == 0
    printed = capsys.readouterr().out
    assert f"  0.5,{tau} " in printed and "  per-user " in printed and "0 generated, 16 cached" in printed

    # compare: sides from this run and from a second folder (a copy of its rows), paired by query
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(out / "results.jsonl", other / "results.jsonl")
    assert main(["eval", "compare", f"{out}:base", f"{other}:cope:alpha=0.7", f"{out}:oppu:adapter_scale=0",
                 f"{out}:oppu+cd:alpha=0.5,protect=none", "--report", str(tmp_path / "cmp.md"), "--json"]) == 0
    cmp = json.loads(capsys.readouterr().out)
    assert cmp["users"] == 2 and cmp["queries"] == 4 and cmp["attribution_of_real_texts"] >= 0.5
    sides = cmp["sides"]
    assert sides["out:base"]["rougeL"] == pytest.approx(first["methods"]["base"]["rougeL"])
    for side in sides.values():  # every figure of a side with its bootstrap CI around it
        for key in ("rouge1", "rougeL", "attribution", "length_ratio"):
            assert side[f"{key}_ci"][0] <= side[key] <= side[f"{key}_ci"][1], key
    assert sides["other:cope:alpha=0.7"]["rougeL"] == pytest.approx(first["methods"]["cope"]["rougeL"])
    assert sides["other:cope:alpha=0.7"]["diff"] == pytest.approx(
        first["methods"]["cope"]["rougeL"] - first["methods"]["base"]["rougeL"])
    zero = sides["out:oppu:adapter_scale=0"]  # the base's own texts: no difference at all
    assert zero["same_output"] == 4 and zero["diff"] == 0 and zero["query_ci"] == [0, 0]
    assert "| out:oppu+cd:alpha=0.5,protect=none - out:base |" in (tmp_path / "cmp.md").read_text()
    # the sweep's per-user rows (its last run: alpha 0.7 or 0.5 per user) are a side too, as they are
    assert main(["eval", "compare", f"{out}:cope:alpha=0.7", f"{out}:cope:alpha=0.5",
                 f"{out}/sweep-per-user.jsonl:cope", "--json"]) == 0
    picks = json.loads(capsys.readouterr().out)["sides"]
    low, high = sorted(picks[f"out:cope:alpha={a}"]["rougeL"] for a in ("0.7", "0.5"))
    assert low <= picks["out/sweep-per-user:cope"]["rougeL"] <= high
    # without @handles (these tweets have none): the same figures, said so
    assert main(["eval", "compare", f"{out}:base", f"{other}:cope:alpha=0.7", "--drop-mentions", "--json"]) == 0
    bare = json.loads(capsys.readouterr().out)
    assert bare["mentions"] is False and bare["sides"]["other:cope:alpha=0.7"] == sides["other:cope:alpha=0.7"]
    assert main(["eval", "compare", f"{out}:base", f"{out}:cope:alpha=0.9"]) == 2  # no such rows
    assert "no rows of method cope" in capsys.readouterr().err
    assert main(["eval", "compare", f"{out}:base", f"{out}:nope"]) == 2
    assert main(["eval", "sweep", "--data", str(data), "--out", str(out), "--no-repeat-ngram", "x"]) == 2


def test_eval_run_with_tams_one_per_fold_never_trained_on_its_users(tmp_path, capsys, no_network, _eval_env):
    """The default protocol (no --no-tam): each fold's TAM is trained on the other fold's users only,
    and is the amateur (and the `tam` row) of its own fold's users."""
    import hashlib

    from cope_local.cli import main
    from cope_local.eval.results import read_rows

    data = tmp_path / "users.jsonl"  # ann is in fold B, cat and dup in fold A; dup has too little history
    dup = {**_user_row("dup"), "profile": [{"text": "same tweet again #dup"}] * 10}
    data.write_text("".join(json.dumps(_user_row(u, n_queries=2)) + "\n" for u in ("ann", "cat"))
                    + json.dumps(dup) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["eval", "run", "--data", str(data), "--out", str(out), "--methods", "base,tam,oppu,oppu+cd",
            "--max-steps", "1", "--max-tokens", "8", "--set", "tam.lr=0.01", "--set", "max_target_tokens=32", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # dup is skipped, as a user and as a donor of fold B's TAM, and does not stop the run
    assert list(summary["skipped"]) == ["dup"] and "need at least 8" in summary["skipped"]["dup"]
    assert [(t["fold"], t["users"], t["items"]) for t in summary["phases"]["tam"]] == [("A", 1, 10), ("B", 1, 10)]
    for fold, own, donor in (("A", "cat", "ann"), ("B", "ann", "cat")):
        items = (out / "tams" / f"fold-{fold}" / "items.jsonl").read_text()
        assert f"#{donor}" in items and f"#{own}" not in items and "#dup" not in items
    rows = list(read_rows(out / "results.jsonl"))
    assert len(rows) == 2 * 2 * 4
    tam_sha = {f: hashlib.sha256((out / "tams" / f"fold-{f}" / "tam.gguf").read_bytes()).hexdigest() for f in "AB"}
    for r in rows:  # the user's own fold's TAM, in every row but the base's
        fold = "B" if r["user_id"] == "ann" else "A"
        assert r["settings"]["tam"] == ("none" if r["method"] == "base" else tam_sha[fold])
        assert r["settings"]["tam_split"].startswith(f"fold {fold} ")
    out_of = lambda m: {(r["user_id"], r["query_id"]): r["output"] for r in rows if r["method"] == m}
    assert out_of("tam") != out_of("base")  # the TAM (one step at lr 1e-2) is a different amateur
    table = (out / "table.md").read_text()
    assert "TAM split: 2-fold by sha256(user_id)" in table and "- cope - tam" not in table  # no cope row asked for


def test_a_user_with_too_little_history_is_skipped_not_fatal(tmp_path, capsys, no_network, _eval_env):
    from cope_local.cli import main
    from cope_local.eval.results import read_rows

    dup = {**_user_row("dup"), "profile": [{"text": "same tweet again #dup"}] * 10}  # one distinct text
    data = tmp_path / "users.jsonl"
    data.write_text(json.dumps(dup) + "\n" + json.dumps(_user_row("ann")) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["eval", "run", "--data", str(data), "--out", str(out), "--no-tam", "--methods", "base",
                 "--max-steps", "1", "--max-tokens", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["users"] == 1 and list(summary["skipped"]) == ["dup"] and "need at least 8" in summary["skipped"]["dup"]
    assert "cope profile delete" not in summary["skipped"]["dup"]  # no profile to delete: a benchmark user
    assert {r["user_id"] for r in read_rows(out / "results.jsonl")} == {"ann"}
    assert "- skipped: dup (" in (out / "table.md").read_text()
    # a sweep on that run skips the same user and names it (it used to stop at the user's missing adapters)
    assert main(["eval", "sweep", "--data", str(data), "--out", str(out), "--method", "oppu+cd", "--alpha", "0.5",
                 "--tau", "0.1", "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sweep["users"] == 1 and list(sweep["skipped"]) == ["dup"] and sweep["generated"] == 2
    assert "- skipped: dup (" in (out / "sweep.md").read_text()


def test_sweep_without_a_run_says_what_to_do(tmp_path, capsys):
    from cope_local.cli import main

    data = tmp_path / "users.jsonl"
    data.write_text(json.dumps(_user_row("ann")) + "\n", encoding="utf-8")
    assert main(["eval", "sweep", "--data", str(data), "--out", str(tmp_path / "none")]) == 2
    assert "run `cope eval run` first" in capsys.readouterr().err


def test_worker_stderr_lines_name_their_user():
    import io

    from cope_local.eval.runner import _PrefixedLines

    sink = io.StringIO()
    err = _PrefixedLines(sink, "[ann] ")
    err.write("negatives: 4/44 items\ndpo: ")
    err.write("step 1/6\n[ann] sft: up to date\n\rbar 1\rbar 2\n")
    assert sink.getvalue() == ("[ann] negatives: 4/44 items\n[ann] dpo: step 1/6\n[ann] sft: up to date\n"
                               "\r[ann] bar 1\r[ann] bar 2\n")


def test_workers_take_the_largest_users_first():
    from cope_local.eval.runner import Job, largest_first
    from cope_local.ingest.items import HistoryItem

    def user(uid, n):
        items = [HistoryItem(id=f"{uid}{i}", input=None, output="x", source="t") for i in range(n)]
        return EvalUser(user_id=uid, task="lamp7", history=items, queries=[])

    jobs = [Job("user", None, None, user(uid, n)) for uid, n in [("a", 3), ("b", 40), ("c", 7), ("d", 40), ("e", 1)]]
    assert largest_first(jobs) == [1, 3, 2, 0, 4]  # 40 (file order among ties), 40, 7, 3, 1
    assert largest_first([Job("tam", None, None, fold="A"), jobs[4]]) == [1, 0]  # no user: size 0
