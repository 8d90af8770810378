//! The default model loaded from its GGUF against an independent reference: PyTorch
//! transformers reading the same file (tests/fixtures/smollm2_reference_logits.json, made by
//! tests/reference/make_logits_fixture.py). Checks the tokenizer, the dequantized and
//! un-permuted weights, every position's top-5 logits and log-sum-exp, and greedy decoding
//! with the KV cache (which must also equal decoding without it).

mod common;

use candle_core::{Device, Tensor};
use tunebench::data::Message;
use tunebench::infer::{generate, sequence_logits, SampleOptions};
use tunebench::model::{self, ForwardCtx};

fn fixture() -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/smollm2_reference_logits.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn default_model_matches_pytorch_transformers() {
    let fx = fixture();
    let m = model::load(&common::default_model(), &Device::Cpu).unwrap();

    // Weights: dequantized and un-permuted exactly as transformers holds them.
    for probe in fx["weights_probe"].as_array().unwrap() {
        let name = probe["tensor"].as_str().unwrap();
        let row = probe["row"].as_u64().unwrap() as usize;
        let t: Tensor = if name == "model.embed_tokens.weight" {
            m.model.embed_tokens().dense().unwrap()
        } else {
            let module = name.trim_end_matches(".weight");
            m.model.linears().iter().find(|l| l.name() == module).unwrap().weight().dense().unwrap()
        };
        let got: Vec<f32> = t.get(row).unwrap().narrow(0, 0, 8).unwrap().to_vec1().unwrap();
        assert_eq!(got, f32s(&probe["first8"]), "{name} row {row}");
    }

    let template = tunebench::train::trainer::template_for(&m).unwrap();
    let mut worst = 0f32;
    for p in fx["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let want_ids = u32s(&p["token_ids"]);
        // Tokenizer: the same ids as the HF tokenizer (chat prompt rendered by our template).
        let text = match p.get("messages") {
            Some(msgs) => {
                let msgs: Vec<Message> = msgs
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| Message { role: x["role"].as_str().unwrap().into(), content: x["content"].as_str().unwrap().into() })
                    .collect();
                let rendered = template.render(&msgs, true).unwrap();
                assert_eq!(rendered, p["text"].as_str().unwrap(), "{name}: chat template rendering");
                rendered
            }
            None => p["text"].as_str().unwrap().to_string(),
        };
        let ids = m.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids, want_ids, "{name}: token ids differ from the HF tokenizer");

        let logits = sequence_logits(&m.model, &ids).unwrap();
        let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        for (i, row) in rows.iter().enumerate() {
            let top_ids = u32s(&p["top5_ids"][i]);
            let top_vals = f32s(&p["top5_logits"][i]);
            for (id, want) in top_ids.iter().zip(&top_vals) {
                let d = (row[*id as usize] - want).abs();
                worst = worst.max(d);
                assert!(d < 2e-2, "{name} position {i} token {id}: {} vs reference {want}", row[*id as usize]);
            }
            // Our best token is the reference's best (or within rounding of it).
            let best = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert!(best - top_vals[0] < 2e-2, "{name} position {i}: our max logit {best} vs reference {}", top_vals[0]);
            let max = best;
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            let want_lse = p["logsumexp"][i].as_f64().unwrap() as f32;
            assert!((lse - want_lse).abs() < 2e-2, "{name} position {i}: logsumexp {lse} vs {want_lse}");
        }

        if let Some(cont) = p.get("greedy_continuation_ids") {
            let want = u32s(cont);
            // The reference used min_new_tokens = 20, which masks the eos token (<|im_end|>).
            let eos = m.spec.eos_id;
            let opts = SampleOptions { max_new_tokens: want.len(), min_new_tokens: want.len(), stop_ids: vec![eos], ..Default::default() };
            let got = generate(&m.model, &ids, &opts, |_| {}).unwrap();
            assert_eq!(got, want, "{name}: greedy continuation (KV cache)");
            // Without the cache: recompute the whole sequence for every new token.
            let mut seq = ids.clone();
            for _ in 0..want.len() {
                let t = Tensor::from_slice(&seq, (1, seq.len()), &Device::Cpu).unwrap();
                let l = m.model.logits(&t, &ForwardCtx::default()).unwrap();
                let last = l.get(0).unwrap().get(seq.len() - 1).unwrap();
                let mask: Vec<f32> = (0..last.dim(0).unwrap()).map(|i| if i as u32 == eos { f32::NEG_INFINITY } else { 0.0 }).collect();
                let last = (last + Tensor::new(mask, &Device::Cpu).unwrap()).unwrap();
                seq.push(tunebench::infer::argmax(&last).unwrap());
            }
            assert_eq!(&seq[ids.len()..], &want[..], "{name}: greedy continuation (no cache)");
            let answer = m.tokenizer.decode(&got, true).unwrap();
            assert!(answer.contains("Paris"), "the default model should know the capital of France: {answer}");
        }
    }
    eprintln!("largest logit difference from the reference: {worst}");
}

/// Mixed-precision training loads the base in bf16 tensor by tensor (`model::load_in`, so the
/// f32 model never exists all at once): the same weights as loading in f32 and casting, bit for
/// bit, and the same logits.
#[test]
fn loading_in_bf16_equals_loading_in_f32_and_casting() {
    use candle_core::DType;
    let path = common::default_model();
    let mut cast = model::load(&path, &Device::Cpu).unwrap().model;
    cast.cast(DType::BF16).unwrap();
    let direct = model::load_in(&path, &Device::Cpu, DType::BF16).unwrap().model;
    let bits = |t: Tensor| -> Vec<u16> { t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap().iter().map(|x| (x.to_bits() >> 16) as u16).collect() };
    assert_eq!(direct.embed_tokens().dense().unwrap().dtype(), DType::BF16);
    assert_eq!(bits(direct.embed_tokens().dense().unwrap()), bits(cast.embed_tokens().dense().unwrap()), "embedding");
    let (a, b) = (direct.linears(), cast.linears());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.name(), y.name());
        assert_eq!(x.weight().dense().unwrap().dtype(), DType::BF16, "{}", x.name());
        assert_eq!(bits(x.weight().dense().unwrap()), bits(y.weight().dense().unwrap()), "{}", x.name());
    }
    // The norms (and everything else) through the logits.
    let ids = Tensor::new(&[[1u32, 9690, 314, 253, 1345, 282, 2724, 30, 216, 4237, 28, 11, 7, 42, 0, 5]], &Device::Cpu).unwrap();
    let ctx = ForwardCtx::default();
    let (l1, l2) = (direct.logits(&ids, &ctx).unwrap(), cast.logits(&ids, &ctx).unwrap());
    let diff = (l1.to_dtype(DType::F32).unwrap() - l2.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0, "logits of the two bf16 models");
}
