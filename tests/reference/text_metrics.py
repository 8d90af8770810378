"""Checks tunebench's text metrics (src/eval/metrics.rs) against the reference implementations:
sacrebleu for BLEU (corpus_bleu / sentence_bleu with their defaults, tokenizers '13a' and 'zh')
and Google's rouge-score for ROUGE-1/2/L (RougeScorer, use_stemmer=False).

The Rust side is `tests/text_metrics.rs`: run with TUNEBENCH_METRICS_OUT=FILE it writes, for
every pair of tests/fixtures/text_metrics_pairs.jsonl and each language mode (en, zh, auto),
its token lists, sentence BLEU and ROUGE, and per mode the corpus BLEU and score_corpus. This
script recomputes all of it with the references and requires equal token lists, equal
lengths, BLEU within 1e-4 points and ROUGE within 1e-6.

    py=$(bash scripts/pyenv | tail -n1)
    "$py" tests/reference/text_metrics.py            # runs `cargo test --workspace --test text_metrics`
    "$py" tests/reference/text_metrics.py --scores FILE   # or checks a FILE written before

ROUGE for Chinese: rouge-score's default tokenizer deletes everything but [a-z0-9], so Chinese
pairs get the tokenizer below (each CJK ideograph a token, plus the default's lowercase
letter/digit runs) passed to RougeScorer as its `tokenizer`, the documented rule of
tunebench's `rouge_tokenize`; what is checked there is rouge-score's counting (n-gram overlap,
LCS, precision/recall/F) on those tokens.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import sacrebleu
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "text_metrics_pairs.jsonl")
BLEU_TOL = 1e-4   # BLEU points (score and precisions are 0..100)
ROUGE_TOL = 1e-6  # ROUGE precision/recall/F1 (0..1); the corpus means are x100, checked at 1e-4
ROUGE_TYPES = ["rouge1", "rouge2", "rougeL"]
RUST_ROUGE_KEYS = {"rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rouge_l"}

# CJK ideographs: Unified Ideographs + extension A, Compatibility Ideographs, planes 2-3
# (extensions B onwards), and U+3007.
IDEOGRAPH = "[\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003fffd]"
ZH_ROUGE_TOKEN = re.compile(IDEOGRAPH + "|[a-z0-9]+")


class ZhRougeTokenizer:
    """rouge-score's default rule (lowercase, [a-z0-9] runs) plus one token per ideograph."""

    def tokenize(self, text):
        return ZH_ROUGE_TOKEN.findall(text.lower())


BLEU_TOKENIZERS = {"en": Tokenizer13a(), "zh": TokenizerZh()}
SACREBLEU_NAME = {"en": "13a", "zh": "zh"}
SCORERS = {
    "en": rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=False),
    "zh": rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=False, tokenizer=ZhRougeTokenizer()),
}


def bleu_tokens(text, lang):
    """The tokens sacrebleu's BLEU counts (it rstrips each segment before tokenizing)."""
    return BLEU_TOKENIZERS[lang](text.rstrip()).split()


def rouge_tokens(text, lang):
    if lang == "en":
        return rouge_tokenize.tokenize(text, None)
    return ZhRougeTokenizer().tokenize(text)


class Diffs:
    """Largest absolute difference seen per metric, and the failures."""

    def __init__(self):
        self.max = {}
        self.failures = []
        self.exact = 0  # token lists, lengths and languages compared for equality

    def num(self, metric, ours, ref, tol, where):
        d = abs(float(ours) - float(ref))
        self.max[metric] = max(self.max.get(metric, 0.0), d)
        if not d <= tol:
            self.failures.append(
                f"{where}: {metric}: tunebench {ours!r} vs reference {ref!r} (|diff| {d:.3g} > {tol})"
            )

    def same(self, what, ours, ref, where):
        self.exact += 1
        if ours != ref:
            self.failures.append(f"{where}: {what}: tunebench {ours!r} vs reference {ref!r}")


def check_bleu(diffs, prefix, ours, ref, where):
    diffs.num(f"{prefix} score", ours["score"], ref.score, BLEU_TOL, where)
    for n, (p, q) in enumerate(zip(ours["precisions"], ref.precisions), 1):
        diffs.num(f"{prefix} precision-{n}", p, q, BLEU_TOL, where)
    diffs.num(f"{prefix} bp", ours["bp"], ref.bp, 1e-9, where)
    diffs.same(f"{prefix} sys_len", ours["sys_len"], ref.sys_len, where)
    diffs.same(f"{prefix} ref_len", ours["ref_len"], ref.ref_len, where)


