#!/usr/bin/env python3
"""The memory estimate against measured peak RSS over a sweep of configs on the default model.

For each config: a run.toml in a fresh TUNEBENCH_HOME, `tunebench estimate --json`, then a
two-step `tunebench train --no-heldout` whose own peak RSS is measured (tbcommon.run_measured).
Prints measured, predicted and the error per config; --write-results appends a dated section to
bench/RESULTS.md. What the estimate's fitted constants (src/api/estimate.rs) are refit on.

Usage: python3 bench/estimate_sweep.py [--tunebench PATH] [--only SUBSTR ...] [--list]
                                       [--write-results]
Needs only the Python standard library and the default model (no PyTorch).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tbcommon as tb  # noqa: E402

RESULTS = os.path.join(tb.ROOT, "bench", "RESULTS.md")

LORA = 'method = "lora"\nr = 16\nlora_alpha = 32\ntarget_modules = "all-linear"'
LORA12 = 'method = "lora"\nr = 12\nlora_alpha = 16\ntarget_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]'
DORA = LORA + "\nuse_dora = true"
DORA_DROP = DORA + "\nlora_dropout = 0.1"
DORA8_DROP = 'method = "lora"\nr = 8\nlora_alpha = 16\nuse_dora = true\nlora_dropout = 0.1\ntarget_modules = ["q_proj", "v_proj", "down_proj"]'

# (label, batch, max_len, dtype, [peft] lines, extra [train] lines)
CONFIGS = [
    ("lora-f32-8x256", 8, 256, "f32", LORA, ""),
    ("lora-bf16-3x96", 3, 96, "bf16", LORA, ""),
    ("lora-bf16-8x256", 8, 256, "bf16", LORA, ""),
    ("lora12-bf16-3x200", 3, 200, "bf16", LORA12, ""),
    ("lora-bf16-6x160-checkpointed", 6, 160, "bf16", LORA, "gradient_checkpointing = true"),
    ("dora-f32-8x256", 8, 256, "f32", DORA, ""),
    ("dora-bf16-4x256", 4, 256, "bf16", DORA, ""),
    ("dora-dropout-bf16-3x96", 3, 96, "bf16", DORA_DROP, ""),
    ("dora-dropout-bf16-8x256", 8, 256, "bf16", DORA_DROP, ""),
    ("dora-dropout-f32-3x96", 3, 96, "f32", DORA_DROP, ""),
    ("dora-dropout-f32-4x256", 4, 256, "f32", DORA_DROP, ""),
    ("dora-dropout-f32-8x256", 8, 256, "f32", DORA_DROP, ""),
    ("dora8-dropout-f32-2x192", 2, 192, "f32", DORA8_DROP, ""),
    ("dora8-dropout-f32-3x160", 3, 160, "f32", DORA8_DROP, ""),
    ("ia3-bf16-4x256", 4, 256, "bf16", 'method = "ia3"', ""),
    ("houlsby-bf16-5x144", 5, 144, "bf16", 'method = "adapter"\nplacement = "houlsby"', ""),
    ("p-tuning-v2-bf16-6x112", 6, 112, "bf16", 'method = "p_tuning_v2"\nnum_virtual_tokens = 12', ""),
    ("adalora-bf16-4x192", 4, 192, "bf16", 'method = "adalora"\ntarget_modules = "all-linear"', ""),
]

WORDS = ["the", "model", "learns", "from", "data", "and", "every", "token", "counts", "when", "training", "on",
         "long", "text"]


def long_texts(path: str) -> None:
    """Long plain-text records (tests/estimate.rs's), so every batch is padded to max_len."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(24):
            text = " ".join(WORDS[(i * 7 + j * 3 + j // 5) % len(WORDS)] for j in range(600))
            f.write(json.dumps({"text": text}) + "\n")


def run_toml(model: str, data: str, batch: int, max_len: int, dtype: str, peft: str, extra: str) -> str:
    train = f"max_steps = 2\nbatch_size = {batch}\ndtype = \"{dtype}\"\n" + (extra + "\n" if extra else "")
    return (f'name = "sweep"\n[model]\npath = {json.dumps(model)}\n[data]\npath = {json.dumps(data)}\n'
            f"max_len = {max_len}\nval_fraction = 0.0\n[peft]\n{peft}\n[train]\n{train}[eval]\nbefore = false\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tunebench", default=tb.default_binary(), help="the tunebench binary")
    ap.add_argument("--model", default=tb.default_model())
    ap.add_argument("--only", nargs="*", default=[], help="run the configs whose label contains any of these")
    ap.add_argument("--list", action="store_true", help="list the configs and exit")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to bench/RESULTS.md")
    args = ap.parse_args()
    if args.list:
        for c in CONFIGS:
            print(c[0])
        return 0
    exe = tb.binary_argv(args.tunebench)
    tb.require_file(args.model, "default model", "run the README's first command to fetch it")
    chosen = [c for c in CONFIGS if not args.only or any(o in c[0] for o in args.only)]
    if not chosen:
        tb.die(f"no config matches {args.only} (see --list)")
    mach = tb.machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tunebench-sweep-") as work:
        data = os.path.join(work, "long.jsonl")
        long_texts(data)
        for label, batch, max_len, dtype, peft, extra in chosen:
            home = tempfile.mkdtemp(dir=work)
            cfg = os.path.join(home, "run.toml")
            with open(cfg, "w", encoding="utf-8") as f:
                f.write(run_toml(args.model, data, batch, max_len, dtype, peft, extra))
            env = dict(os.environ, TUNEBENCH_HOME=home)
            est = tb.run_measured(exe + ["estimate", "--config", cfg, "--json"], env=env).check(f"{label}: estimate")
            memory = json.loads(est.stdout)["memory"]  # pretty-printed, not one line
            predicted = memory["total_bytes"]
            run = tb.run_measured(exe + ["train", "--config", cfg, "--no-heldout"], env=env).check(f"{label}: train")
            measured = run.peak_rss_bytes
            err = predicted / measured - 1.0
            rows.append((label, measured, predicted, err))
            print(f"{label:30s} measured {measured / 2**20:7.0f} MiB  predicted {predicted / 2**20:7.0f} MiB  "
                  f"{100 * err:+6.1f}%", flush=True)
    errs = [r[3] for r in rows]
    summary = f"{len(rows)} configs: {100 * min(errs):+.1f}% to {100 * max(errs):+.1f}%"
    print(summary)
    if args.write_results:
        lines = [
            *tb.section_head(f"memory estimate against measured peak RSS, {summary}", mach,
                             f"python3 bench/estimate_sweep.py {shlex.join(sys.argv[1:])}"),
            f"- tunebench: {tb.tunebench_version(exe) or '(no --version)'}, git {tb.git_rev() or '?'}; "
            "two training steps a config, the default model, tests/estimate.rs's long texts",
            "",
            "| config | measured peak | predicted | error |",
            "|---|---|---|---|",
            *[f"| {r[0]} | {r[1] / 2**20:.0f} MiB | {r[2] / 2**20:.0f} MiB | {100 * r[3]:+.1f}% |" for r in rows],
            "",
        ]
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write("\n".join(lines))
        print(f"appended to {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
