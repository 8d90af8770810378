"""GPU LoRA training benchmark: Tunebench vs PyTorch + transformers + PEFT, side by side, in one call.

Both sides build the same Llama-family shapes with random weights from a config (no model files),
put LoRA (r 16, alpha 32, dropout 0) on all seven projections, and train on random token batches
with the full causal-LM loss and AdamW (lr 1e-4, no weight decay). Each side runs in its own
child process, one shape at a time: W warm-up steps, then K timed steps (each = forward +
backward + optimizer step, synchronized); tokens/s = batch*seq / median step time.

Peak memory: on a GPU, the device memory in use sampled every 20 ms (NVML) above what was in use
before the child started — the same measurement for both sides, CUDA context included; PyTorch's
own max_memory_allocated is printed beside it, and ours (the CUDA memory pool's high-water mark,
`device_peak_bytes`) beside ours. On the CPU (--device cpu, a smoke run of this
script), each child's peak RSS. Our row's notes also give `tunebench estimate`'s prediction for
the same run and its error against the measured peak (the estimate is calibrated on the CPU).

Ours is `tunebench bench-train --shape S --batch B --seq L --device D [--gradient-checkpointing]`
(random tokens, seeded) with --dtype; build it for the GPU with `bash scripts/build-cuda` and
pass --tunebench PATH. Both sides run in each of --dtypes (bf16: the base and activations in bf16;
ours keeps the LoRA tensors and AdamW in f32, PEFT keeps them in the model's dtype), and the
ratio compares the same dtype. The two sides' random weights differ (each its own init), so
their losses are not comparable; their tokens/s and memory are.

  python3 bench/gpu_bench.py --tunebench target/release/tunebench --write-results      # on the GPU machine
  python3 bench/gpu_bench.py --device cpu --shapes tiny --batch 2 --seq 64              # smoke run, any machine
Shapes (name: hidden, layers, heads, kv heads, intermediate, vocab; tied embeddings):
smollm2-135m, llama-1b, qwen1.5b-like (plus tiny for smoke runs); the issue's set is
smollm2-135m 8x512, llama-1b 8x512, qwen1.5b-like 8x512 with and without checkpointing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tbcommon as tb  # noqa: E402

SHAPES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab) — the same as
    # src/train/bench.rs SHAPES (tied embeddings, max positions 4096).
    "tiny": (64, 2, 4, 2, 128, 512),
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152),
    "llama-1b": (2048, 16, 32, 8, 8192, 128256),
    "qwen1.5b-like": (1536, 28, 12, 2, 8960, 151936),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = os.path.join(tb.ROOT, "bench", "RESULTS.md")
GIB = 1024 ** 3


def reference(shape: str, batch: int, seq: int, dtype: str, device: str, checkpointing: bool, warmup: int,
              steps: int, rank: int) -> dict:
    """The PyTorch + PEFT side, in its own process."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tb.quiet_transformers()
    h, layers, nh, nkv, inter, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=nh, num_key_value_heads=nkv,
                      intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=True,
                      max_position_embeddings=4096, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    dt = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}[dtype]
    # Built where it trains, in its dtype: no full-precision copy on the host to convert and move.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(default)
    model.to(device=device, dtype=dt)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (batch, seq), generator=gen).to(device) for _ in range(2)]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for i in range(warmup + steps):
        x = batches[i % 2]
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.item()))
    out = {"step_s": times, "losses": losses, "trainable_params": sum(p.numel() for p in trainable),
           "torch": torch.__version__}
    if device.startswith("cuda"):
        out["torch_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


class GpuMemory:
    """Samples the GPU's used memory every 20 ms while a child runs (NVML, else nvidia-smi)."""

    def __init__(self, index: int):
        self.index, self.peak, self._stop = index, 0, threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._read = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
        except Exception:  # noqa: BLE001 — fall back to the command-line tool
            def read() -> int:
                r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                    f"--id={index}"], capture_output=True, text=True)
                return int(r.stdout.strip().splitlines()[0]) * 1024 * 1024
            self._read = read
        self.baseline = self._read()

    def __enter__(self):
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read() - self.baseline)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_side(argv: list[str], device: str, timeout: float | None) -> tuple[dict, int]:
    """Runs one side; returns its JSON line and its peak memory (device memory or RSS)."""
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        with GpuMemory(index) as mem:
            r = tb.run_measured(argv, stream_stderr=True, timeout=timeout)
        peak = mem.peak
    else:
        r = tb.run_measured(argv, stream_stderr=True, timeout=timeout)
        peak = r.peak_rss_bytes
    if r.returncode != 0:
        return {"error": f"timed out after {timeout:g} s" if r.returncode == 124 else f"exit {r.returncode}"}, 0
    return tb.parse_json_line(r.stdout, shlex.join(argv[:3])), peak


