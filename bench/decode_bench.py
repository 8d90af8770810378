"""CPU decode speed: Tunebench vs llama.cpp (llama-cpp-python), same GGUF, same prompt token ids.

For each prompt (a short chat prompt of ~30 tokens and a long one of ~500), both sides run
greedy decoding (argmax of the logits, EOS ignored) for exactly N new tokens (default 128),
one untimed warm-up and then R timed repeats (default 5) each from an empty KV cache, and
report per repeat:
  - TTFT (time to first token): prompt evaluation + picking the first new token;
  - decode tok/s: (N - 1) / (time from the first new token to the last one), i.e. the N - 1
    single-token steps after the first token (each = one forward + argmax).
The table shows the median over the timed repeats, and the ratios ours/llama.cpp (decode
tok/s: higher is better for us when > 1; TTFT: lower is better for us when < 1).

Ours:
  tunebench bench-decode --model GGUF --prompt TEXT --max-tokens N --repeats R+1
prints one JSON line {"prompt_ids", "new_tokens", "ttft_s": [...], "decode_tok_s": [...],
"tokens": [...]}; its first repeat is taken as the warm-up and dropped. Its `prompt_ids` are
fed as they are to llama.cpp, so tokenization cannot skew the comparison, and its `tokens`
(last repeat) are compared with llama.cpp's greedy ids: the table says how many leading tokens
agree (quantized activations in either engine can make them part late; that is reported, not
judged). To tell a near-tie from a real difference, llama.cpp then follows our tokens once
(untimed) and counts the steps where its own argmax is our token, with the logit gap where not.

llama.cpp runs in a child process of this script through llama-cpp-python's low-level C API
(llama_decode on llama_batch_get_one + llama_get_logits_ith, argmax with numpy: no sampler
chain, no Python-side logits copies): n_threads = n_threads_batch = 2, n_ctx 2048, n_batch =
n_ubatch = 512, llama.cpp's own default flash-attention setting (auto) unless --flash-attn,
logging off. Each side's peak RSS is that child's own ru_maxrss. llama.cpp's internal
perf counters for the timed repeats are shown too (the gap to our wall-clock figure is the
Python loop's own cost).

Run it on an otherwise idle machine: llama.cpp's worker threads meet in spin barriers several
hundred times per token, so when another process holds one of the 2 cores, every barrier waits
for a scheduler time slice (measured on the 2-core VM while cargo compiled, short prompt: 2 tok/s
with 2 threads, 38 tok/s with 1 thread; 57 tok/s with 2 threads when idle). The script warns
when the load average is above 1.

Run it with the llama.cpp environment's python (scripts/llamacpp-env builds it once):
  py=$(scripts/llamacpp-env | tail -n1)
  "$py" bench/decode_bench.py --tunebench target/release/tunebench [--write-results]
  "$py" bench/decode_bench.py --llamacpp-only        # llama.cpp side alone, its own tokenization
Options: --max-tokens N, --repeats R, --prompts short,long, --threads T, --flash-attn auto|on|off,
--model GGUF, --write-results (append a dated section to bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tbcommon as tb  # noqa: E402
from tbcommon import git_rev, machine, parse_json_line, tunebench_version  # noqa: E402

RESULTS = os.path.join(tb.ROOT, "bench", "RESULTS.md")
PERSONA = os.path.join(tb.ROOT, "assets", "datasets", "persona", "train.jsonl")
MIB = 1024 ** 2
N_CTX, N_BATCH = 2048, 512

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(user: str, system: str | None = None) -> str:
    """The default model's chat format (ChatML), as raw text: both sides tokenize the markers."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def long_prompt(n_records: int = 14) -> str:
    """~500 tokens: the first English records of the persona training set as a transcript,
    followed by a request to summarize it (fixed text, so the same ids on every run)."""
    lines = []
    with open(PERSONA, encoding="utf-8") as f:
        for raw in f:
            msgs = json.loads(raw)["messages"]
            text = " ".join(m["content"] for m in msgs)
            if any("\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef" for ch in text):
                continue  # English only: keeps the token count stable and readable
            for m in msgs:
                lines.append(f"{m['role'].capitalize()}: {m['content']}")
            if len(lines) >= 2 * n_records:
                break
    notes = "\n".join(lines)
    return chatml(system=SYSTEM, user="Here is a transcript of an assistant answering questions about itself.\n\n"
                  f"{notes}\n\nSummarize in a few sentences who the assistant is, who made it, and where "
                  "its makers are based.")


