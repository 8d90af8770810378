"""Adapter interop between Tunebench and HF PEFT on the default model (SmolLM2-135M-Instruct GGUF).

Checks, each on the same token ids of several prompts (chat-templated, English, Chinese, code):
  base      `tunebench logits` without adapter  vs  transformers (GGUF dequantized to f32)
  A         adapter from `tunebench lora-init --random-b` loaded by PeftModel.from_pretrained
            (its keys and values must be exactly what PEFT holds afterwards) vs `tunebench logits --adapter`
  B         LoRA made by PEFT (r=8, alpha=16, all 7 projections, lora_B random with a fixed seed),
            save_pretrained'ed, vs `tunebench logits --adapter` on that folder
  C         IA3 adapter from `tunebench lora-init --method ia3 --random-b` (k, v, down; down as
            feed-forward; vectors 1 ± 0.2) loaded by PeftModel.from_pretrained, as in A
  D         IA3 made by PEFT (same targets, ia3_l random around 1), save_pretrained'ed, as in B
  E         DoRA adapter from `tunebench lora-init --dora --random-b` (q, v, down) → PEFT, as in A
  F         DoRA made by PEFT (use_dora, lora_B random, magnitude scaled randomly), as in B
  P         AdaLoRA adapter from `tunebench lora-init --method adalora --random-b` (init_r 6 on q, v,
            down; Λ random; a rank_pattern with random kept triplets, one module at rank 0) → PEFT,
            which resizes every module to its kept rank, as in A
  Q         AdaLoRA made by PEFT (Λ random, masked to a random rank_pattern as its allocator does),
            save_pretrained'ed with only the kept triplets → tunebench, as in B
  G-J       prompt tuning, P-tuning (MLP; H2: LSTM), prefix tuning (with its MLP) and P-tuning v2
            adapters from `tunebench lora-init --method M --config '{"num_virtual_tokens": 8, ...}'` →
            PEFT, as in A
  encoder   for H, H2 and I: PEFT's own PromptEncoder / PrefixEncoder loaded with our encoder's
            tensors (trainable_state.safetensors) reproduces the prompt_embeddings we saved
  K-O       the same methods made by PEFT (random init; P-tuning with an MLP and with an LSTM
            encoder), save_pretrained'ed (PEFT saves the encoder's output) → tunebench, as in B
            Logits are compared on the real tokens (PEFT also returns rows for the virtual
            tokens of prompt tuning and P-tuning).
  trained   (with --adapter DIR) an adapter trained by `tunebench train`, as in A
Pass: max|logit diff| <= tol * max(1, max|logit|) (tol 1e-2 by default); an adapter check also
needs the adapter to move the logits by more than that tolerance (else an ignored adapter
would pass). Exit status 0 when every check passes, 1 when one fails, 2 on a setup error.

CLI contract used (implemented by the Rust side):
  tunebench logits --model GGUF [--adapter DIR] --tokens ids.json --out out.safetensors
      ids.json: list of lists of token ids; out: f32 tensors logits.0, logits.1, ... of [seq_len, vocab]
  tunebench lora-init --model GGUF --out DIR --rank 8 --alpha 16
      --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --seed 1 --random-b
  tunebench lora-init --method ia3 --model GGUF --out DIR --targets k_proj,v_proj,down_proj
      --feedforward down_proj --seed 2 --random-b
  tunebench lora-init --method prompt_tuning|p_tuning|prefix_tuning|p_tuning_v2 --model GGUF --out DIR
      --config JSON --seed N

Run:
  py=$(scripts/pyenv | tail -n1)
  "$py" bench/peft_interop.py [--tunebench target/release/tunebench] [--model GGUF] [--adapter DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import shutil
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tbcommon as tb  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHAT = [{"role": "user", "content": "Give me three tips for staying healthy."}]
TEXTS = [
    "Fine-tuning a small language model on a laptop is slow, but it works if you are patient.",
    "低秩适配（LoRA）只训练很少的参数，却能让模型学会新的任务。",
    "for (int i = 0; i < n; ++i) {\n    sum += a[i] * b[i];\n}\n",
]
B_STD = 0.05  # std of the random lora_B of direction B
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]  # PEFT's IA3 defaults for Llama
IA3_FF = ["down_proj"]
DORA_TARGETS = ["q_proj", "v_proj", "down_proj"]
ADALORA_TARGETS = ["q_proj", "v_proj", "down_proj"]
ADALORA_INIT_R = 6


def adalora_pattern(layers: int, seed: int) -> dict:
    """A rank_pattern as AdaLoRA's allocator leaves it: random kept flags per module, one
    module with none kept (PEFT then saves empty tensors) and one with all."""
    import random
    rng = random.Random(seed)
    pattern = {}
    for i in range(layers):
        for m in ADALORA_TARGETS:
            part = "mlp" if m == "down_proj" else "self_attn"
            pattern[f"model.layers.{i}.{part}.{m}.lora_E"] = [rng.random() < 0.5 for _ in range(ADALORA_INIT_R)]
    keys = sorted(pattern)
    pattern[keys[0]] = [False] * ADALORA_INIT_R
    pattern[keys[1]] = [True] * ADALORA_INIT_R
    return pattern
N_VIRTUAL = 8
# Prompt-learning adapters made here: (check, method, --config)
PROMPT_INITS = [
    ("G: tunebench prompt tuning -> PEFT", "prompt_tuning", {"num_virtual_tokens": N_VIRTUAL}),
    ("H: tunebench P-tuning -> PEFT", "p_tuning", {"num_virtual_tokens": N_VIRTUAL, "encoder_hidden_size": 128}),
    ("H2: tunebench P-tuning LSTM -> PEFT", "p_tuning",
     {"num_virtual_tokens": N_VIRTUAL, "encoder_hidden_size": 64, "encoder_reparameterization_type": "LSTM"}),
    ("I: tunebench prefix tuning -> PEFT", "prefix_tuning", {"num_virtual_tokens": N_VIRTUAL, "encoder_hidden_size": 96}),
    ("J: tunebench P-tuning v2 -> PEFT", "p_tuning_v2", {"num_virtual_tokens": N_VIRTUAL}),
]


def main() -> int:
    ap = argparse.ArgumentParser(description="Tunebench <-> HF PEFT adapter interop check",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tunebench", default=tb.default_binary(),
                    help="tunebench binary (default: $TUNEBENCH_BIN or target/release/tunebench)")
    ap.add_argument("--model", default=tb.default_model(), help="GGUF file (default: %(default)s)")
    ap.add_argument("--adapter", action="append", default=[], metavar="DIR",
                    help="also check this PEFT-format adapter (e.g. trained by `tunebench train`); repeatable")
    ap.add_argument("--tol", type=float, default=1e-2,
                    help="max |diff| allowed, relative to max(1, max|logit|) (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=1234, help="seed of direction B's lora_B (default: %(default)s)")
    ap.add_argument("--keep", metavar="DIR", help="keep the adapters, token file and logits in DIR")
    args = ap.parse_args()

    tb.require_file(args.model, "model", "run scripts/setup")
    for d in args.adapter:
        if not os.path.isfile(os.path.join(d, "adapter_config.json")):
            tb.die(f"--adapter {d}: no adapter_config.json there")
    exe = tb.binary_argv(args.tunebench)

    import numpy as np
    import torch
    from peft import (AdaLoraConfig, IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
                      get_peft_model, get_peft_model_state_dict)
    from safetensors.numpy import load_file

    torch.set_num_threads(os.cpu_count() or 1)
    work = args.keep or tempfile.mkdtemp(prefix="tunebench-interop-")
    os.makedirs(work, exist_ok=True)

    base, tok = tb.load_hf(args.model, attn="eager")
    base.eval()
    pristine = copy.deepcopy(base)  # PEFT injects into the model it wraps: keep a clean copy per check
    texts = [tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)] + TEXTS
    token_ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    tokens_path = os.path.join(work, "tokens.json")
    with open(tokens_path, "w") as f:
        json.dump(token_ids, f)
    print(f"prompts: {len(token_ids)} ({', '.join(str(len(t)) for t in token_ids)} tokens); work dir {work}",
          file=sys.stderr)

    def hf_logits(model) -> list:
        out = []
        with torch.no_grad():
            for ids in token_ids:
                # The real tokens' rows: prompt tuning and P-tuning also return the virtual ones.
                out.append(model(torch.tensor([ids])).logits[0, -len(ids):].float().numpy())
        return out

    def ours_logits(tag: str, adapter: str | None) -> list:
        out = os.path.join(work, f"logits-{tag}.safetensors")
        argv = exe + ["logits", "--model", args.model, "--tokens", tokens_path, "--out", out]
        if adapter:
            argv += ["--adapter", adapter]
        tb.run_measured(argv).check(f"tunebench logits ({tag})")
        tensors = load_file(out)
        res = []
        for i, ids in enumerate(token_ids):
            name = f"logits.{i}"
            if name not in tensors:
                tb.die(f"{out}: no tensor {name} (has {sorted(tensors)[:8]})", 1)
            t = tensors[name]
            if t.dtype != np.float32 or t.shape != (len(ids), base.config.vocab_size):
                tb.die(f"{out}: {name} is {t.dtype}{list(t.shape)}, want float32[{len(ids)}, {base.config.vocab_size}]", 1)
            res.append(t)
        return res

    rows = []

    def compare(check: str, ref: list, ours: list, effect_vs: list | None = None) -> None:
        max_diff = max(float(np.abs(a - b).max()) for a, b in zip(ref, ours))
        max_logit = max(float(np.abs(a).max()) for a in ref)
        allowed = args.tol * max(1.0, max_logit)
        argmax_agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, ours))
        positions = sum(a.shape[0] for a in ref)
        ok = max_diff <= allowed
        effect = None
        note = ""
        if effect_vs is not None:
            effect = max(float(np.abs(a - b).max()) for a, b in zip(ref, effect_vs))
            if effect <= allowed:
                ok = False
                note = "adapter barely moves the logits: cannot tell loaded from ignored"
        if max_diff > allowed:
            note = f"logits differ by more than {allowed:.3g}"
        rows.append((check, max_diff, max_logit, max_diff / max(1.0, max_logit), effect,
                     f"{argmax_agree}/{positions}", ok, note))

    def peft_check_loaded(model, adapter_dir: str) -> str | None:
        """None if PEFT holds exactly the adapter file's tensors, else what is wrong."""
        from safetensors.torch import load_file as load_torch

        path = os.path.join(adapter_dir, "adapter_model.safetensors")
        if not os.path.isfile(path):
            return f"{path} missing"
        file_sd = load_torch(path)
        held = get_peft_model_state_dict(model)
        missing = sorted(set(held) - set(file_sd))
        extra = sorted(set(file_sd) - set(held))
        if missing or extra:
            return (f"key mismatch with PEFT: {len(missing)} missing (e.g. {missing[:2]}), "
                    f"{len(extra)} unexpected (e.g. {extra[:2]})")
        for k, v in file_sd.items():
            if held[k].shape != v.shape or not torch.equal(held[k].float(), v.float()):
                return f"{k}: PEFT holds a different tensor than the file ({list(held[k].shape)} vs {list(v.shape)})"
        lora = any(k.endswith("lora_B.weight") for k in file_sd)
        if lora and not any(k.endswith("lora_B.weight") and bool(v.abs().max() > 0) for k, v in file_sd.items()):
            return "all lora_B are zero: the adapter is a no-op"
        return None

    # --- base -------------------------------------------------------------------------------
    ref_base = hf_logits(base)
    compare("base: tunebench vs transformers", ref_base, ours_logits("base", None))

    # --- A: tunebench lora-init -> PEFT ---------------------------------------------------------
    dir_a = os.path.join(work, "adapter-tunebench-init")
    tb.run_measured(exe + ["lora-init", "--model", args.model, "--out", dir_a, "--rank", "8", "--alpha", "16",
                           "--targets", ",".join(TARGETS), "--seed", "1", "--random-b"]).check("tunebench lora-init")
    dir_c = os.path.join(work, "adapter-tunebench-ia3")
    tb.run_measured(exe + ["lora-init", "--method", "ia3", "--model", args.model, "--out", dir_c,
                           "--targets", ",".join(IA3_TARGETS), "--feedforward", ",".join(IA3_FF), "--seed", "2",
                           "--random-b"]).check("tunebench lora-init --method ia3")
    dir_e = os.path.join(work, "adapter-tunebench-dora")
    tb.run_measured(exe + ["lora-init", "--dora", "--model", args.model, "--out", dir_e, "--rank", "4", "--alpha", "8",
                           "--targets", ",".join(DORA_TARGETS), "--seed", "3", "--random-b"]).check("tunebench lora-init --dora")
    n_layers = pristine.config.num_hidden_layers
    dir_p = os.path.join(work, "adapter-tunebench-adalora")
    ada_keys = {"init_r": ADALORA_INIT_R, "target_r": 3, "lora_alpha": 12, "target_modules": ADALORA_TARGETS,
                "total_step": 100, "rank_pattern": adalora_pattern(n_layers, args.seed + 5)}
    tb.run_measured(exe + ["lora-init", "--method", "adalora", "--model", args.model, "--out", dir_p, "--config",
                           json.dumps(ada_keys), "--seed", "4", "--random-b"]).check("tunebench lora-init --method adalora")
    prompt_dirs = []
    for i, (check, method, keys) in enumerate(PROMPT_INITS):
        d = os.path.join(work, f"adapter-tunebench-{i}-{method}")
        tb.run_measured(exe + ["lora-init", "--method", method, "--model", args.model, "--out", d,
                               "--config", json.dumps(keys), "--seed", str(10 + i)]).check(f"tunebench lora-init --method {method}")
        prompt_dirs.append((check, d))
    def encoder_check(check: str, adir: str) -> None:
        """PEFT's encoder module, given our encoder's tensors, must output our prompt_embeddings."""
        from peft import PeftConfig
        from peft.tuners.p_tuning import PromptEncoder
        from peft.tuners.prefix_tuning import PrefixEncoder
        from safetensors.torch import load_file as load_torch

        cfg = PeftConfig.from_pretrained(adir)
        cfg.inference_mode = False
        if cfg.encoder_hidden_size is None:
            cfg.encoder_hidden_size = cfg.token_dim
        enc = PrefixEncoder(cfg) if cfg.peft_type == "PREFIX_TUNING" else PromptEncoder(cfg)
        state = load_torch(os.path.join(adir, "trainable_state.safetensors"))
        enc.load_state_dict({k.removeprefix("prompt_encoder."): v.float() for k, v in state.items()}, strict=True)
        enc.eval()
        with torch.no_grad():
            ref = enc(torch.arange(cfg.num_virtual_tokens)).numpy()
        ours = load_file(os.path.join(adir, "adapter_model.safetensors"))["prompt_embeddings"]
        diff = float(np.abs(ref - ours).max())
        scale = float(np.abs(ref).max())
        ok = ours.shape == ref.shape and diff <= 1e-5 * max(1.0, scale)
        rows.append((check, diff, scale, diff / max(1.0, scale), None, "", ok,
                     "" if ok else f"encoder output differs (shapes {list(ours.shape)} vs {list(ref.shape)})"))

    for check, d in prompt_dirs:
        if os.path.isfile(os.path.join(d, "trainable_state.safetensors")) and ("P-tuning" in check or "prefix" in check):
            if json.load(open(os.path.join(d, "adapter_config.json"))).get("prefix_projection") is False:
                continue
            encoder_check(check.split(":")[0] + ": encoder = PEFT's module", d)

    adapter_checks = [("A: tunebench lora-init -> PEFT", dir_a), ("C: tunebench IA3 -> PEFT", dir_c),
                      ("E: tunebench DoRA -> PEFT", dir_e), ("P: tunebench AdaLoRA -> PEFT", dir_p)] + prompt_dirs + [
        (f"trained: {os.path.basename(os.path.normpath(d))} -> PEFT", d) for d in args.adapter]
    for check, adir in adapter_checks:
        cfg = json.load(open(os.path.join(adir, "adapter_config.json")))
        known = ("LORA", "ADALORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
        if cfg.get("peft_type") not in known:
            rows.append((check, None, None, None, None, "", False, f"peft_type {cfg.get('peft_type')!r}, want one of {known}"))
            continue
        model = PeftModel.from_pretrained(copy.deepcopy(pristine), adir)
        model.eval()
        problem = peft_check_loaded(model, adir)
        if problem:
            rows.append((check, None, None, None, None, "", False, problem))
            continue
        compare(check, hf_logits(model), ours_logits(os.path.basename(adir), adir), effect_vs=ref_base)
        del model

    # --- B, D, F: PEFT -> tunebench ---------------------------------------------------------
    def peft_made(check: str, tag: str, cfg, seed: int, randomize, prepare=None) -> None:
        """Make an adapter with PEFT, give its tensors non-trivial values, save it, and compare
        PEFT's logits with ours on the saved folder."""
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(pristine), cfg)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                randomize(name, p, gen)
        if prepare is not None:
            prepare(model)
        model.eval()
        adir = os.path.join(work, f"adapter-{tag}")
        model.save_pretrained(adir)
        compare(check, hf_logits(model), ours_logits(tag, adir), effect_vs=ref_base)

    def random_lora_b(name, p, gen):
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * B_STD)

    def random_dora(name, p, gen):
        random_lora_b(name, p, gen)
        if "lora_magnitude_vector" in name:
            p.mul_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)

    def random_ia3(name, p, gen):
        if "ia3_l" in name:
            p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.2)

    peft_made("B: PEFT save_pretrained -> tunebench", "peft",
              LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                         task_type="CAUSAL_LM"), args.seed, random_lora_b)
    peft_made("D: PEFT IA3 save_pretrained -> tunebench", "peft-ia3",
              IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FF, task_type="CAUSAL_LM"),
              args.seed + 1, random_ia3)
    peft_made("F: PEFT DoRA save_pretrained -> tunebench", "peft-dora",
              LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=DORA_TARGETS, use_dora=True,
                         task_type="CAUSAL_LM"), args.seed + 2, random_dora)

    def random_adalora(name, p, gen):
        if "lora_E" in name:
            p.copy_(torch.randn(p.shape, generator=gen))

    def adalora_masked(model):
        # What the allocator leaves: Λ zeroed outside the pattern, the pattern in the config
        # (save_pretrained then writes only the kept triplets).
        pattern = adalora_pattern(n_layers, args.seed + 6)
        model.base_model.rankallocator.mask_using_rank_pattern(model.base_model.model, pattern)
        model.peft_config["default"].rank_pattern = pattern

    peft_made("Q: PEFT AdaLoRA save_pretrained -> tunebench", "peft-adalora",
              AdaLoraConfig(init_r=ADALORA_INIT_R, target_r=3, lora_alpha=12, total_step=100, target_modules=ADALORA_TARGETS,
                            task_type="CAUSAL_LM"), args.seed + 3, random_adalora, adalora_masked)

    def keep(name, p, gen):
        pass  # prompt-learning modules start random in PEFT already

    for check, tag, cfg, seed in [
        ("K: PEFT prompt tuning -> tunebench", "peft-prompt",
         PromptTuningConfig(num_virtual_tokens=N_VIRTUAL, task_type="CAUSAL_LM"), 21),
        ("L: PEFT P-tuning (MLP) -> tunebench", "peft-ptuning",
         PromptEncoderConfig(num_virtual_tokens=N_VIRTUAL, encoder_hidden_size=128, task_type="CAUSAL_LM"), 22),
        ("M: PEFT P-tuning (LSTM) -> tunebench", "peft-ptuning-lstm",
         PromptEncoderConfig(num_virtual_tokens=N_VIRTUAL, encoder_hidden_size=64, encoder_reparameterization_type="LSTM",
                             task_type="CAUSAL_LM"), 23),
        ("N: PEFT prefix tuning -> tunebench", "peft-prefix",
         PrefixTuningConfig(num_virtual_tokens=N_VIRTUAL, prefix_projection=True, encoder_hidden_size=96,
                            task_type="CAUSAL_LM"), 24),
        ("O: PEFT P-tuning v2 -> tunebench", "peft-prefix-v2",
         PrefixTuningConfig(num_virtual_tokens=N_VIRTUAL, task_type="CAUSAL_LM"), 25),
    ]:
        peft_made(check, tag, cfg, seed, keep)

    # --- report -----------------------------------------------------------------------------
    head = f"{'check':<40} {'max|diff|':>10} {'max|logit|':>10} {'diff/scale':>10} {'adapter effect':>14} {'argmax':>9}  result"
    print(head)
    print("-" * len(head))
    def fmt(v, f):
        width = int(f.split(".")[0])
        return "-".rjust(width) if v is None else format(v, f)

    for check, md, ml, rel, eff, agree, ok, note in rows:
        print(f"{check:<40} {fmt(md, '10.3e')} {fmt(ml, '10.3f')} {fmt(rel, '10.2e')} {fmt(eff, '14.3f')} "
              f"{agree:>9}  {'PASS' if ok else 'FAIL'}{'  (' + note + ')' if note else ''}")
    print(f"tolerance: max|diff| <= {args.tol:g} * max(1, max|logit|); 'adapter effect' = max|logits(adapter) - logits(base)| "
          f"in the reference, which must exceed that tolerance")
    failed = [r for r in rows if not r[6]]
    if failed or args.keep:
        print(f"adapters, token ids and logits kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
