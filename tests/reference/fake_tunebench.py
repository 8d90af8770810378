"""A PyTorch stand-in for the tunebench CLI commands the bench/ scripts call, to test those
scripts themselves before (or apart from) the Rust binary:

  "$py" bench/peft_interop.py --tunebench tests/reference/fake_tunebench.py
  "$py" bench/cpu_lora_bench.py --tunebench tests/reference/fake_tunebench.py

Commands (same arguments as the real CLI contract):
  logits --model GGUF [--adapter DIR] --tokens ids.json --out out.safetensors
      applies the adapter by merging W += (lora_alpha / r) * B @ A read straight from the PEFT
      files (independent of PEFT's own loading code)
  lora-init --model GGUF --out DIR --rank R --alpha A --targets a,b,... --seed S [--random-b]
  bench-train --model GGUF --batches F --rank R --alpha A --targets all-linear|a,b --lr LR
      --warmup-steps W --steps K        (runs the PyTorch+PEFT reference loop)

FAKE_TUNEBENCH_BREAK=ignore-adapter | permuted-qk | zero-b makes it wrong on purpose, to see
that the checks fail.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench"))
import tbcommon as tb  # noqa: E402

BREAK = os.environ.get("FAKE_TUNEBENCH_BREAK", "")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cmd_logits(a) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    model, _ = tb.load_hf(a.model, attn="eager")
    model.eval()
    if BREAK == "permuted-qk":  # what a loader that forgets to un-permute would compute
        for layer in model.model.layers:
            for lin, heads in ((layer.self_attn.q_proj, model.config.num_attention_heads),
                               (layer.self_attn.k_proj, model.config.num_key_value_heads)):
                w = lin.weight.data
                half = w.shape[0] // heads // 2
                lin.weight.data = w.reshape(heads, 2, half, -1).transpose(1, 2).reshape(w.shape).contiguous()
    if a.adapter and BREAK != "ignore-adapter":
        cfg = json.load(open(os.path.join(a.adapter, "adapter_config.json")))
        scale = cfg["lora_alpha"] / cfg["r"]
        sd = load_file(os.path.join(a.adapter, "adapter_model.safetensors"))
        params = dict(model.named_parameters())
        n = 0
        for key, lora_a in sd.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            lora_b = sd[key.replace(".lora_A.", ".lora_B.")]
            with torch.no_grad():
                params[module + ".weight"] += scale * (lora_b.float() @ lora_a.float())
            n += 1
        print(f"fake: merged {n} LoRA pairs (scale {scale})", file=sys.stderr)
    tokens = json.load(open(a.tokens))
    out = {}
    with torch.no_grad():
        for i, ids in enumerate(tokens):
            out[f"logits.{i}"] = model(torch.tensor([ids])).logits[0].float().contiguous()
    save_file(out, a.out)


def cmd_lora_init(a) -> None:
    import torch
    from safetensors.torch import save_file

    model, _ = tb.load_hf(a.model)
    targets = ALL if a.targets in ("all", "all-linear") else a.targets.split(",")
    gen = torch.Generator().manual_seed(a.seed)
    sd = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(mod, torch.nn.Linear):
            bound = 1 / math.sqrt(mod.in_features)
            sd[f"base_model.model.{name}.lora_A.weight"] = (torch.rand(a.rank, mod.in_features, generator=gen) * 2 - 1) * bound
            b = torch.randn(mod.out_features, a.rank, generator=gen) * 0.05
            if not a.random_b or BREAK == "zero-b":
                b.zero_()
            sd[f"base_model.model.{name}.lora_B.weight"] = b
    os.makedirs(a.out, exist_ok=True)
    save_file(sd, os.path.join(a.out, "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": os.path.basename(a.model),
           "r": a.rank, "lora_alpha": int(a.alpha) if float(a.alpha).is_integer() else a.alpha, "lora_dropout": 0.0, "bias": "none", "target_modules": targets,
           "inference_mode": True, "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}
    with open(os.path.join(a.out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def cmd_bench_train(a) -> None:
    import cpu_lora_bench

    res = cpu_lora_bench.reference_train(a.model, a.batches, a.rank, a.alpha, a.targets, a.lr,
                                         a.warmup_steps, a.steps, os.cpu_count() or 1)
    print(json.dumps({"tokens_per_s": res["tokens_per_s"], "peak_rss_bytes": tb.self_peak_rss_bytes(),
                      "losses": res["losses"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("logits")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    p.add_argument("--tokens", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("lora-init")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--alpha", type=float, required=True)
    p.add_argument("--targets", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-b", action="store_true")
    p = sub.add_parser("bench-train")
    p.add_argument("--model", required=True)
    p.add_argument("--batches", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--alpha", type=float, required=True)
    p.add_argument("--targets", required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--warmup-steps", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    a = ap.parse_args()
    {"logits": cmd_logits, "lora-init": cmd_lora_init, "bench-train": cmd_bench_train}[a.cmd](a)


if __name__ == "__main__":
    main()