def run_rust(out_path):
    env = dict(os.environ, TUNEBENCH_METRICS_OUT=out_path)
    # --workspace: the same feature resolution as scripts/test, so nothing is rebuilt.
    cmd = ["cargo", "test", "--quiet", "--workspace", "--test", "text_metrics"]
    print("text_metrics: running", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scores", help="JSON written by tests/text_metrics.rs (default: run it)")
    args = ap.parse_args()

    if args.scores:
        with open(args.scores) as f:
            rust = json.load(f)
    else:
        with tempfile.TemporaryDirectory() as td:
            path = os.path.join(td, "scores.json")
            run_rust(path)
            with open(path) as f:
                rust = json.load(f)

    with open(FIXTURE) as f:
        fixture = [json.loads(line) for line in f if line.strip()]
    assert len(rust["pairs"]) == len(fixture), "the scores are not for this fixture"

    # The zh ROUGE tokenizer must be rouge-score's own on text without ideographs.
    for p in fixture:
        for text in (p["hyp"], p["ref"]):
            if not re.search(IDEOGRAPH, text):
                assert ZhRougeTokenizer().tokenize(text) == rouge_tokenize.tokenize(text, None), text

    diffs = Diffs()
    for i, (p, r) in enumerate(zip(fixture, rust["pairs"]), 1):
        hyp, ref = p["hyp"], p["ref"]
        assert (r["hyp"], r["ref"]) == (hyp, ref), f"pair {i} differs from the fixture"
        for mode, m in r["modes"].items():
            lang = p["lang"] if mode == "auto" else mode
            where = f"pair {i} ({p['note']}), {mode}"
            diffs.same("lang", m["lang"], lang, where)
            diffs.same("hyp BLEU tokens", m["hyp_tokens"], bleu_tokens(hyp, lang), where)
            diffs.same("ref BLEU tokens", m["ref_tokens"], bleu_tokens(ref, lang), where)
            diffs.same("hyp ROUGE tokens", m["hyp_rouge_tokens"], rouge_tokens(hyp, lang), where)
            diffs.same("ref ROUGE tokens", m["ref_rouge_tokens"], rouge_tokens(ref, lang), where)

            ref_bleu = sacrebleu.sentence_bleu(hyp, [ref], tokenize=SACREBLEU_NAME[lang])
            check_bleu(diffs, "sentence BLEU", m["sentence_bleu"], ref_bleu, where)

            ref_rouge = SCORERS[lang].score(ref, hyp)  # (target, prediction)
            for t in ROUGE_TYPES:
                ours = m["rouge"][RUST_ROUGE_KEYS[t]]
                diffs.num(f"{t} precision", ours["precision"], ref_rouge[t].precision, ROUGE_TOL, where)
                diffs.num(f"{t} recall", ours["recall"], ref_rouge[t].recall, ROUGE_TOL, where)
                diffs.num(f"{t} F1", ours["f1"], ref_rouge[t].fmeasure, ROUGE_TOL, where)

    hyps = [p["hyp"] for p in fixture]
    refs = [p["ref"] for p in fixture]
    for mode, c in rust["corpus"].items():
        where = f"corpus, {mode}"
        if mode == "auto":
            # One tokenizer per pair: tokenize each pair as its language, then score the
            # tokens with sacrebleu's no-op tokenizer.
            langs = [p["lang"] for p in fixture]
            ref_bleu = sacrebleu.corpus_bleu(
                [" ".join(bleu_tokens(h, l)) for h, l in zip(hyps, langs)],
                [[" ".join(bleu_tokens(r, l)) for r, l in zip(refs, langs)]],
                tokenize="none",
            )
        else:
            langs = [mode] * len(fixture)
            ref_bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize=SACREBLEU_NAME[mode])
        check_bleu(diffs, "corpus BLEU", c["bleu"], ref_bleu, where)
        s = c["scores"]
        diffs.num("score_corpus bleu4", s["bleu4"], ref_bleu.score, BLEU_TOL, where)
        diffs.same("score_corpus n", s["n"], len(fixture), where)
        for t in ROUGE_TYPES:
            f1s = [SCORERS[l].score(r, h)[t].fmeasure for h, r, l in zip(hyps, refs, langs)]
            mean = 100.0 * sum(f1s) / len(f1s)
            diffs.num(f"score_corpus {t} (x100)", s[RUST_ROUGE_KEYS[t]], mean, 100 * ROUGE_TOL, where)

    print(f"text_metrics: {len(fixture)} pairs x 3 modes (en, zh, auto); max |tunebench - reference|:")
    for metric in sorted(diffs.max):
        print(f"  {metric:32s} {diffs.max[metric]:.3g}")
    print(f"  {'token lists, lengths, languages':32s} {diffs.exact} compared for equality")
    if diffs.failures:
        print(f"text_metrics: {len(diffs.failures)} disagreements:", file=sys.stderr)
        for line in diffs.failures:
            print("  " + line, file=sys.stderr)
        sys.exit(1)
    print("text_metrics: tunebench agrees with sacrebleu and rouge-score")


if __name__ == "__main__":
    main()
