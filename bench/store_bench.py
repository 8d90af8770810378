#!/usr/bin/env python3
"""Run-store benchmarks, each against a reference in the same script run.

1. Metric recording cost: a real training run on the default model (the quickstart preset,
   short) through the worker path; the worker reports the seconds it spent writing to the
   store; reported as a share of the training time (goal < 1%).
2. Querying and charting a run with 1,000,000 metric points (goal < 200 ms): `tunebench
   bench-store` records a run of 250,000 steps × 4 metrics, then times reading them and
   rendering the run chart; the reference is Python's sqlite3 reading the same loss series
   from the same file.
3. Importing a ~100 MB JSONL dataset: `tunebench datasets import` (hash + validate + template
   + tokenize every record) with its peak RSS; the reference is Python reading and
   json-parsing every line of the same file (no tokenization), with its peak RSS.

Usage: python3 bench/store_bench.py [--bin target/release/tunebench] [--points 1000000]
       [--import-mb 100] [--train-steps 20]
Prints a Markdown block for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sqlite3
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tbcommon import ROOT, binary_argv, default_binary, default_model, require_file, run_measured  # noqa: E402


def link_default_model(home: str) -> None:
    models = os.path.join(home, "models")
    os.makedirs(models, exist_ok=True)
    link = os.path.join(models, os.path.basename(default_model()))
    if not os.path.exists(link):
        os.symlink(default_model(), link)


def recording_cost(tb: list[str], home: str, steps: int) -> dict:
    env = dict(os.environ, TUNEBENCH_HOME=home)
    link_default_model(home)
    r = run_measured(tb + ["train", "--preset", "quickstart", "--max-steps", str(steps), "--no-heldout", "--json"], env=env)
    r.check("training run")
    runs = json.loads(run_measured(tb + ["runs", "list", "--json"], env=env).check("runs list").stdout)
    run = runs[0]
    fm = run["final_metrics"]
    return {
        "steps": run["step"],
        "train_s": run["elapsed_s"],
        "recording_s": fm["recording_s"],
        "share": fm["recording_s"] / run["elapsed_s"],
        "step_s": run["elapsed_s"] / max(run["step"], 1),
    }


def query_and_chart(tb: list[str], home: str, points: int) -> dict:
    # `points` metric points in all: points/4 steps of loss, lr, grad_norm and tokens/s.
    r = run_measured(tb + ["bench-store", "--home", home, "--points", str(points // 4)]).check("bench-store")
    ours = json.loads(r.stdout.strip().splitlines()[-1])
    con = sqlite3.connect(ours["db"])
    times = []
    for _ in range(3):
        t = time.perf_counter()
        rows = con.execute(
            "SELECT step, tokens, wall_s, value FROM metrics WHERE run_id = ? AND name = 'loss' ORDER BY step",
            (ours["run_id"],),
        ).fetchall()
        times.append(time.perf_counter() - t)
        assert len(rows) == points // 4, len(rows)
    con.close()
    ours["reference_query_s"] = min(times)
    return ours


def make_jsonl(path: str, mb: int) -> int:
    persona = [json.loads(l) for l in open(os.path.join(ROOT, "assets/datasets/persona/train.jsonl"))]
    rnd = random.Random(7)
    n = 0
    with open(path, "w") as f:
        while f.tell() < mb * (1 << 20):
            rec = rnd.choice(persona)
            msgs = [dict(m) for m in rec["messages"]]
            for m in msgs:
                if m["role"] == "user":
                    m["content"] = f"{m['content']} (variant {n})"
                if m["role"] == "assistant":
                    m["content"] = m["content"] + " " + " ".join(rnd.choice(["Indeed.", "Of course.", "Happy to help.", "请继续。"]) for _ in range(rnd.randint(0, 30)))
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
            n += 1
    return n


REFERENCE_READER = r"""
import json, sys
n = 0
with open(sys.argv[1], encoding="utf-8") as f:
    for line in f:
        if line.strip():
            json.loads(line)
            n += 1
print(n)
"""


def import_big(tb: list[str], home: str, mb: int) -> dict:
    path = os.path.join(home, f"big-{mb}mb.jsonl")
    rows = make_jsonl(path, mb)
    size = os.path.getsize(path)
    env = dict(os.environ, TUNEBENCH_HOME=home)
    link_default_model(home)
    r = run_measured(tb + ["datasets", "import", path, "--json", "--max-len", "512"], env=env).check("datasets import")
    rec = json.loads(r.stdout)
    assert rec["rows"] == rows, (rec["rows"], rows)
    ref = run_measured([sys.executable, "-c", REFERENCE_READER, path]).check("reference reader")
    assert int(ref.stdout.strip()) == rows
    return {
        "bytes": size, "rows": rows, "tokens": rec["tokens"],
        "s": r.seconds, "peak_rss": r.peak_rss_bytes,
        "ref_s": ref.seconds, "ref_peak_rss": ref.peak_rss_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=default_binary())
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--import-mb", type=int, default=100)
    ap.add_argument("--train-steps", type=int, default=20)
    a = ap.parse_args()
    tb = binary_argv(a.bin)
    require_file(default_model(), "default model", "run scripts/setup")
    mib = lambda b: b / (1 << 20)
    with tempfile.TemporaryDirectory() as t1, tempfile.TemporaryDirectory() as t2, tempfile.TemporaryDirectory() as t3:
        rec = recording_cost(tb, t1, a.train_steps)
        q = query_and_chart(tb, t2, a.points)
        imp = import_big(tb, t3, a.import_mb)
    print(f"### Run store — {datetime.date.today()} — {platform.node()} ({os.cpu_count()} cores)\n")
    print(f"`python3 bench/store_bench.py --points {a.points} --import-mb {a.import_mb} --train-steps {a.train_steps}` (release build)\n")
    print("| measure | tunebench | reference | ratio |")
    print("|---|---|---|---|")
    print(f"| metric recording, quickstart {rec['steps']} steps | {rec['recording_s']*1000:.1f} ms of {rec['train_s']:.1f} s training | training step {rec['step_s']*1000:.0f} ms | **{100*rec['share']:.3f}%** of training time |")
    print(f"| record {q['rows']:,} metric points ({q['points']:,} steps × 4, {q['batch']} steps/transaction) | {q['write_s']:.2f} s ({q['write_per_batch_s']*1000:.2f} ms per transaction) | – | – |")
    print(f"| query the loss series ({q['points']:,} points) | {q['query_s']*1000:.0f} ms | Python sqlite3 {q['reference_query_s']*1000:.0f} ms | {q['query_s']/q['reference_query_s']:.2f}x |")
    print(f"| query all {q['rows']:,} points (4 series) | {q['query_all_s']*1000:.0f} ms | – | – |")
    print(f"| query all + run chart (LTTB to ≤2k points per series) → SVG | **{q['chart_svg_s']*1000:.0f} ms** | – | goal < 200 ms |")
    print(f"| query + chart → PNG 960×720 | {q['chart_png_s']*1000:.0f} ms | – | – |")
    print(f"| import {mib(imp['bytes']):.0f} MB JSONL ({imp['rows']:,} rows, {imp['tokens']:,} tokens): time | {imp['s']:.1f} s (hash, validate, template, tokenize) | Python json.loads per line {imp['ref_s']:.1f} s (parse only) | {imp['s']/imp['ref_s']:.2f}x |")
    print(f"| import: peak RSS | **{mib(imp['peak_rss']):.0f} MiB** | {mib(imp['ref_peak_rss']):.0f} MiB | {imp['peak_rss']/imp['ref_peak_rss']:.2f}x |")


if __name__ == "__main__":
    main()