PROMPTS = {
    "short": lambda: chatml("What are three good reasons to learn a second language as an adult? "
                            "Please answer briefly, in plain words."),
    "long": long_prompt,
}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# --- llama.cpp side (child process) ----------------------------------------------------------

def llamacpp_worker(args) -> dict:
    import ctypes

    import numpy as np
    import llama_cpp as L
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp's log lines (model loading etc.) off, errors still shown
    L.llama_backend_init()
    t_load = time.perf_counter()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(args.model.encode(), mp)
    if not model:
        raise SystemExit(f"error: llama.cpp could not load {args.model}")
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = N_CTX, N_BATCH, N_BATCH
    cp.n_threads = cp.n_threads_batch = args.threads
    cp.flash_attn_type = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                          "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}[args.flash_attn]
    cp.no_perf = False
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("error: llama.cpp could not create a context")
    load_s = time.perf_counter() - t_load
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    mem = L.llama_get_memory(ctx)

    if args.ids_file:
        with open(args.ids_file) as f:
            ids = [int(t) for t in json.load(f)]
    else:  # --llamacpp-only: llama.cpp's own tokenization, no BOS added (as ours), markers parsed
        text = args.prompt_text.encode()
        buf = (L.llama_token * (len(text) + 16))()
        n = L.llama_tokenize(vocab, text, len(text), buf, len(buf), False, True)
        if n < 0:
            raise SystemExit("error: llama_tokenize failed")
        ids = list(buf[:n])
    if not ids or len(ids) + args.max_tokens > N_CTX:
        raise SystemExit(f"error: prompt of {len(ids)} tokens + {args.max_tokens} new does not fit n_ctx {N_CTX}")

    floats = ctypes.POINTER(ctypes.c_float)

    def argmax_last() -> int:
        ptr = L.llama_get_logits_ith(ctx, -1)  # synchronizes: the step's compute is done
        if not ptr:
            raise SystemExit("error: llama.cpp returned no logits")
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, floats), shape=(n_vocab,)).argmax())

    def decode(arr, n: int) -> None:
        rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, n))
        if rc != 0:
            raise SystemExit(f"error: llama_decode returned {rc}")

    prompt_chunks = [(L.llama_token * len(c))(*c) for c in
                     (ids[i:i + N_BATCH] for i in range(0, len(ids), N_BATCH))]
    one = (L.llama_token * 1)()

    def generate(n_new: int):
        L.llama_memory_clear(mem, True)
        L.llama_perf_context_reset(ctx)
        t0 = time.perf_counter()
        for arr in prompt_chunks:
            decode(arr, len(arr))
        tok = argmax_last()
        t1 = time.perf_counter()
        out = [tok]
        while len(out) < n_new:
            one[0] = tok
            decode(one, 1)
            tok = argmax_last()
            out.append(tok)
        t2 = time.perf_counter()
        perf = L.llama_perf_context(ctx)
        return t1 - t0, (n_new - 1) / (t2 - t1), out, perf

    generate(args.max_tokens)  # warm-up
    ttft, tps, runs, p_eval_ms, eval_tok_s = [], [], [], [], []
    for _ in range(args.repeats):
        a, b, toks, perf = generate(args.max_tokens)
        ttft.append(a)
        tps.append(b)
        runs.append(toks)
        p_eval_ms.append(perf.t_p_eval_ms)
        if perf.t_eval_ms > 0:
            eval_tok_s.append(1000.0 * perf.n_eval / perf.t_eval_ms)
    forced = None
    if args.ours_tokens_file:  # untimed: follow our tokens, compare llama.cpp's argmax at each step
        with open(args.ours_tokens_file) as f:
            ours = [int(t) for t in json.load(f)]
        L.llama_memory_clear(mem, True)
        for arr in prompt_chunks:
            decode(arr, len(arr))
        agree, margins = 0, []
        for i, want in enumerate(ours):
            ptr = L.llama_get_logits_ith(ctx, -1)
            logits = np.ctypeslib.as_array(ctypes.cast(ptr, floats), shape=(n_vocab,))
            top = int(logits.argmax())
            if top == want:
                agree += 1
            else:  # how far our pick is behind llama.cpp's top-1, in logits
                margins.append((i, float(logits[top] - logits[want])))
            if i + 1 < len(ours):
                one[0] = want
                decode(one, 1)
        forced = {"agree": agree, "steps": len(ours), "disagreements": margins}
    L.llama_free(ctx)
    L.llama_model_free(model)
    return {
        "prompt_ids": ids, "new_tokens": len(runs[-1]), "ttft_s": ttft, "decode_tok_s": tps, "tokens": runs[-1],
        "deterministic": all(r == runs[0] for r in runs), "load_s": load_s,
        "internal_prompt_eval_ms": p_eval_ms, "internal_decode_tok_s": eval_tok_s,
        "system_info": L.llama_print_system_info().decode().strip(),
        "flash_attn": args.flash_attn, "threads": args.threads, "teacher_forced": forced,
    }