def main() -> int:
    ap = argparse.ArgumentParser(description="GPU LoRA training: Tunebench vs PyTorch+PEFT",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tunebench", default=tb.default_binary(), help="tunebench binary (a --features cuda build for a GPU)")
    ap.add_argument("--device", default="cuda:0", help="cuda:N, or cpu for a smoke run (default: %(default)s)")
    ap.add_argument("--shapes", default="smollm2-135m,llama-1b,qwen1.5b-like,qwen1.5b-like+ckpt",
                    help="comma-separated; NAME+ckpt = with gradient checkpointing (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtypes", default="bf16,f32", help="reference dtypes (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--side-timeout", type=float, help="kill a side's run after this many seconds (its row says so)")
    ap.add_argument("--reference-only", action="store_true")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to bench/RESULTS.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # child: one reference configuration
        w = json.loads(args.worker)
        print(json.dumps(reference(**w)), flush=True)
        return 0

    jobs = []
    for spec in args.shapes.split(","):
        name, ckpt = spec.removesuffix("+ckpt"), spec.endswith("+ckpt")
        if name not in SHAPES:
            tb.die(f"unknown shape {name!r}; shapes: {', '.join(SHAPES)}")
        jobs.append((name, ckpt))
    exe = None if args.reference_only else tb.binary_argv(args.tunebench)
    tokens = args.batch * args.seq
    rows, notes = [], []

    def row_line(label, impl, tps, peak, loss, note) -> str:
        fmt = (lambda v, f: f.format(v) if v is not None else "—")
        return (f"| {label} | {impl} | {fmt(tps, '{:.0f}')} | {fmt(peak and peak / GIB, '{:.2f} GiB')} | "
                f"{fmt(loss, '{:.3f}')} | {note} |")

    def add(*row) -> None:
        """Keeps a row for the table and prints it now, so a run cut short still shows its rows."""
        rows.append(row)
        print(f"row: {row_line(*row)}", file=sys.stderr, flush=True)
    for name, ckpt in jobs:
        label = f"{name} {args.batch}x{args.seq}" + (" +ckpt" if ckpt else "")
        for dtype in args.dtypes.split(","):
            w = dict(shape=name, batch=args.batch, seq=args.seq, dtype=dtype, device=args.device, checkpointing=ckpt,
                     warmup=args.warmup, steps=args.steps, rank=args.rank)
            ref, ref_peak = run_side([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(w)], args.device,
                                     args.side_timeout)
            ref_tps = None
            if "error" in ref:
                add(label, f"pytorch+peft {dtype}", None, None, None, ref["error"])
            else:
                ref_tps = tokens / statistics.median(ref["step_s"])
                own = ref.get("torch_peak_allocated_bytes")
                add(label, f"pytorch+peft {dtype}", ref_tps, ref_peak, ref["losses"][0],
                    f"torch max_memory_allocated {own / GIB:.2f} GiB" if own else "")
                notes.append(f"reference {label} {dtype}: torch {ref['torch']}, {ref.get('gpu', 'cpu')}, "
                             f"trainable {ref['trainable_params']:,}")
            if not exe:
                continue
            argv = exe + ["bench-train", "--shape", name, "--batch", str(args.batch), "--seq", str(args.seq),
                          "--device", args.device, "--dtype", dtype, "--rank", str(args.rank), "--alpha", str(2 * args.rank),
                          "--targets", "all-linear", "--warmup-steps", str(args.warmup), "--steps", str(args.steps)]
            if ckpt:
                argv.append("--gradient-checkpointing")
            res, peak = run_side(argv, args.device, args.side_timeout)
            if "error" in res:
                add(label, f"tunebench {dtype}", None, None, None, res["error"])
                continue
            tps = tokens / statistics.median(res["step_s"])
            ratio = f"{tps / ref_tps:.2f}x tok/s, {peak / ref_peak:.2f}x memory" if ref_tps and ref_peak else ""
            # `tunebench estimate`'s prediction for the same run (calibrated on the CPU; its error
            # here is what a GPU calibration starts from).
            est = res.get("estimated_peak_bytes")
            if est and peak:
                ratio += f"{'; ' if ratio else ''}estimate {est / GIB:.2f} GiB ({100 * (est / peak - 1):+.0f}%)"
            # The CUDA memory pool's high-water mark (our tensors alone, as PyTorch's
            # max_memory_allocated is theirs).
            own = res.get("device_peak_bytes")
            if own:
                ratio += f"{'; ' if ratio else ''}pool peak {own / GIB:.2f} GiB"
            add(label, f"tunebench {res.get('dtype', dtype)} ({res.get('device', '?')})", tps, peak,
                res["losses"][0], ratio)

    where = "GPU memory above idle (NVML)" if args.device.startswith("cuda") else "peak RSS"
    lines = [f"| shape | impl | tok/s (median step) | {where} | first loss | notes |", "|---|---|---|---|---|---|"]
    lines += [row_line(*row) for row in rows]
    print("\n".join(lines))
    if args.write_results:
        v = tb.versions()
        now = datetime.datetime.now().astimezone()
        section = [f"\n## {now:%Y-%m-%d %H:%M %Z} — GPU LoRA training vs PyTorch + PEFT ({args.device})", "",
                   f"- command: `python3 bench/gpu_bench.py {shlex.join(sys.argv[1:])}`",
                   f"- reference: torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}; "
                   f"LoRA r{args.rank} alpha {2 * args.rank} on all 7 projections, AdamW, sdpa attention; "
                   f"{args.warmup} warm-up + {args.steps} timed steps, random tokens",
                   f"- tunebench: {tb.tunebench_version(exe) if exe else '-'}, git {tb.git_rev() or '?'}",
                   *[f"- {n}" for n in notes], "", *lines, ""]
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write("\n".join(section))
        print(f"appended to {RESULTS}", file=sys.stderr)
    failed = [f"{label} {impl}" for label, impl, tps, *_ in rows if tps is None]
    if failed:
        print(f"error: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
