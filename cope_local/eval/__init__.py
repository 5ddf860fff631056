"""`cope eval`: the benchmark harness (LaMP / LongLaMP users -> per-user adapters -> ROUGE by method).

    data.py      users, held-out items, the 2-fold TAM split
    runner.py    the run: pipeline stages per user and per TAM fold, parallel jobs
    generate.py  decoding every query by every method, cached in results.jsonl (results.py)
    metrics.py   ROUGE and bootstrap CIs;  report.py  table.md and rougeL.png;  sweep.py  alpha/tau grid

Nothing here is imported by `cope_local.cli` at start-up; torch loads only when training runs.
"""