def run_llamacpp(args, prompt_text: str, ids: list[int] | None, ours_tokens: list[int] | None,
                 work: str) -> tuple[dict, int]:
    argv = [sys.executable, os.path.abspath(__file__), "--worker-llamacpp", "--model", args.model,
            "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads),
            "--flash-attn", args.flash_attn]
    if ids is not None:
        path = os.path.join(work, "prompt_ids.json")
        with open(path, "w") as f:
            json.dump(ids, f)
        argv += ["--ids-file", path]
    else:
        argv += ["--prompt-text", prompt_text]
    if ours_tokens is not None:
        path = os.path.join(work, "ours_tokens.json")
        with open(path, "w") as f:
            json.dump(ours_tokens, f)
        argv += ["--ours-tokens-file", path]
    r = tb.run_measured(argv).check("llama.cpp side")
    return parse_json_line(r.stdout, "llama.cpp side"), r.peak_rss_bytes


def run_ours(exe: list[str], args, prompt_text: str) -> tuple[dict, int, str]:
    argv = exe + ["bench-decode", "--model", args.model, "--prompt", prompt_text,
                  "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats + 1)]
    r = tb.run_measured(argv, stream_stderr=True).check("tunebench bench-decode")
    out = parse_json_line(r.stdout, "tunebench bench-decode")
    for key in ("prompt_ids", "new_tokens", "ttft_s", "decode_tok_s", "tokens"):
        if key not in out:
            tb.die(f"tunebench bench-decode: JSON line lacks {key!r}: {str(out)[:500]}", 1)
    if len(out["ttft_s"]) != args.repeats + 1 or len(out["decode_tok_s"]) != args.repeats + 1:
        tb.die(f"tunebench bench-decode: expected {args.repeats + 1} repeats, got {len(out['ttft_s'])}", 1)
    if int(out["new_tokens"]) != args.max_tokens:
        tb.die(f"tunebench bench-decode: generated {out['new_tokens']} tokens, asked for {args.max_tokens}", 1)
    out["ttft_s"], out["decode_tok_s"] = out["ttft_s"][1:], out["decode_tok_s"][1:]  # drop the warm-up
    cmd = shlex.join(exe + ["bench-decode", "--model", args.model, "--prompt", "<prompt text>",
                            "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats + 1)])
    return out, r.peak_rss_bytes, cmd


def leading_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def llamacpp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return "?"


def build_record() -> dict:
    """What scripts/llamacpp-env wrote about the build of this environment (flags, time)."""
    try:
        with open(os.path.join(sys.prefix, ".tunebench-build")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description="CPU decode speed: Tunebench vs llama.cpp",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tunebench", default=tb.default_binary(),
                    help="tunebench binary (default: $TUNEBENCH_BIN or target/release/tunebench)")
    ap.add_argument("--model", default=tb.default_model(), help="GGUF file (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=128, help="new tokens per repeat (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up (default: %(default)s)")
    ap.add_argument("--prompts", default="short,long", help="which prompts: short, long or both (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp n_threads and n_threads_batch (default: 2)")
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp flash attention (default: auto, llama.cpp's own default)")
    ap.add_argument("--llamacpp-only", action="store_true",
                    help="run only the llama.cpp side (prompt tokenized by llama.cpp)")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to bench/RESULTS.md")
    ap.add_argument("--worker-llamacpp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ids-file", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-text", help=argparse.SUPPRESS)
    ap.add_argument("--ours-tokens-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.max_tokens < 2 or args.repeats < 1:
        tb.die("--max-tokens must be >= 2 and --repeats >= 1")

    if args.worker_llamacpp:
        print(json.dumps(llamacpp_worker(args)))
        return 0

    try:
        import llama_cpp  # noqa: F401  (only to fail early, in this process, with a hint)
    except ImportError:
        tb.die("llama_cpp is not importable by this python: run the script with the llama.cpp environment, "
               "py=$(scripts/llamacpp-env | tail -n1); \"$py\" bench/decode_bench.py ...")
    tb.require_file(args.model, "model", "run scripts/setup")
    names = [p.strip() for p in args.prompts.split(",") if p.strip()]
    for p in names:
        if p not in PROMPTS:
            tb.die(f"unknown prompt {p!r} (use {', '.join(PROMPTS)})")
    exe = None if args.llamacpp_only else tb.binary_argv(args.tunebench)
    mach = machine()
    if mach["load_avg"][0] > 1.0:
        print(f"warning: load average {mach['load_avg'][0]:.2f} before the run: other work on the machine skews timings "
              "(llama.cpp's threads wait for each other in spin barriers, so with --threads = cores it slows down "
              "by an order of magnitude while anything else runs)", file=sys.stderr)

    rows = []  # per prompt: dict of results
    ours_cmd = None
    with tempfile.TemporaryDirectory(prefix="tunebench-decodebench-") as work:
        for name in names:
            text = PROMPTS[name]()
            ours = None
            if exe:
                print(f"[{name}] tunebench bench-decode ...", file=sys.stderr)
                ours, ours_rss, ours_cmd = run_ours(exe, args, text)
                ids = [int(t) for t in ours["prompt_ids"]]
            else:
                ids = None
            print(f"[{name}] llama.cpp ...", file=sys.stderr)
            ours_tokens = [int(t) for t in ours["tokens"]] if ours else None
            ref, ref_rss = run_llamacpp(args, text, ids, ours_tokens, work)
            row = {"name": name, "prompt_tokens": len(ref["prompt_ids"]), "ref": ref, "ref_rss": ref_rss}
            if ours:
                row.update(ours=ours, ours_rss=ours_rss,
                           agree=leading_agreement([int(t) for t in ours["tokens"]], ref["tokens"]))
            rows.append(row)

    # --- report -----------------------------------------------------------------------------
    def fmt_side(impl, r, rss):
        ttft, tps = r["ttft_s"], r["decode_tok_s"]
        return (f"| {impl} | {1000 * median(ttft):.1f} | {1000 * min(ttft):.1f}–{1000 * max(ttft):.1f} | "
                f"{median(tps):.1f} | {min(tps):.1f}–{max(tps):.1f} | {rss / MIB:.0f} MiB |")

    lines = []
    for row in rows:
        ref = row["ref"]
        lines += [f"**{row['name']} prompt: {row['prompt_tokens']} tokens, {args.max_tokens} new tokens**", "",
                  "| impl | TTFT ms (median) | TTFT range | decode tok/s (median) | decode range | peak RSS |",
                  "|---|---|---|---|---|---|",
                  fmt_side("llama.cpp", ref, row["ref_rss"])]
        if "ours" in row:
            ours = row["ours"]
            lines.append(fmt_side("tunebench", ours, row["ours_rss"]))
            lines.append(f"| ours/llama.cpp | {median(ours['ttft_s']) / median(ref['ttft_s']):.2f}x | | "
                         f"{median(ours['decode_tok_s']) / median(ref['decode_tok_s']):.2f}x | | "
                         f"{row['ours_rss'] / row['ref_rss']:.2f}x |")
        notes = [f"llama.cpp internal counters: prompt eval {median(ref['internal_prompt_eval_ms']):.1f} ms, "
                 f"decode {median(ref['internal_decode_tok_s']):.1f} tok/s (median)"]
        if not ref["deterministic"]:
            notes.append("llama.cpp's greedy ids differed between its repeats")
        if "ours" in row:
            notes.append(f"greedy ids: the first {row['agree']} of {args.max_tokens} agree")
            tf = ref.get("teacher_forced")
            if tf:
                note = (f"fed our tokens, llama.cpp's argmax picks the same token at {tf['agree']} of "
                        f"{tf['steps']} steps")
                if tf["disagreements"]:
                    i, m = tf["disagreements"][0]
                    worst = max(x for _, x in tf["disagreements"])
                    note += (f" (first difference at new token {i + 1}, where our pick is {m:.3f} logits below "
                             f"llama.cpp's top-1; largest gap {worst:.3f})")
                notes.append(note)
        lines += ["", "; ".join(notes) + ".", ""]
    ref0 = rows[0]["ref"]
    build = build_record()
    title = (f"CPU decode, greedy {args.max_tokens} new tokens, {args.repeats} timed repeats after 1 warm-up, "
             f"{mach['nproc']} cores ({mach['cpu']})")
    print(f"\n{title}\n")
    print("\n".join(lines))
    print(f"llama.cpp: llama-cpp-python {llamacpp_version()}, threads {args.threads}, n_ctx {N_CTX}, "
          f"n_batch {N_BATCH}, flash attention {args.flash_attn}; {ref0['system_info']}")

    if args.write_results:
        now = datetime.datetime.now().astimezone()
        cmd = "bench/decode_bench.py " + shlex.join(sys.argv[1:])
        section = [
            f"\n## {now:%Y-%m-%d %H:%M %Z} — CPU decode speed vs llama.cpp ({', '.join(names)} prompt"
            f"{'s' if len(names) > 1 else ''}, {args.max_tokens} new tokens)",
            "",
            f"- machine: {mach['cpu']}, {mach['nproc']} cores (nproc), {mach['mem_gib']} GiB; "
            f"load average before the run {mach['load_avg'][0]:.2f}",
            f"- command: `py=$(scripts/llamacpp-env | tail -n1); \"$py\" {cmd}`",
            f"- method: same GGUF ({os.path.basename(args.model)}), same prompt token ids (ours), greedy argmax, "
            f"EOS ignored; 1 warm-up + {args.repeats} timed repeats per side, medians; TTFT = prompt eval + first "
            f"token, decode tok/s = (N-1) / time after the first token",
            f"- llama.cpp: llama-cpp-python {llamacpp_version()} (built here"
            + (f" in {build['build_seconds'] // 60} min {build['build_seconds'] % 60} s, {build.get('cmake_args', '')}"
               if build.get("build_seconds") is not None else "") + f"), low-level C API, threads {args.threads}, "
            f"n_ctx {N_CTX}, n_batch {N_BATCH}, flash attention {args.flash_attn}; `{ref0['system_info']}`",
        ]
        if exe:
            section.append(f"- tunebench: {tunebench_version(exe) or '(no --version)'}, git {git_rev() or '?'}; "
                           f"`{ours_cmd}` (its first repeat is the warm-up)")
        else:
            section.append(f"- tunebench: not run (--llamacpp-only; prompt tokenized by llama.cpp); git {git_rev() or '?'}")
        section += ["", *lines]
        new = not os.path.exists(RESULTS)
        with open(RESULTS, "a", encoding="utf-8") as f:
            if new:
                f.write("# Benchmark results\n\nAppended by the bench/ scripts with --write-results; newest last.\n")
            f.write("\n".join(section))
        print(f"appended to {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
