#!/usr/bin/env python3
"""Every PEFT method on the default model, same task and budget, side by side.

Each method trains on the bundled persona sample (the quickstart's data and held-out prompts)
for the same number of steps, batch size and sequence length, in its own `tunebench train`
process recorded in a fresh run store; the table comes from `tunebench compare --json`:
trainable parameters, tokens/s, peak memory, final validation loss and held-out accuracy
(answers naming "Tessel" / "Marrowfield Labs"). The learning rate is each method's usual
range (IA3 and BitFit train a few thousand parameters and want a larger one).

Usage: python3 bench/methods_bench.py [--bin target/release/tunebench] [--steps 30]
       [--lr LR] [--methods lora,dora,adalora,ia3,bitfit,qlora,adapter,adapter-pfeiffer,prompt_tuning,p_tuning,prefix_tuning,p_tuning_v2,full]
Prints a Markdown block for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sqlite3
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tbcommon import ROOT, binary_argv, default_binary, default_model, require_file, run_measured  # noqa: E402

METHODS = {
    "lora": ('method = "lora"\nr = 16\nlora_alpha = 32\ntarget_modules = "all-linear"', 1e-3),
    "dora": ('method = "lora"\nr = 16\nlora_alpha = 32\ntarget_modules = "all-linear"\nuse_dora = true', 1e-3),
    # Starts at init_r 16 (LoRA's rank above) and ends at 8 per layer on average. Λ starts at 0
    # and P, Q at N(0, 0.02²): at LoRA's 1e-3 it barely moves in 30 steps (RESULTS.md).
    "adalora": ('method = "adalora"\ninit_r = 16\ntarget_r = 8\nlora_alpha = 32\ntarget_modules = "all-linear"\ntinit = 6\ntfinal = 6', 1e-2),
    "ia3": ('method = "ia3"\ntarget_modules = ["k_proj", "v_proj", "down_proj"]\nfeedforward_modules = ["down_proj"]', 1e-2),
    "bitfit": ('method = "bitfit"\ntarget_modules = "all-linear"', 5e-3),
    "qlora": ('method = "qlora"\nr = 16\nlora_alpha = 32\ntarget_modules = "all-linear"', 1e-3),
    "adapter": ('method = "adapter"\nplacement = "houlsby"\nbottleneck_size = 64', 1e-3),
    "adapter-pfeiffer": ('method = "adapter"\nplacement = "pfeiffer"\nbottleneck_size = 64', 1e-3),
    # Prompt learning trains few parameters far from the output and wants a larger rate.
    "prompt_tuning": ('method = "prompt_tuning"\nnum_virtual_tokens = 20', 3e-2),
    "p_tuning": ('method = "p_tuning"\nnum_virtual_tokens = 20', 5e-3),
    "prefix_tuning": ('method = "prefix_tuning"\nnum_virtual_tokens = 20', 3e-3),
    "p_tuning_v2": ('method = "p_tuning_v2"\nnum_virtual_tokens = 20', 3e-2),
    # Every weight trains: the usual full fine-tuning range.
    "full": ('method = "full"', 5e-5),
}


def config(name: str, peft: str, lr: float, steps: int) -> str:
    data = os.path.join(ROOT, "assets/datasets/persona")
    return f"""name = "{name}"
seed = 42
[data]
path = "{data}/train.jsonl"
max_len = 128
val_fraction = 0.08
val_max = 16
[peft]
{peft}
[train]
max_steps = {steps}
batch_size = 8
lr = {lr}
warmup_steps = 4
schedule = "cosine"
eval_steps = {steps}
save_steps = {steps}
[eval]
prompts = "{data}/eval.jsonl"
max_new_tokens = 32
before = false
samples = 0
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=default_binary())
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lr", type=float, default=None, help="one learning rate for every method (default: each method's own)")
    a = ap.parse_args()
    tb = binary_argv(a.bin)
    require_file(default_model(), "default model", "run scripts/setup")
    methods = [m for m in a.methods.split(",") if m]
    with tempfile.TemporaryDirectory() as home:
        os.makedirs(os.path.join(home, "models"))
        os.symlink(default_model(), os.path.join(home, "models", os.path.basename(default_model())))
        env = dict(os.environ, TUNEBENCH_HOME=home)
        ids = []
        for m in methods:
            peft, lr = METHODS[m]
            lr = a.lr if a.lr is not None else lr
            path = os.path.join(home, f"{m}.toml")
            with open(path, "w") as f:
                f.write(config(m, peft, lr, a.steps))
            print(f"training {m} ({a.steps} steps, lr {lr:g})", file=sys.stderr)
            run_measured(tb + ["train", "--config", path, "--json"], env=env).check(f"train {m}")
            runs = json.loads(run_measured(tb + ["runs", "list", "--json"], env=env).check("runs list").stdout)
            ids.append(runs[0]["id"])
        c = json.loads(run_measured(tb + ["compare", *map(str, ids), "--json"], env=env).check("compare").stdout)
        runs = {r["id"]: r for r in json.loads(run_measured(tb + ["runs", "list", "--json"], env=env).stdout)}
        con = sqlite3.connect(os.path.join(home, "tunebench.db"))
        first_loss = {i: con.execute("SELECT value FROM metrics WHERE run_id = ? AND name = 'loss' ORDER BY step LIMIT 1",
                                     (i,)).fetchone()[0] for i in ids}
        con.close()
    print(f"### PEFT methods on the default model — {datetime.date.today()} — {platform.node()} ({os.cpu_count()} cores)\n")
    print(f"`python3 bench/methods_bench.py --steps {a.steps}`: persona sample, batch 8, max_len 128, "
          f"{a.steps} steps, cosine schedule with 4 warm-up steps; held-out = 50 prompts, greedy, 32 tokens\n")
    print("| method | lr | trainable params | % of base | tokens/s | peak RSS | first → final train loss | final val loss | held-out accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, row in zip(methods, c["table"]):
        r = runs[row["run_id"]]
        first, last = first_loss[row["run_id"]], r["final_metrics"].get("final_loss")
        lr = a.lr if a.lr is not None else METHODS[m][1]
        print(f"| {m} | {lr:g} | {row['trainable_params']:,} | {row['trainable_pct']:.3f}% | {row['tokens_per_s']:.0f} | "
              f"{row['peak_rss_bytes'] / 2**30:.2f} GiB | {first:.3f} → {last:.3f} | {row['final_val_loss']:.3f} | "
              f"{100 * (row['heldout_after'] or 0):.0f}% |")


if __name__ == "__main__":
    main()
