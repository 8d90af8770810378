"""CPU LoRA training benchmark: Tunebench vs PyTorch + PEFT, side by side, in one run.

Both sides train the same weights (the default GGUF, dequantized to float32; the reference
loads it with transformers) on the same batches: real text (the Alpaca demo records of
../shared/data/alpaca_en_demo.json, shuffled with a fixed seed, tokenized, joined with
<|im_end|> and cut into rows), saved as one safetensors file with an int64 tensor
`input_ids` of shape [n_batches, batch, seq]. Step i trains on batch i. Loss: mean causal-LM
cross-entropy over all batch*(seq-1) next-token predictions (labels = input_ids, no masking).
LoRA with dropout 0 on the chosen projections, AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8,
weight decay 0), float32, torch threads = cores. Warm up W steps, time the next K steps;
tokens/s = batch*seq*K / (wall time of those K steps, each = forward + backward + optimizer).

Each side runs in its own child process; its peak RSS is that child's own ru_maxrss
(os.wait4), so the two numbers are separate. Ours is
  tunebench bench-train --model GGUF --batches F --rank R --alpha A --targets all-linear|q_proj,v_proj
      --lr 1e-4 --warmup-steps W --steps K
which prints one JSON line {"tokens_per_s": float, "peak_rss_bytes": int, "losses": [float, ...]}.

Anchor shapes:
  "$py" bench/cpu_lora_bench.py                                    # 4x256, r16, all 7 projections
  "$py" bench/cpu_lora_bench.py --batch 2 --seq 128 --rank 8 --targets q,v
  "$py" bench/cpu_lora_bench.py --batch 8 --seq 256 --gradient-checkpointing   # both sides checkpoint
  "$py" bench/cpu_lora_bench.py --batch 8 --seq 256 --dropout 0.05              # LoRA dropout, both sides
  "$py" bench/cpu_lora_bench.py --batch 8 --seq 256 --dora                      # DoRA (use_dora), both sides
  "$py" bench/cpu_lora_bench.py --batch 8 --seq 256 --method ia3                 # another method (below)

--method trains another method on both sides instead of LoRA (the LoRA options are then unused):
  ia3            IA3 on k, v (outputs) and down (input): PEFT's IA3Config, ours `method = "ia3"`
  ia3-head       the same and the LM head's output (its loss: chunk by chunk on our side)
  p_tuning_v2    20 trained key/value prefixes per layer, no reparameterisation: PEFT's
                 PrefixTuningConfig (prefix_projection off), ours `method = "p_tuning_v2"`
  prompt_tuning  20 trained input embeddings: PEFT's PromptTuningConfig, ours `method = "prompt_tuning"`
                 (the two initialise them differently, so their losses differ)
  full           every weight (embedding and norms included), plain PyTorch, ours `method = "full"`
Options: --reference-only (PyTorch side alone), --write-results (append to bench/RESULTS.md),
--tunebench PATH (default $TUNEBENCH_BIN or target/release/tunebench), --steps, --warmup.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import shutil
import statistics
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tbcommon as tb  # noqa: E402
from tbcommon import git_rev, machine, parse_json_line, tunebench_version  # noqa: E402

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# --method: (our [peft] lines, a label); the reference's config is built in reference_train.
METHODS = {
    "lora": (None, "LoRA"),
    "ia3": ('method = "ia3"', "IA3 on k, v, down"),
    "ia3-head": ('method = "ia3"\ntarget_modules = ["k_proj", "v_proj", "down_proj", "lm_head"]\nfeedforward_modules = ["down_proj"]',
                 "IA3 on k, v, down and the LM head"),
    "p_tuning_v2": ('method = "p_tuning_v2"\nnum_virtual_tokens = 20', "P-tuning v2 (prefix tuning without reparameterisation), 20 tokens"),
    "prompt_tuning": ('method = "prompt_tuning"\nnum_virtual_tokens = 20', "prompt tuning, 20 tokens"),
    "full": ('method = "full"', "full fine-tuning"),
}
DEFAULT_DATA = os.path.join(os.path.dirname(tb.ROOT), "shared", "data", "alpaca_en_demo.json")
RESULTS = os.path.join(tb.ROOT, "bench", "RESULTS.md")
GIB = 1024 ** 3


def parse_targets(spec: str) -> list[str]:
    if spec in ("all", "all-linear"):
        return list(ALL_TARGETS)
    out = []
    for t in spec.split(","):
        t = t.strip()
        name = t if t.endswith("_proj") or t == "lm_head" else f"{t}_proj"
        if name not in ALL_TARGETS and name != "lm_head":
            raise SystemExit(f"error: unknown target {t!r} (use all-linear or a list of {', '.join(ALL_TARGETS)}, lm_head)")
        out.append(name)
    return out


def make_batches(model_path: str, data_path: str, n_batches: int, batch: int, seq: int, seed: int, out: str) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    if not os.path.isfile(data_path):
        tb.die(f"benchmark text not found: {data_path} (the bench uses the Alpaca demo records of "
               "../shared/data/alpaca_en_demo.json beside the checkout; pass --data PATH)")
    records = json.load(open(data_path, encoding="utf-8"))
    texts = []
    for r in records:
        parts = [r.get("instruction", ""), r.get("input", ""), r.get("output", "")]
        texts.append("\n".join(p for p in parts if p))
    random.Random(seed).shuffle(texts)

    from transformers import AutoTokenizer

    tb.quiet_transformers()
    model_dir, name = os.path.split(os.path.abspath(model_path))
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=name)
    need = n_batches * batch * seq
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
        if len(ids) >= need:
            break
    if len(ids) < need:
        tb.die(f"{data_path} has only {len(ids)} tokens, the benchmark needs {need}")
    arr = np.asarray(ids[:need], dtype=np.int64).reshape(n_batches, batch, seq)
    save_file({"input_ids": arr}, out, metadata={
        "source": os.path.basename(data_path), "seed": str(seed), "tokenizer": name,
        "layout": "records shuffled with random.Random(seed), instruction/input/output joined by newlines, "
                  "tokenized without special tokens, each followed by <|im_end|>, concatenated, cut into rows",
        "loss": "mean causal-LM cross-entropy over all batch*(seq-1) next-token predictions",
    })


def reference_train(model_path: str, batches_path: str, rank: int, alpha: float, targets, lr: float,
                    warmup: int, steps: int, threads: int, checkpointing: bool = False, dropout: float = 0.0,
                    method: str = "lora", dora: bool = False) -> dict:
    """The PyTorch + PEFT side (runs in its own process). Returns tokens/s, losses, step times."""
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    targets = parse_targets(targets) if isinstance(targets, str) else list(targets)
    ids = load_file(batches_path)["input_ids"]
    if ids.dim() != 3 or ids.shape[0] < warmup + steps:
        raise SystemExit(f"error: {batches_path}: input_ids {list(ids.shape)}, need [>= {warmup + steps}, batch, seq]")
    model, _ = tb.load_hf(model_path, attn="sdpa")
    model.config.use_cache = False
    if checkpointing:
        # transformers' per-layer checkpointing (non-reentrant), as HF Trainer sets it up for PEFT.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(0)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method in ("ia3", "ia3-head"):
        from peft import IA3Config
        head = ["lm_head"] if method == "ia3-head" else []
        model = get_peft_model(model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"] + head,
                                                feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
    elif method == "p_tuning_v2":
        from peft import PrefixTuningConfig
        model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM"))
    elif method == "prompt_tuning":
        from peft import PromptTuningConfig
        model = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM"))
    else:
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                                 use_dora=dora, bias="none", task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses, times = [], []
    for i in range(warmup + steps):
        x = ids[i]
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(float(loss.item()))
        if i >= warmup:
            times.append(dt)
        print(f"reference step {i}: loss {losses[-1]:.4f} {dt:.2f}s{' (warm-up)' if i < warmup else ''}",
              file=sys.stderr, flush=True)
    b, s = ids.shape[1], ids.shape[2]
    return {"tokens_per_s": b * s * steps / sum(times), "losses": losses, "step_seconds": times,
            "trainable_params": sum(p.numel() for p in trainable), "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description="CPU LoRA training: Tunebench vs PyTorch+PEFT",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tunebench", default=tb.default_binary(),
                    help="tunebench binary (default: $TUNEBENCH_BIN or target/release/tunebench)")
    ap.add_argument("--model", default=tb.default_model(), help="GGUF file (default: %(default)s)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="Alpaca JSON for the batches (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 * rank)")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout rate, both sides (default: %(default)s)")
    ap.add_argument("--dora", action="store_true", help="DoRA (LoRA with use_dora), both sides")
    ap.add_argument("--targets", default="all-linear", help="all-linear, or a list such as q,v or q_proj,v_proj (lm_head too)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed of the batches (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: cores)")
    ap.add_argument("--method", choices=sorted(METHODS), default="lora",
                    help="the method both sides train (default: %(default)s; see above)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="both sides recompute each decoder layer in the backward")
    ap.add_argument("--reference-only", action="store_true", help="run only the PyTorch + PEFT side")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to bench/RESULTS.md")
    ap.add_argument("--keep", metavar="DIR", help="keep the batches file in DIR")
    ap.add_argument("--worker-reference", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batches", help=argparse.SUPPRESS)
    args = ap.parse_args()
    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    targets = parse_targets(args.targets)

    if args.worker_reference:  # child process: the PyTorch side
        res = reference_train(args.model, args.batches, args.rank, alpha, targets, args.lr, args.warmup,
                              args.steps, args.threads, args.gradient_checkpointing, args.dropout, args.method,
                              args.dora)
        res["peak_rss_bytes"] = tb.self_peak_rss_bytes()
        print(json.dumps(res))
        return 0

    tb.require_file(args.model, "model", "run scripts/setup")
    exe = None if args.reference_only else tb.binary_argv(args.tunebench)
    work = args.keep or tempfile.mkdtemp(prefix="tunebench-cpubench-")
    os.makedirs(work, exist_ok=True)
    n_batches = args.warmup + args.steps
    batches = os.path.join(work, f"batches-{n_batches}x{args.batch}x{args.seq}-seed{args.seed}.safetensors")
    make_batches(args.model, args.data, n_batches, args.batch, args.seq, args.seed, batches)
    mach = machine()
    if args.method == "lora":
        shape = f"{args.batch}x{args.seq}, {'DoRA' if args.dora else 'LoRA'} r{args.rank} alpha {alpha} on {','.join(t.removesuffix('_proj') for t in targets)}"
    else:
        shape = f"{args.batch}x{args.seq}, {METHODS[args.method][1]}"
    if args.dropout:
        shape += f", dropout {args.dropout:g}"
    if args.gradient_checkpointing:
        shape += ", gradient checkpointing"
    print(f"shape: {shape}; {args.warmup} warm-up + {args.steps} timed steps; batches {batches}", file=sys.stderr)
    if mach["load_avg"][0] > 1.0:
        print(f"warning: load average {mach['load_avg'][0]:.2f} before the run: other work on the machine skews timings",
              file=sys.stderr)

    sides = []
    ref_argv = [sys.executable, os.path.abspath(__file__), "--worker-reference", "--model", args.model,
                "--batches", batches, "--rank", str(args.rank), "--alpha", str(alpha), "--targets", ",".join(targets),
                "--lr", str(args.lr), "--warmup", str(args.warmup), "--steps", str(args.steps),
                "--threads", str(args.threads), "--dropout", str(args.dropout), "--method", args.method] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
    if args.dora:
        ref_argv.append("--dora")
    r = tb.run_measured(ref_argv, stream_stderr=True).check("PyTorch reference")
    ref = parse_json_line(r.stdout, "PyTorch reference")
    tokens_per_step = args.batch * args.seq
    sides.append(("pytorch+peft", ref["tokens_per_s"], r.peak_rss_bytes, ref["peak_rss_bytes"], ref["losses"],
                  ref["step_seconds"]))

    ours_cmd = None
    if exe:
        ours_targets = "all-linear" if targets == ALL_TARGETS else ",".join(targets)
        ours_argv = exe + ["bench-train", "--model", args.model, "--batches", batches, "--rank", str(args.rank),
                           "--alpha", str(alpha), "--targets", ours_targets, "--lr", str(args.lr),
                           "--warmup-steps", str(args.warmup), "--steps", str(args.steps), "--dropout", str(args.dropout)]
        if args.gradient_checkpointing:
            ours_argv.append("--gradient-checkpointing")
        if METHODS[args.method][0]:
            ours_argv += ["--peft", METHODS[args.method][0]]
        elif args.dora:
            ours_argv += ["--peft", f'method = "lora"\nr = {args.rank}\nlora_alpha = {alpha:g}\nlora_dropout = {args.dropout:g}\n'
                                    f'target_modules = {json.dumps("all-linear" if targets == ALL_TARGETS else targets)}\nuse_dora = true']
        ours_cmd = shlex.join(ours_argv)
        r = tb.run_measured(ours_argv, stream_stderr=True).check("tunebench bench-train")
        ours = parse_json_line(r.stdout, "tunebench bench-train")
        for key in ("tokens_per_s", "peak_rss_bytes", "losses"):
            if key not in ours:
                tb.die(f"tunebench bench-train: JSON line lacks {key!r}: {ours}", 1)
        sides.append(("tunebench", float(ours["tokens_per_s"]), r.peak_rss_bytes, int(ours["peak_rss_bytes"]),
                      [float(x) for x in ours["losses"]], ours.get("step_s")))

    # --- report -----------------------------------------------------------------------------
    # tok/s over the timed steps is the figure; the median-step one is shown too because it
    # shrugs off a step slowed by other work on the machine.
    lines = ["| impl | tok/s | tok/s (median step) | peak RSS (measured) | peak RSS (self-reported) | first-step loss | losses |",
             "|---|---|---|---|---|---|---|"]
    for name, tps, rss, rss_self, losses, secs in sides:
        med = f"{tokens_per_step / statistics.median(secs):.1f}" if secs else "-"
        lines.append(f"| {name} | {tps:.1f} | {med} | {rss / GIB:.2f} GiB | {rss_self / GIB:.2f} GiB | "
                     f"{losses[0]:.4f} | {' '.join(f'{x:.4f}' for x in losses)} |")
    if len(sides) == 2:
        (_, t0, m0, _, l0, _), (_, t1, m1, _, l1, _) = sides
        lines.append(f"| ours/pytorch | {t1 / t0:.2f}x | | {m1 / m0:.2f}x | | Δ {abs(l1[0] - l0[0]):.2e} | |")
    print(f"\nCPU training, {shape}, {args.steps} timed steps, {mach['nproc']} cores ({mach['cpu']})")
    print("\n".join(lines))
    print(f"reference step times (s): {' '.join(f'{x:.2f}' for x in ref['step_seconds'])}")
    # `tunebench estimate`'s peak for the same run, against the peak measured here.
    est_line = None
    if exe and ours.get("estimated_peak_bytes"):
        est, got = ours["estimated_peak_bytes"], sides[-1][2]
        est_line = f"- tunebench estimate for this run: {est / GIB:.2f} GiB peak, {100 * (est / got - 1):+.1f}% of the measured"
        print(est_line[2:])
    # (With dropout the two sides draw different masks, so their losses differ.)
    # (Prompt-learning methods initialise their virtual tokens differently on the two sides.)
    same_start = not args.dropout and args.method in ("lora", "ia3", "ia3-head", "full")
    if len(sides) == 2 and same_start and abs(sides[1][4][0] - sides[0][4][0]) > 1e-2:
        print("warning: first-step losses differ by more than 1e-2 although weights and batch are identical")

    if args.write_results:
        v = tb.versions()
        cmd = "bench/cpu_lora_bench.py " + shlex.join(sys.argv[1:])
        section = [
            *tb.section_head(f"CPU {'LoRA ' if args.method == 'lora' and not args.dora else ''}training, {shape}", mach,
                             f"py=$(scripts/pyenv | tail -n1); \"$py\" {cmd}"),
            f"- steps: {args.warmup} warm-up + {args.steps} timed; batches {args.batch}x{args.seq} of Alpaca demo text "
            f"(seed {args.seed}); AdamW lr {args.lr:g}, f32, torch threads {ref['threads']}",
            f"- reference: torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, python {v['python']}; "
            f"trainable params {ref['trainable_params']:,}",
        ]
        if exe:
            section.append(f"- tunebench: {tunebench_version(exe) or '(no --version)'}, git {git_rev() or '?'}; "
                           f"`{ours_cmd}`")
        section.append(f"- reference step times (s): {' '.join(f'{x:.2f}' for x in ref['step_seconds'])}")
        if est_line:
            section.append(est_line)
        section += ["", *lines, ""]
        new = not os.path.exists(RESULTS)
        with open(RESULTS, "a", encoding="utf-8") as f:
            if new:
                f.write("# Benchmark results\n\nAppended by the bench/ scripts with --write-results; newest last.\n")
            f.write("\n".join(section))
        print(f"appended to {RESULTS}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
