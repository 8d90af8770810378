//! Text metrics (`tunebench::eval::metrics`) on the fixed fixture of English and Chinese pairs:
//! sanity properties here; agreement with sacrebleu and rouge-score is checked by
//! `tests/reference/text_metrics.py`, which runs this test with `TUNEBENCH_METRICS_OUT=FILE`
//! so that every token list and score computed here is written to FILE as JSON.

use serde::Deserialize;
use serde_json::{json, Value};
use tunebench::eval::metrics::{
    corpus_bleu, rouge, rouge_tokenize, score_corpus, sentence_bleu, tokenize, Bleu, Lang, Rouge,
};

#[derive(Deserialize)]
struct Pair {
    hyp: String,
    #[serde(rename = "ref")]
    reference: String,
    /// What `Lang::Auto` must resolve the pair to.
    lang: Lang,
    note: String,
}

fn pairs() -> Vec<Pair> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/text_metrics_pairs.jsonl");
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).unwrap_or_else(|e| panic!("{path}:{}: {e}", i + 1)))
        .collect()
}

const MODES: [(&str, Lang); 3] = [("en", Lang::En), ("zh", Lang::Zh), ("auto", Lang::Auto)];

fn assert_bleu_in_range(b: &Bleu, what: &str) {
    assert!((0.0..=100.0 + 1e-9).contains(&b.score), "{what}: {b:?}");
    assert!(b.precisions.iter().all(|p| (0.0..=100.0 + 1e-9).contains(p)), "{what}: {b:?}");
    assert!((0.0..=1.0).contains(&b.bp), "{what}: {b:?}");
}

fn assert_rouge_in_range(r: &Rouge, what: &str) {
    for s in [r.rouge1, r.rouge2, r.rouge_l] {
        for v in [s.precision, s.recall, s.f1] {
            assert!((0.0..=1.0).contains(&v), "{what}: {r:?}");
        }
    }
}

#[test]
fn text_metrics_on_fixture() {
    let pairs = pairs();
    assert!(pairs.len() >= 30, "the fixture has {} pairs", pairs.len());
    let mut out_pairs = Vec::new();
    for (i, p) in pairs.iter().enumerate() {
        let what = format!("pair {} ({})", i + 1, p.note);
        assert_eq!(Lang::Auto.resolve(&p.hyp, &p.reference), p.lang, "{what}");
        let mut modes = serde_json::Map::new();
        for (name, mode) in MODES {
            let lang = mode.resolve(&p.hyp, &p.reference);
            let bleu = sentence_bleu(&p.hyp, &p.reference, mode);
            let r = rouge(&p.hyp, &p.reference, mode);
            let what = format!("{what}, {name}");
            assert_bleu_in_range(&bleu, &what);
            assert_rouge_in_range(&r, &what);
            let hyp_rouge_tokens = rouge_tokenize(&p.hyp, lang);
            if p.hyp == p.reference {
                assert!((bleu.score - 100.0).abs() < 1e-9, "{what}: {bleu:?}");
                if !hyp_rouge_tokens.is_empty() {
                    assert_eq!((r.rouge1.f1, r.rouge_l.f1), (1.0, 1.0), "{what}");
                }
                if hyp_rouge_tokens.len() >= 2 {
                    assert_eq!(r.rouge2.f1, 1.0, "{what}");
                }
            }
            if p.note.contains("no overlap") || p.hyp.trim().is_empty() {
                assert_eq!(bleu.score, 0.0, "{what}: {bleu:?}");
                assert_eq!((r.rouge1.f1, r.rouge2.f1, r.rouge_l.f1), (0.0, 0.0, 0.0), "{what}");
            }
            modes.insert(
                name.into(),
                json!({
                    "lang": lang,
                    "hyp_tokens": tokenize(&p.hyp, lang),
                    "ref_tokens": tokenize(&p.reference, lang),
                    "hyp_rouge_tokens": hyp_rouge_tokens,
                    "ref_rouge_tokens": rouge_tokenize(&p.reference, lang),
                    "sentence_bleu": bleu,
                    "rouge": r,
                }),
            );
        }
        out_pairs.push(json!({ "hyp": p.hyp, "ref": p.reference, "modes": modes }));
    }

    let hyps: Vec<&str> = pairs.iter().map(|p| p.hyp.as_str()).collect();
    let refs: Vec<&str> = pairs.iter().map(|p| p.reference.as_str()).collect();
    let mut corpus = serde_json::Map::new();
    for (name, mode) in MODES {
        let bleu = corpus_bleu(&hyps, &refs, mode);
        let scores = score_corpus(&hyps, &refs, mode);
        assert_bleu_in_range(&bleu, name);
        assert_eq!(scores.n, pairs.len());
        assert_eq!(scores.bleu4, bleu.score);
        for v in [scores.bleu4, scores.rouge1, scores.rouge2, scores.rouge_l] {
            assert!((0.0..=100.0).contains(&v), "{name}: {scores:?}");
        }
        corpus.insert(name.into(), json!({ "bleu": bleu, "scores": scores }));
    }
    // The corpus scores the identical pairs alone perfectly (each has ≥ 4 BLEU tokens).
    let same: Vec<&str> = hyps.iter().zip(&refs).filter(|(h, r)| h == r).map(|(h, _)| *h).collect();
    let long: Vec<&str> = same.iter().copied().filter(|h| tokenize(h, Lang::Auto).len() >= 4).collect();
    assert!(long.len() >= 2);
    let s = score_corpus(&long, &long, Lang::Auto);
    assert!((s.bleu4 - 100.0).abs() < 1e-9 && s.rouge1 == 100.0 && s.rouge_l == 100.0, "{s:?}");

    if let Some(path) = std::env::var_os("TUNEBENCH_METRICS_OUT") {
        let out: Value = json!({ "pairs": out_pairs, "corpus": corpus });
        std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    }
}
