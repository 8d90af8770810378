"""Reference logits of the default model, computed by PyTorch + transformers, for the Rust loader tests.

transformers reads the GGUF itself (AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)):
it dequantizes every tensor to float32 with the `gguf` package, un-permutes the q/k projection
rows that llama.cpp's converter permuted for interleaved RoPE, and ties lm_head to the
embedding (the file has no output.weight). The tokenizer is built from the GGUF metadata the
same way. Logits are computed in float32 with eager attention.

Writes tests/fixtures/smollm2_reference_logits.json:
  prompts[]: text, token ids (add_special_tokens=False), and for EVERY position the top-5 token
             ids with their logits and the logsumexp of that position's logits (6 significant
             digits); the chat prompt also carries its greedy 20-token continuation.
  weights_probe: the first 8 values of a few rows of named tensors, as HF holds them (after
             un-permutation), for tensor-by-tensor checks of the Rust loader.

Run (about 30 s on 2 cores):
  py=$(scripts/pyenv | tail -n1)
  "$py" tests/reference/make_logits_fixture.py [--model PATH.gguf] [--out PATH.json]
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never try the network
os.environ.setdefault("TQDM_DISABLE", "1")    # transformers' GGUF dequantization progress bar

DEFAULT_MODEL = os.path.join(
    os.environ.get("TUNEBENCH_HOME")
    or os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "tunebench"),
    "models",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "smollm2_reference_logits.json")

CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PLAIN_PROMPTS = [
    ("english", "The quick brown fox jumps over the lazy dog, and then it runs back into the forest."),
    ("chinese", "机器学习是人工智能的一个分支，它让计算机能够从数据中学习规律。"),
    ("code", "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"),
]
GREEDY_TOKENS = 20

# (HF tensor name, rows). Rows 0 and 64 of q_proj and row 0 of k_proj are fixed points of the
# llama.cpp q/k permutation (row h*64 + 2j + i  <->  row h*64 + 32i + j), so they do not tell a
# permuted load from an un-permuted one; rows 1 and 33 (q) and 1 (k) do.
PROBES = [
    ("model.layers.0.self_attn.q_proj.weight", [0, 64, 1, 33]),
    ("model.layers.0.self_attn.k_proj.weight", [0, 1]),
    ("model.embed_tokens.weight", [100]),
    ("model.layers.0.mlp.down_proj.weight", [0]),
]


def sig6(x: float) -> float:
    return float(f"{float(x):.6g}")


def f32(x) -> float:
    """The shortest decimal that round-trips the float32 value exactly."""
    return float(str(np.float32(x)))


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_unpermuted(model, gguf_path: str) -> None:
    """Assert HF's q/k rows equal the GGUF rows under the inverse llama.cpp permutation."""
    from gguf import GGUFReader, dequantize

    cfg = model.config
    tensors = {t.name: t for t in GGUFReader(gguf_path).tensors}
    for name, hf, n_head in [
        ("blk.0.attn_q.weight", model.model.layers[0].self_attn.q_proj.weight, cfg.num_attention_heads),
        ("blk.0.attn_k.weight", model.model.layers[0].self_attn.k_proj.weight, cfg.num_key_value_heads),
    ]:
        t = tensors[name]
        raw = dequantize(t.data, t.tensor_type).reshape(hf.shape)  # GGUF row order (permuted)
        half = raw.shape[0] // n_head // 2
        unperm = raw.reshape(n_head, half, 2, -1).swapaxes(1, 2).reshape(raw.shape)
        hf_np = hf.detach().numpy()
        assert np.array_equal(hf_np, unperm), f"{name}: HF weight is not the un-permuted GGUF tensor"
        assert not np.array_equal(hf_np, raw), f"{name}: permutation is a no-op?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="GGUF file (default: %(default)s)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output JSON (default: %(default)s)")
    args = ap.parse_args()
    if not os.path.isfile(args.model):
        sys.exit(f"model not found: {args.model} (run scripts/setup)")

    import torch
    import transformers
    import gguf
    import tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    model_dir, model_file = os.path.split(os.path.abspath(args.model))
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=model_file, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    check_unpermuted(model, args.model)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    chat_text = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    prompts = [("chat", chat_text)] + PLAIN_PROMPTS

    out_prompts = []
    for name, text in prompts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text, f"{name}: tokenizer does not round-trip"
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()  # [seq, vocab]
        top = torch.topk(logits, 5, dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        entry = {
            "name": name,
            "text": text,
            "token_ids": ids,
            "top5_ids": top.indices.tolist(),
            "top5_logits": [[sig6(v) for v in row] for row in top.values.tolist()],
            "logsumexp": [sig6(v) for v in lse.tolist()],
        }
        if name == "chat":
            entry["messages"] = CHAT_MESSAGES
            with torch.no_grad():
                gen = model.generate(
                    torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    do_sample=False,
                    max_new_tokens=GREEDY_TOKENS,
                    min_new_tokens=GREEDY_TOKENS,  # run all 20 steps even past <|im_end|>
                    pad_token_id=tok.pad_token_id,
                )
            cont = gen[0, len(ids):].tolist()
            entry["greedy_continuation_ids"] = cont
            entry["greedy_continuation_text"] = tok.decode(cont)
        out_prompts.append(entry)
        print(f"{name}: {len(ids)} tokens, argmax of last position {entry['top5_ids'][-1][0]}", file=sys.stderr)

    params = dict(model.named_parameters())
    probe = []
    for tname, rows in PROBES:
        w = params[tname].detach().numpy()
        for r in rows:
            probe.append({"tensor": tname, "shape": list(w.shape), "row": r, "first8": [f32(v) for v in w[r, :8]]})

    cfg = model.config
    doc = {
        "description": "Reference float32 logits of SmolLM2-135M-Instruct (Q4_1 GGUF) from PyTorch + transformers.",
        "generated_by": {
            "command": "py=$(scripts/pyenv | tail -n1); \"$py\" tests/reference/make_logits_fixture.py",
            "script": "tests/reference/make_logits_fixture.py",
            "date": datetime.date.today().isoformat(),
            "python": platform.python_version(),
            "torch": torch.__version__ + " (CPU execution)",
            "transformers": transformers.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
        },
        "model": {
            "file": model_file,
            "sha256": sha256(args.model),
            "loaded_with": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32, attn_implementation='eager')",
            "dequantized_dtype": "float32",
            "qk_unpermuted": True,
            "lm_head_tied_to_embed_tokens": tied,
            "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size,
            "rope_theta": (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None)),
            "rms_norm_eps": cfg.rms_norm_eps,
        },
        "notes": [
            "token_ids come from the HF tokenizer built from the GGUF metadata with add_special_tokens=False "
            "(this tokenizer adds no BOS anyway); the chat prompt is tok.apply_chat_template(messages, "
            "add_generation_prompt=True), which inserts SmolLM's default system prompt.",
            "top5_ids[i], top5_logits[i] and logsumexp[i] belong to position i (the prediction of token i+1); "
            "floats are rounded to 6 significant digits.",
            "greedy_continuation_ids: 20 greedy steps with min_new_tokens=20, so it continues past <|im_end|> if generated.",
            "weights_probe values are exact float32 (shortest round-trip decimal) of HF's tensors after dequantization "
            "and q/k un-permutation (the script asserts HF q/k == inverse-permuted raw GGUF rows). "
            "q_proj rows 0, 64 and k_proj row 0 are fixed points of the permutation; q rows 1, 33 and k row 1 are not.",
        ],
        "prompts": out_prompts,
        "weights_probe": probe,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    text = json.dumps(doc, ensure_ascii=False, indent=1)
    # One position per line keeps the file small and readable: collapse the innermost lists.
    text = _collapse_number_lists(text)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)", file=sys.stderr)
    return 0


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _collapse_number_lists(text: str) -> str:
    """Put every JSON list that holds only numbers on one line."""
    import re

    pattern = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")
    return pattern.sub(lambda m: "[" + ", ".join(s.strip() for s in m.group(1).split(",")) + "]", text)


if __name__ == "__main__":
    sys.exit(main())
