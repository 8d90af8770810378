"""Checks Tunebench's merged-model exports with independent readers: PyTorch transformers for
the HF folder, llama.cpp (llama-cpp-python) for the GGUF files.

The exports come from the Rust side, through the library API (not the CLI): the test
`export_for_python` in tests/export.rs, run with TUNEBENCH_EXPORT_DIR set, loads the default
model, makes a seeded LoRA adapter (r 8, alpha 16, all seven projections, random non-zero B),
merges it and writes into that folder:
  adapter/             the PEFT adapter (export_adapter)
  hf/                  the merged model as a HF folder, f32 (write_hf)
  gguf-{f16,q8_0,q4_k}/model.gguf + Modelfile   (write_gguf)
  expected.json        prompt token ids, tokenizer encodings and the chat rendering of Tunebench,
                       and the greedy 16-token continuations of the merged model and of each
                       GGUF as Tunebench decodes it

Checks:
  tokenizer   AutoTokenizer on hf/ encodes the texts and renders the chat exactly as Tunebench
  hf          transformers on hf/ (every weight found, none unexpected) vs `tunebench logits
              --model hf/` and vs `tunebench logits --model BASE --adapter adapter/` (unmerged)
  peft-merge  transformers BASE (GGUF) + PeftModel(adapter/).merge_and_unload() vs transformers
              on hf/: an independent merge gives the same model
  gguf        each GGUF export read by transformers (llama.cpp's gguf-py reader, dequantized): its
              tokenizer encodes the texts as Tunebench does, its logits vs `tunebench logits --model
              model.gguf` (both dequantize the same blocks, so within tol)
  llama.cpp   (when llama-cpp-python is importable here or in the env of scripts/llamacpp-env,
              which is not built by this script) each GGUF, fed the prompts + the merged model's
              greedy continuation: logits vs `tunebench logits --model model.gguf`, and top-1
              agreement with that continuation (teacher forcing); greedy 16-token decoding vs
              Tunebench's on the same file is reported. The source GGUF is run the same way as
              a baseline of how closely the two engines agree on a known-good file.
Pass: logits within tol * max(1, max|logit|) (tol 1e-2); llama.cpp logits within llama-tol (0.1:
llama.cpp multiplies quantized weights with quantized activations and keeps an f16 KV cache)
with >= 90% equal top-1; teacher-forced agreement >= 0.95 (f16, q8_0) or >= 0.6 (q4_k).
Greedy decoding is only reported: with a random adapter the model has near-ties that llama.cpp's
one-token decoding kernels resolve differently from its prompt kernels. Exit 0 when all pass, 1
when one fails, 2 on a setup error.

Run (from scripts/test; about 2-3 minutes on 2 cores):
  py=$(scripts/pyenv | tail -n1)
  "$py" tests/reference/export_check.py --tunebench "$CARGO_TARGET_DIR/debug/tunebench" [--exports DIR] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import tbcommon as tb  # noqa: E402

GGUF_TYPES = ["f16", "q8_0", "q4_k"]

# Runs inside the llama.cpp Python (maybe another venv): greedy tokens, teacher-forced logits.
LLAMA_CPP_SCRIPT = r"""
import json, sys
import numpy as np
import llama_cpp
args = json.load(open(sys.argv[1]))
out = {"version": llama_cpp.__version__, "files": {}}
for tag, path in args["files"].items():
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=args["threads"], logits_all=True,
                          verbose=False, seed=0)
    res = {"greedy": [], "logits": []}
    for i, (prompt, ref) in enumerate(zip(args["prompts"], args["refs"])):
        toks = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            toks.append(int(t))
            if len(toks) == args["new_tokens"]:
                break
        res["greedy"].append(toks)
        llm.reset()
        llm.eval(prompt + ref)
        scores = np.array(llm.scores[: len(prompt) + len(ref)], dtype=np.float32)
        f = f"{args['work']}/llamacpp-{tag}-{i}.npy"
        np.save(f, scores)
        res["logits"].append(f)
    out["files"][tag] = res
    del llm
json.dump(out, open(sys.argv[2], "w"))
"""


def llama_cpp_python() -> str | None:
    """A Python that imports llama_cpp: this one, or the env scripts/llamacpp-env builds (never
    built here: that takes 10-15 minutes)."""
    try:
        import llama_cpp  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    env = os.environ.get("TUNEBENCH_LLAMACPP_ENV") or os.path.expanduser("~/.cache/tunebench/llamacpp-env")
    py = os.path.join(env, "bin", "python")
    if not (os.path.isfile(os.path.join(env, ".tunebench-stamp")) and os.path.isfile(py)):
        return None
    ok = subprocess.run([py, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    return py if ok else None


def main() -> int:
    ap = argparse.ArgumentParser(description="Tunebench merged-model export check (transformers, llama.cpp)",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tunebench", default=tb.default_binary(), help="tunebench binary (for `tunebench logits`)")
    ap.add_argument("--exports", metavar="DIR", help="use these exports instead of running cargo test to write them")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (exports, token file, logits)")
    ap.add_argument("--tol", type=float, default=1e-2, help="max |diff| relative to max(1, max|logit|) (default: %(default)s)")
    ap.add_argument("--llama-tol", type=float, default=0.1, help="the same for llama.cpp logits (default: %(default)s)")
    args = ap.parse_args()
    exe = tb.binary_argv(args.tunebench)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    tb.quiet_transformers()
    work = args.keep or tempfile.mkdtemp(prefix="tunebench-export-check-")
    os.makedirs(work, exist_ok=True)
    try:
        return check(args, exe, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)  # the exports are ~1.3 GB


def check(args, exe, work) -> int:
    import numpy as np
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exports = args.exports
    if not exports:
        exports = os.path.join(work, "exports")
        if os.path.exists(exports):
            tb.die(f"{exports} exists: remove it or pass --exports {exports}")
        print(f"writing the exports with `cargo test --workspace --test export export_for_python` into {exports}", file=sys.stderr)
        env = dict(os.environ, TUNEBENCH_EXPORT_DIR=exports)
        r = subprocess.run(["cargo", "test", "--workspace", "--test", "export", "export_for_python", "--", "--exact"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            tb.die("cargo test --test export export_for_python failed:\n" + "\n".join((r.stdout + r.stderr).splitlines()[-30:]), 1)
    expected_path = os.path.join(exports, "expected.json")
    tb.require_file(expected_path, "expected.json", "the exports are incomplete")
    exp = json.load(open(expected_path))
    hf_dir, adapter_dir = os.path.join(exports, "hf"), os.path.join(exports, "adapter")
    prompts = exp["prompts"]
    tokens_path = os.path.join(work, "tokens.json")
    json.dump(prompts, open(tokens_path, "w"))
    rows = []

    def row(check, max_diff=None, max_logit=None, extra="", ok=True, note=""):
        rows.append((check, max_diff, max_logit, extra, ok, note))

    def compare(check, ref, ours, tol, effect_vs=None):
        max_diff = max(float(np.abs(a - b).max()) for a, b in zip(ref, ours))
        max_logit = max(float(np.abs(a).max()) for a in ref)
        allowed = tol * max(1.0, max_logit)
        agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, ours))
        total = sum(a.shape[0] for a in ref)
        ok, note = max_diff <= allowed, ""
        if not ok:
            note = f"logits differ by more than {allowed:.3g}"
        if effect_vs is not None:
            effect = max(float(np.abs(a - b).max()) for a, b in zip(ref, effect_vs))
            note = (note + "; " if note else "") + f"adapter moves logits by {effect:.2f}"
            if effect <= allowed:
                ok, note = False, f"the adapter barely moves the logits ({effect:.3g})"
        row(check, max_diff, max_logit, f"top-1 {agree}/{total}", ok, note)

    def ours_logits(tag, model, adapter=None):
        out = os.path.join(work, f"logits-{tag}.safetensors")
        argv = exe + ["logits", "--model", model, "--tokens", tokens_path, "--out", out]
        if adapter:
            argv += ["--adapter", adapter]
        tb.run_measured(argv).check(f"tunebench logits ({tag})")
        t = load_file(out)
        return [t[f"logits.{i}"] for i in range(len(prompts))]

    def hf_logits(model):
        with torch.no_grad():
            return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in prompts]

    # --- tokenizer ---------------------------------------------------------------------------
    tok = AutoTokenizer.from_pretrained(hf_dir)
    enc = [tok(t, add_special_tokens=False).input_ids for t in exp["texts"]]
    rendered = tok.apply_chat_template(exp["chat"]["messages"], tokenize=False, add_generation_prompt=True)
    chat_ids = tok(rendered, add_special_tokens=False).input_ids
    problems = []
    if enc != exp["encodings"]:
        problems.append("encodings differ")
    if rendered != exp["chat"]["rendered"]:
        problems.append(f"chat rendering differs: {rendered!r}")
    if chat_ids != prompts[0]:
        problems.append("chat prompt ids differ")
    if tok.eos_token != "<|im_end|>" or tok.bos_token != "<|im_start|>":
        problems.append(f"special tokens bos={tok.bos_token!r} eos={tok.eos_token!r}")
    row("tokenizer: AutoTokenizer(hf/) == tunebench", ok=not problems, note="; ".join(problems) or
        f"{len(enc)} texts + chat template ({type(tok).__name__})")

    # --- HF folder in transformers -----------------------------------------------------------------
    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                       output_loading_info=True)
    model.eval()
    missing = [k for k in info.get("missing_keys", []) if k != "lm_head.weight"]
    bad = missing + list(info.get("unexpected_keys", [])) + list(info.get("mismatched_keys", []))
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    row("hf/: loads in transformers", ok=not bad and tied,
        note=f"problem keys {bad[:4]}" if bad else ("lm_head not tied" if not tied else f"{type(model).__name__}, tied head"))
    ref_hf = hf_logits(model)
    compare("hf/: transformers vs tunebench (same folder)", ref_hf, ours_logits("hf", hf_dir), args.tol)
    base_logits = ours_logits("base", exp["base_model"])
    compare("hf/: transformers vs tunebench base+adapter", ref_hf, ours_logits("unmerged", exp["base_model"], adapter_dir),
            args.tol, effect_vs=base_logits)
    del model

    # --- independent merge: PEFT on the base GGUF ----------------------------------------------
    base, _ = tb.load_hf(exp["base_model"], attn="eager")
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.eval()
    compare("peft merge_and_unload(base GGUF) vs hf/ (transformers)", hf_logits(merged), ref_hf, args.tol)
    del merged, base

    # --- GGUF exports in transformers (llama.cpp's gguf-py reader, always available) ------------------
    for q in GGUF_TYPES:
        path = os.path.join(exports, f"gguf-{q}", "model.gguf")
        tb.require_file(path, f"GGUF export {q}", "the exports are incomplete")
        gmodel, gtok = tb.load_hf(path, attn="eager")
        gmodel.eval()
        genc = [gtok(t, add_special_tokens=False).input_ids for t in exp["texts"]]
        row(f"gguf-{q}: tokenizer (transformers from the GGUF) == tunebench", ok=genc == exp["encodings"],
            note=f"{len(genc)} texts" if genc == exp["encodings"] else "encodings differ")
        # Both sides dequantize the same blocks: the logits must agree as closely as for hf/.
        compare(f"gguf-{q}: transformers vs tunebench (same file)", hf_logits(gmodel), ours_logits(f"gguf-{q}", path), args.tol)
        del gmodel

    # --- llama.cpp ----------------------------------------------------------------------------------
    lpy = llama_cpp_python()
    if lpy is None:
        print("NOTICE: llama-cpp-python is not importable here and scripts/llamacpp-env has not been built: "
              "skipping the llama.cpp checks of the GGUF exports", file=sys.stderr)
        row("llama.cpp: GGUF exports", ok=True, note="SKIPPED (llama-cpp-python not available)")
    else:
        files = {q: os.path.join(exports, f"gguf-{q}", "model.gguf") for q in GGUF_TYPES}
        for q, p in files.items():
            tb.require_file(p, f"GGUF export {q}", "the exports are incomplete")
        # The source file too: how closely llama.cpp and Tunebench agree on a known-good file.
        files["source"] = exp["base_model"]
        ref = exp["greedy"]["merged"]
        largs = {"files": files, "prompts": prompts, "refs": ref, "new_tokens": len(ref[0]), "threads": os.cpu_count() or 1,
                 "work": work}
        largs_path, lout_path = os.path.join(work, "llamacpp-args.json"), os.path.join(work, "llamacpp-out.json")
        json.dump(largs, open(largs_path, "w"))
        r = subprocess.run([lpy, "-c", LLAMA_CPP_SCRIPT, largs_path, lout_path], capture_output=True, text=True)
        if r.returncode != 0:
            row("llama.cpp: load the GGUF exports", ok=False, note="\n".join(r.stderr.strip().splitlines()[-5:]))
        else:
            lout = json.load(open(lout_path))
            full = [p + r_ for p, r_ in zip(prompts, ref)]
            fpath = os.path.join(work, "tokens-continued.json")
            json.dump(full, open(fpath, "w"))
            for q in ["source"] + GGUF_TYPES:
                res = lout["files"][q]
                ll = [np.load(f) for f in res["logits"]]
                out = os.path.join(work, f"logits-{q}.safetensors")
                tb.run_measured(exe + ["logits", "--model", files[q], "--tokens", fpath, "--out", out]).check(f"tunebench logits ({q})")
                t = load_file(out)
                ours = [t[f"logits.{i}"] for i in range(len(full))]
                max_diff = max(float(np.abs(a - b).max()) for a, b in zip(ll, ours))
                max_logit = max(float(np.abs(a).max()) for a in ll)
                agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ll, ours))
                total = sum(a.shape[0] for a in ll)
                if q == "source":
                    row(f"llama.cpp {lout['version']} vs tunebench: source GGUF (baseline)", max_diff, max_logit,
                        f"top-1 {agree}/{total}", True, "reference gap between the two engines on a known-good file")
                    continue
                ok = max_diff <= args.llama_tol * max(1.0, max_logit) and agree >= 0.9 * total
                row(f"llama.cpp vs tunebench logits: {q} export", max_diff, max_logit, f"top-1 {agree}/{total}", ok,
                    "" if ok else f"want max|diff| <= {args.llama_tol} * max(1, max|logit|) and top-1 >= 90%")
                # teacher-forced: llama.cpp's top-1 on the merged model's greedy continuation
                tf_agree = tf_total = 0
                for p, r_, l in zip(prompts, ref, ll):
                    for j, want in enumerate(r_):
                        tf_agree += int(l[len(p) - 1 + j].argmax() == want)
                        tf_total += 1
                tf = tf_agree / tf_total
                bound = 0.95 if q in ("f16", "q8_0") else 0.6
                same = sum(a == b for a, b in zip(res["greedy"], exp["greedy"][q]))
                row(f"llama.cpp: {q} export predicts the merged model's text", extra=f"top-1 {tf_agree}/{tf_total}",
                    ok=tf >= bound, note=f"want >= {bound}; greedy 16 tokens equal to tunebench's on {same}/{len(prompts)} prompts")

    # --- report ------------------------------------------------------------------------------------
    print(f"\nexports: {exports}")
    print(f"{'check':58} {'max|diff|':>10} {'max|logit|':>10}  {'':22} result")
    for check, d, m, extra, ok, note in rows:
        ds = f"{d:10.2e}" if d is not None else " " * 10
        ms = f"{m:10.2f}" if m is not None else " " * 10
        print(f"{check:58} {ds} {ms}  {extra:22} {'PASS' if ok else 'FAIL'}  {note}")
    failed = [r for r in rows if not r[4]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
