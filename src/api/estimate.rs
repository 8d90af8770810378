//! Estimates before a run: parameters (total, trainable, share), predicted peak memory by part
//! and predicted time per step — from the model's architecture alone (no weights are read).
//!
//! Memory model (CPU, f32, as this engine trains; with `train.dtype = "bf16"` or `"f16"` the
//! base and its activations, the adapters' included, take 2 bytes, each weight converted as it
//! is read):
//! * weights: every base parameter in f32 (GGUF weights are dequantized on load); for qlora
//!   the projections at 5 bits a weight plus one dequantized at a time;
//! * adapter: trainable parameters × (value + gradient + accumulated gradient + AdamW m, v);
//! * activations kept for the backward pass, per token and decoder layer: the layer input,
//!   both norm outputs, q/k/v per head rotated (and as projected, where the projection's op
//!   does not make the heads itself), attention output, MLP gate/up, SwiGLU's product where
//!   down_proj's op does not make it itself, o_proj's and down_proj's outputs where their op
//!   does not add the residual itself ([`fused_epilogue_floats`]), the residual sums, plus each LoRA target's
//!   rank-r intermediate (LoRA trains through `ops::lora_linear`, which keeps no output of its
//!   own beside the projection's; DoRA composes and keeps more) — see
//!   [`activation_floats_per_token_layer`];
//! * attention: keeps no scores for the backward (`ops::causal_attention` recomputes them
//!   there); on the CPU (`model::attention_cpu`) two (64 × keys) buffers per thread and the
//!   backward's per-head gradients, on a GPU one query block of scores at a time, at most
//!   `ops::ATTENTION_BLOCK_BYTES`;
//! * the loss: `loss_chunk` rows of vocabulary logits at once (their softmax and gradient
//!   reuse memory the backward pass frees) — or, when the LM head is adapted (a LoRA target,
//!   full fine-tuning's trained embedding), every counted row's logits, kept for the backward;
//! * full fine-tuning: the trainable copies of every weight count as adapter parameters; its
//!   activations are the base's (within 13% of measured peak RSS at batch 2, 8 and 16).
//!
//! The process itself (binary, tokenizer, runtime) fits inside the calibration: on the
//! default model, weights + loss chunk + the calibrated parts match the measured peak RSS
//! within ~2% (bench/RESULTS.md).
//!
//! With gradient checkpointing (`train.gradient_checkpointing`) only each layer's input is
//! kept and one layer's activations exist at a time (the layer being recomputed in the
//! backward); the time adds a second forward of every decoder layer. The constants were calibrated against measured peak RSS
//! (bench/RESULTS.md); `tests/estimate.rs` checks the prediction on several configs.
//!
//! Time: matmul FLOPs of forward + backward (frozen weights get only the input gradient)
//! divided by this machine's measured f32 matmul rate, times an overhead factor for the
//! non-matmul ops, plus the optimizer's pass over the trainable parameters.
//!
//! All of it is calibrated on the CPU; a run on a GPU (`train.device` = `cuda…`, or `auto` in a
//! CUDA build) adds the CUDA runtime's share of device memory ([`CUDA_RUNTIME_BYTES`], measured
//! on an H200) and is told in the warnings that the time is the CPU's.

use std::sync::OnceLock;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::Workbench;
use crate::model::LlamaConfig;
use crate::peft::PeftConfig;
use crate::train::RunConfig;
use crate::{Error, Result};

/// Measured activation bytes ÷ the counted floats × 4 (temporaries alive at the peak,
/// allocator slack) for the methods whose adapters run on composed ops. Calibrated on 6 LoRA
/// configs of the default model when LoRA composed too (bench/RESULTS.md, 2026-11-23: 1.25);
/// refit on IA3, BitFit, both adapters, the four prompt-learning methods, DoRA with dropout
/// and full fine-tuning (2026-12-03: 0.95–1.03 of their counts in f32, so 1.0).
pub const ACTIVATION_FACTOR: f64 = 1.0;
/// The same for LoRA and QLoRA (DoRA without dropout too) and AdaLoRA, which train through `ops::lora_linear` (the
/// count covers what it keeps exactly). Refit on the same 6 configs and the 8×256 one
/// (bench/RESULTS.md, 2026-12-02, after `ops::split_heads` and reshape-free LoRA ops took the
/// zero-filled gradients of eleven graph nodes per layer out of the backward's peak).
pub const LORA_ACTIVATION_FACTOR: f64 = 1.0;
/// Copies of one query block's f32 attention scores alive at the peak (the backward's
/// probabilities, their gradient and its temporaries; nothing of the kind is kept between the
/// passes) on a GPU (tensor ops). Measured on the CPU with the same blocked attention
/// (bench/RESULTS.md, 2026-12-01), before the CPU took its own kernels.
pub const ATTENTION_COPIES: f64 = 3.5;
/// With gradient checkpointing: one decoder layer's activations alive at the peak, in units of
/// a layer's counted activation bytes (the recomputed layer and its gradients). Measured on
/// three configs of the default model (bench/RESULTS.md, 2026-12-01: 1.3 of the counted bytes
/// × 1.25), checked on two with LoRA as one op (2026-12-02).
pub const CHECKPOINT_LAYER_COPIES: f64 = 1.65;
/// With gradient checkpointing, f32 floats per token and unit of hidden size alive at the peak
/// beside the recomputed layer: fitted, not itemised (the CPU's attention kernels made the
/// attention term small, and the checkpointed runs measured the same 56 MiB above the rest at
/// 2048 tokens in f32 and in bf16, 55 MiB at 1920; bench/RESULTS.md, 2026-12-02).
pub const CHECKPOINT_TOKEN_FLOATS_PER_HIDDEN: f64 = 12.5;
/// Bytes per trainable parameter: value, gradient, accumulated gradient, AdamW m and v (f32),
/// less what is freed between micro-batches. Calibrated with [`ACTIVATION_FACTOR`].
pub const ADAPTER_BYTES_PER_PARAM: u64 = 17;
/// AdaLoRA's importance estimates beside [`ADAPTER_BYTES_PER_PARAM`]: the moving averages of
/// |w·g| and of its deviation (`peft::adalora`'s `update_ipt`), f32 each, kept between steps
/// until the final mask. (Uncounted, the sweep's AdaLoRA config drifted to −9.6% as the
/// activations shrank; bench/RESULTS.md 2026-12-04 12:32.)
pub const ADALORA_IMPORTANCE_BYTES_PER_PARAM: u64 = 8;
/// Bytes per parameter that full fine-tuning trains: the value (the model's weight itself,
/// which the trainer makes a view of it), gradient, AdamW m and v, all f32 (AdamW steps in
/// place). Fitted with [`EMBEDDING_GRAD_COPIES`] (and the logit copies of a composed head) on three
/// configs of the default model (bench/RESULTS.md, 2026-12-03).
pub const FULL_BYTES_PER_PARAM: u64 = 16;
/// Copies of one loss chunk's (rows, vocab) f32 logits alive at the peak when the LM head
/// is adapted by a method without its own loss op (DoRA, AdaLoRA, feed-forward IA3; `Llama`'s adapted-head
/// loss differentiates each chunk's own graph in the forward: its logits, the adapter's
/// output, `ops::cross_entropy_sum`'s gradient and the gradients back through the adapter).
/// Fitted on IA3 and DoRA with lm_head at 3×96, 4×256 and 8×256 (bench/RESULTS.md,
/// 2026-12-03 15:00). Before, when the head's loss was one graph over every row, 5.25 copies of
/// (tokens, vocab) stayed until the backward.
pub const ADAPTED_HEAD_CHUNK_COPIES: f64 = 7.0;
/// A trained embedding's dense f32 gradients alive beside it at the peak (the lookup's, the
/// LM head's dW from the chunked loss, and their sum), in units of the embedding's size.
/// Fitted with [`FULL_NORM_FLOATS_PER_HIDDEN`] on three configs (bench/RESULTS.md, 2026-12-03).
pub const EMBEDDING_GRAD_COPIES: f64 = 3.0;
/// Full fine-tuning's trained norms (the unit-weight norm's output, which the channel scale by
/// the trained weight keeps): f32 floats per token and layer kept beyond the frozen norms', in
/// units of the hidden size. Fitted on four configs (bench/RESULTS.md, 2026-12-03, after 11:18; 3 while
/// the norms composed).
pub const FULL_NORM_FLOATS_PER_HIDDEN: f64 = 1.0;
/// Step time ÷ pure matmul time (norms, softmax, RoPE, element-wise ops, optimizer) for the
/// methods on composed ops: 2.2 when fitted (2026-11-23); 1.8 since the CPU's attention
/// kernels, split_heads and the gemm loss (bench/RESULTS.md 2026-12-03: IA3, BitFit, both
/// adapters, the prompt-learning methods and DoRA with dropout measured 0.6–1.3 of the
/// prediction at 1.8 on 24 configs, once a prompt encoder counted once a step and DoRA's
/// dropped input its second frozen product).
pub const TIME_OVERHEAD: f64 = 1.8;
/// [`TIME_OVERHEAD`] for LoRA as one op (no scaling pass, no graph nodes of its own; measured
/// 0.71–0.83 of the composed figure on the six held-out configs of `tests/estimate.rs`,
/// 2026-12-02; then 0.78–0.89 of 1.75 in f32 after the CPU's attention kernels and vector
/// `exp`, the same day; then 0.84–0.96 of 1.5 after `ops::split_heads` and the CPU loss as
/// gemm into one buffer).
pub const LORA_TIME_OVERHEAD: f64 = 1.4;
/// [`TIME_OVERHEAD`] for full fine-tuning, whose products are all `ops::trained_linear` and
/// whose head is the gemm loss: 1.17 on four configs (2×128 to 8×256, bench/RESULTS.md
/// 2026-12-03 14:40), fitted with [`SECONDS_PER_TRAINABLE`].
pub const FULL_TIME_OVERHEAD: f64 = 1.17;
/// Seconds per trainable parameter and optimizer step beyond the products: the AdamW update
/// (value, gradient, m and v read, three written), the gradients' clipping norm and their
/// accumulation, on this machine's memory bandwidth (1.2 s a step for the default model's 135M
/// in full fine-tuning; negligible for the adapters). Fitted with [`FULL_TIME_OVERHEAD`].
pub const SECONDS_PER_TRAINABLE: f64 = 9e-9;

/// Mixed precision on the CPU runs unfused ops where the f32 kernels would run (SwiGLU, the
/// f32 casts around RMSNorm and the softmax), which keep more temporaries: activations × this
/// factor over their 16-bit size, attention blocks × [`HALF_ATTENTION_FACTOR`] over the f32
/// figure. Fitted on four configs of the default model (bench/RESULTS.md, 2026-12-01 20:40)
/// when LoRA still composed and the weights counted at f32 size (1.17); refit with
/// [`ACTIVATION_FACTOR`] on the methods it applies to (bench/RESULTS.md, 2026-12-03: IA3,
/// BitFit, both adapters, the four prompt-learning methods and DoRA with dropout in bf16
/// measure 1.07–1.22 of their counts at 16 bits, mean 1.15); 1.06 once the hooked RMSNorm and
/// RoPE stopped holding a second copy of their outputs (`ops::Handoff`; IA3, Houlsby and
/// P-tuning v2 in bf16 measured 0.90–0.95 of the 1.15 figure, bench/RESULTS.md 2026-12-04).
pub const HALF_ACTIVATION_FACTOR: f64 = 1.06;
/// [`HALF_ACTIVATION_FACTOR`] for LoRA as one op ([`LORA_ACTIVATION_FACTOR`]); refit on three
/// bf16 configs (bench/RESULTS.md, 2026-12-02, after the CPU's 16-bit LoRA products, SwiGLU
/// and loss took f32 kernels: 1.35 → 1.06; then 1.16, with [`HALF_FIXED_BYTES`], when the
/// base began to load in 16 bits and its weights to count at that size); 1.12 after
/// `ops::Handoff` (three LoRA configs and AdaLoRA measured 0.90–1.07 of the 1.16 figure,
/// bench/RESULTS.md 2026-12-04).
pub const LORA_HALF_ACTIVATION_FACTOR: f64 = 1.12;
/// What a 16-bit run holds in training beyond its counted parts, bytes: fitted with
/// [`LORA_HALF_ACTIVATION_FACTOR`] on four bf16 configs of the default model from 256 to
/// 2048 tokens (bench/RESULTS.md, 2026-12-02, once the weights counted at 16-bit size: 128 MiB;
/// 26 MiB since the CPU loss stopped holding an f32 copy of the LM head, which it had covered).
pub const HALF_FIXED_BYTES: u64 = 26 << 20;
/// [`HALF_FIXED_BYTES`] for a checkpointed run (fitted on three checkpointed bf16 configs:
/// 52 MiB, then 15 MiB with the f32 LM head gone and the loss chunk counted only where it
/// outlasts the backward's peak).
pub const HALF_FIXED_BYTES_CHECKPOINTED: u64 = 15 << 20;
/// See [`HALF_ACTIVATION_FACTOR`].
pub const HALF_ATTENTION_FACTOR: f64 = 1.0;
/// GPU memory a training process holds beyond its tensors: the CUDA context, cuBLAS's
/// workspace, the loaded kernels and the memory pool's slack. Measured on one H200
/// (bench/RESULTS.md, 2026-12-04) as the device memory in use above idle (NVML) less the pool's
/// high-water mark of bytes in tensors: 0.83–1.39 GiB over four bf16 LoRA shapes in three runs
/// (median 1.12). With it the estimate was within −1%..+9% of the measured GPU memory there.
pub const CUDA_RUNTIME_BYTES: u64 = 1 << 30;
/// Time per step of bf16 over f32 on the CPU (candle's bf16 matmul is slower than its f32
/// one; measured on the default model; 2.0 → 2.3 when the CPU's attention kernels and vector
/// `exp` sped up f32 more than bf16, from the held-out bf16 config of `tests/estimate.rs`,
/// bench/RESULTS.md 2026-12-02; 2.3 → 1.5 when the 16-bit LoRA products, SwiGLU and loss took
/// the f32 kernels: the held-out bf16 step took 0.62 of the old prediction).
pub const HALF_CPU_TIME_FACTOR: f64 = 1.5;
/// The same for f16 (`train.dtype = "f16"`): the CPU has no f16 arithmetic, so candle's f16
/// matmul converts as it goes (measured 4.5x f32's step time, bench/RESULTS.md 2026-12-01;
/// about 2.1x after the 16-bit LoRA products, SwiGLU and loss took the f32 kernels,
/// 2026-12-02).
pub const F16_CPU_TIME_FACTOR: f64 = 2.3;

/// Request: estimate a run.
#[derive(Clone, Debug, Serialize, Deserialize, ts_rs::TS)]
pub struct EstimateRequest {
    /// The run configuration.
    pub config: RunConfig,
}

/// Predicted peak memory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct MemoryEstimate {
    /// Predicted peak resident memory, bytes.
    pub total_bytes: u64,
    /// The parts: weights, adapter + optimizer, activations, attention, loss.
    pub parts: Vec<(String, u64)>,
    /// The peak with gradient checkpointing per decoder layer (`train.gradient_checkpointing`;
    /// equal to `total_bytes` when the config has it on).
    pub total_bytes_checkpointed: u64,
}

/// Response: the estimate.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct Estimate {
    /// All base parameters.
    pub total_params: u64,
    /// Trainable parameters.
    pub trainable_params: u64,
    /// Trainable share, %.
    pub trainable_pct: f64,
    /// Memory.
    pub memory: MemoryEstimate,
    /// Predicted seconds per optimizer step.
    pub step_s: f64,
    /// Optimizer steps (from max_steps, or epochs × the dataset's rows when it can be counted).
    pub total_steps: u64,
    /// Predicted seconds for the run.
    pub total_s: f64,
    /// Positions per row assumed: the longest example up to data.max_len, plus a prompt-learning method's virtual tokens.
    pub seq_len: usize,
    /// Training FLOPs per step.
    pub flops_per_step: f64,
    /// This machine's f32 matmul rate, GFLOP/s: the median of this process's probe and the
    /// recent ones recorded in the app data dir's machine-rate.txt.
    pub machine_gflops: f64,
    /// Things to look at (memory beyond the machine's RAM, ...).
    pub warnings: Vec<String>,
}

/// The linear layers of a Llama-family model: (full name, in features, out features).
pub fn linear_shapes(c: &LlamaConfig) -> Vec<(String, usize, usize)> {
    let (d, ff, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
    let (q, kv) = (c.num_attention_heads * hd, c.kv_heads() * hd);
    let mut v = Vec::new();
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        v.push((format!("{p}.self_attn.q_proj"), d, q));
        v.push((format!("{p}.self_attn.k_proj"), d, kv));
        v.push((format!("{p}.self_attn.v_proj"), d, kv));
        v.push((format!("{p}.self_attn.o_proj"), q, d));
        v.push((format!("{p}.mlp.gate_proj"), d, ff));
        v.push((format!("{p}.mlp.up_proj"), d, ff));
        v.push((format!("{p}.mlp.down_proj"), ff, d));
    }
    v.push(("lm_head".into(), d, c.vocab_size));
    v
}

/// All parameters of the base model (tied embeddings counted once).
pub fn total_params(c: &LlamaConfig) -> u64 {
    let d = c.hidden_size as u64;
    let lin = linear_shapes(c);
    let layers: u64 = lin.iter().filter(|(n, _, _)| n != "lm_head").map(|(_, i, o)| (*i * *o) as u64).sum();
    let bias: u64 = if c.attention_bias {
        let hd = c.head_dim() as u64;
        c.num_hidden_layers as u64 * (c.num_attention_heads as u64 * hd + 2 * c.kv_heads() as u64 * hd)
    } else {
        0
    };
    let norms = c.num_hidden_layers as u64 * 2 * d + d;
    let embed = c.vocab_size as u64 * d;
    let head = if c.tie_word_embeddings { 0 } else { embed };
    layers + bias + norms + embed + head
}

/// The adapted linears: (name, in, out, trainable parameters, extra activation floats per
/// token kept for the backward pass).
pub fn adapted(c: &LlamaConfig, peft: &PeftConfig) -> Result<Vec<(String, usize, usize, usize, usize)>> {
    if let Some(method) = peft.prompt_method() {
        // No linear is wrapped: one row for the prompt encoder (its activations are per
        // virtual token, not per real token).
        return Ok(vec![("prompt_encoder".into(), 0, 0, method.num_params(c), 0)]);
    }
    if let PeftConfig::Full(f) = peft {
        // Every weight: one row (no per-layer extra activations beyond the composed norms',
        // counted in `estimate`).
        return Ok(vec![("all weights".into(), 0, 0, f.num_params(c, total_params(c) as usize), 0)]);
    }
    let shapes = linear_shapes(c);
    let names: Vec<&str> = shapes.iter().map(|(n, _, _)| n.as_str()).collect();
    let adapter_targets;
    let targets = match peft {
        PeftConfig::Lora(l) | PeftConfig::Qlora(l) => &l.target_modules,
        PeftConfig::AdaLora(l) => &l.target_modules,
        PeftConfig::Ia3(l) => &l.target_modules,
        PeftConfig::Bitfit(l) => &l.target_modules,
        PeftConfig::Adapter(a) => {
            adapter_targets = crate::peft::TargetModules::Names(a.modules().iter().map(|m| m.to_string()).collect());
            &adapter_targets
        }
        PeftConfig::PromptTuning(_) | PeftConfig::PTuning(_) | PeftConfig::PrefixTuning(_) | PeftConfig::PTuningV2(_) | PeftConfig::Full(_) => {
            unreachable!("handled above")
        }
    };
    let chosen = targets.resolve_names(&names)?;
    for (n, i, o) in shapes.iter().filter(|(n, _, _)| chosen.contains(n)) {
        match peft {
            PeftConfig::Lora(l) | PeftConfig::Qlora(l) => l.check_rank(n, *i, *o)?,
            PeftConfig::AdaLora(a) => a.check_rank(n, *i, *o)?,
            _ => {}
        }
    }
    Ok(shapes
        .into_iter()
        .filter(|(n, _, _)| chosen.contains(n))
        .map(|(n, i, o)| {
            let (params, acts) = match peft {
                // LoRA in training is one op with the frozen product (`ops::lora_linear`): it
                // keeps only x̃·A (r) beside the output the frozen product would have anyway
                // (dropout's input is drawn again in the backward, not kept).
                PeftConfig::Lora(l) | PeftConfig::Qlora(l) if !l.use_dora => (l.rank_and_scale(&n).0 * (i + o), l.rank_and_scale(&n).0),
                // DoRA is one node too (`ops::lora_linear_scaled`): x̃·A (r) and the unscaled
                // sum (out) its magnitude's gradient reads (with dropout z = x̃·Wᵀ + s·x̃·Aᵀ·Bᵀ;
                // without, none: see `dora_unscaled_from_output`). The 0.3·out of
                // gradient temporaries fitted when DoRA composed (bench/RESULTS.md,
                // 2026-12-02) went with the one-node forms (2026-12-04).
                PeftConfig::Lora(l) | PeftConfig::Qlora(l) => (l.rank_and_scale(&n).0 * (i + o) + o, l.rank_and_scale(&n).0 + o),
                // P, Λ, Q at init_r (masked triplets stay trainable); activations as LoRA's
                // (the same op, with Q ⊙ Λ as its A).
                PeftConfig::AdaLora(a) => (a.init_r * (i + o + 1), a.init_r),
                PeftConfig::Ia3(l) if l.feedforward_modules.iter().any(|f| n == *f || n.ends_with(&format!(".{f}"))) => (i, i),
                PeftConfig::Ia3(_) => (o, o),
                PeftConfig::Bitfit(_) => (o, o),
                // Every node the composed adapter makes stays in the graph: the down-projection,
                // its bias sum and the activation (b each), the up-projection, its bias sum and
                // the residual sum (d each).
                PeftConfig::Adapter(a) => (a.params_per_adapter(o), 3 * a.bottleneck_size + 3 * o),
                PeftConfig::PromptTuning(_) | PeftConfig::PTuning(_) | PeftConfig::PrefixTuning(_) | PeftConfig::PTuningV2(_) | PeftConfig::Full(_) => (0, 0),
            };
            (n, i, o, params, acts)
        })
        .collect())
}

/// Floats kept for the backward pass per token and decoder layer (without attention scores).
pub fn activation_floats_per_token_layer(c: &LlamaConfig, adapter_floats: f64) -> f64 {
    let (d, ff) = (c.hidden_size as f64, c.intermediate_size as f64);
    let q = (c.num_attention_heads * c.head_dim()) as f64;
    let kv = (c.kv_heads() * c.head_dim()) as f64;
    // input, norm1, q (proj, per head rotated: `ops::split_heads`), k (×2), v (×2), attention
    // out (heads merged; the backward reads the op's result), o_proj out, residual, norm2,
    // gate, up, activation, down out, residual. (A projection whose op takes the split or the
    // residual add as its last step keeps no output of its own, and down_proj's op that makes
    // SwiGLU's product keeps no activation: [`fused_epilogue_floats`], counted with the
    // adapter's.)
    let base = d + d + 2.0 * q + 2.0 * kv + 2.0 * kv + q + d + d + d + ff + ff + ff + d + d;
    base + adapter_floats
}

/// Floats per token and layer that projections' inputs and outputs do not take, because the
/// projection's own op takes the step before or after it ([`crate::model::ops::Epilogue`],
/// `Linear::forward_swiglu_then`): q, k and v's move into heads, o_proj's and down_proj's add
/// to the residual stream, and down_proj's input, SwiGLU's product, made inside its op. The
/// frozen product's ops take every step (`ops::frozen_linear_heads`,
/// `ops::frozen_linear_residual`, `ops::frozen_linear_swiglu_residual`); LoRA's and AdaLoRA's
/// too (`ops::lora_linear_then`, `ops::lora_linear_swiglu_residual`); DoRA's only the move
/// into heads without a bias (`ops::lora_linear_scaled_heads`). IA3's, BitFit's, the
/// bottleneck adapters' and full fine-tuning's projections keep their input and output, then
/// take the step. `adapted`: the names [`adapted`] lists.
pub fn fused_epilogue_floats(c: &LlamaConfig, peft: &PeftConfig, adapted: &[&str]) -> f64 {
    let hd = c.head_dim();
    let (q, kv, d, ff) = (c.num_attention_heads * hd, c.kv_heads() * hd, c.hidden_size, c.intermediate_size);
    /// The op a projection trains through.
    enum Via {
        Frozen,
        Lora,
        Dora,
        Own,
    }
    let via = |p: &str| {
        let targeted = adapted.iter().any(|n| *n == format!("model.layers.0.{p}"));
        match peft {
            PeftConfig::Full(_) => Via::Own,
            _ if !targeted => Via::Frozen,
            PeftConfig::Lora(l) | PeftConfig::Qlora(l) if l.use_dora => Via::Dora,
            PeftConfig::Lora(_) | PeftConfig::Qlora(_) | PeftConfig::AdaLora(_) => Via::Lora,
            _ => Via::Own,
        }
    };
    let heads = |p: &str, w: usize| match via(p) {
        Via::Frozen | Via::Lora => w,
        Via::Dora if !c.attention_bias => w,
        _ => 0,
    };
    let o = match via("self_attn.o_proj") {
        Via::Frozen | Via::Lora => d,
        _ => 0,
    };
    let down = match via("mlp.down_proj") {
        Via::Frozen | Via::Lora => ff + d,
        _ => 0,
    };
    (heads("self_attn.q_proj", q) + heads("self_attn.k_proj", kv) + heads("self_attn.v_proj", kv) + o + down) as f64
}

/// Readings of the matmul rate kept (`machine-rate.txt` in the app data dir) for
/// [`machine_gflops`]'s median.
pub const RATE_HISTORY: usize = 9;

/// This machine's f32 matmul rate in GFLOP/s: a probe (once per process, ~0.2 s), settled
/// against the last [`RATE_HISTORY`] − 1 probes recorded with the same thread count by
/// [`settled_rate`]. One probe taken while the machine is busy for a moment (right after a
/// large write — a build's link, a full fine-tuning checkpoint — it read 96–135 GFLOP/s here
/// against 165–200 quiet) would move a run's predicted time by as much, though the run itself
/// lasts minutes.
pub fn machine_gflops() -> f64 {
    static RATE: OnceLock<f64> = OnceLock::new();
    *RATE.get_or_init(|| {
        match probe_gflops() {
            Some(now) => settled_rate(&crate::paths::home().join("machine-rate.txt"), candle_core::utils::get_num_threads(), now),
            None => 20.0,
        }
    })
}

/// The median of `now` and the readings recorded in `history` (lines `threads rate`) with
/// `threads` threads, the newest [`RATE_HISTORY`] − 1 of them; `now` is appended to the file
/// (which keeps its newest [`RATE_HISTORY`] lines per thread count). A missing or unwritable
/// file, or a line that does not parse, only leaves fewer readings.
pub fn settled_rate(history: &std::path::Path, threads: usize, now: f64) -> f64 {
    let lines: Vec<(usize, f64)> = std::fs::read_to_string(history)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (t, r) = l.split_once(' ')?;
            Some((t.trim().parse().ok()?, r.trim().parse::<f64>().ok().filter(|r| r.is_finite() && *r > 0.0)?))
        })
        .collect();
    let mut kept: Vec<(usize, f64)> = Vec::new();
    // Newest last: keep the newest RATE_HISTORY − 1 of each thread count, then this one.
    for (i, &(t, r)) in lines.iter().enumerate() {
        if lines[i + 1..].iter().filter(|(u, _)| *u == t).count() < RATE_HISTORY - 1 {
            kept.push((t, r));
        }
    }
    kept.push((threads, now));
    let mut rates: Vec<f64> = kept.iter().filter(|(t, _)| *t == threads).map(|(_, r)| *r).collect();
    rates.sort_by(f64::total_cmp);
    if let Some(dir) = history.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let text: String = kept.iter().map(|(t, r)| format!("{t} {r:.1}\n")).collect();
    let _ = std::fs::write(history, text);
    rates[rates.len() / 2]
}

/// One probe of the f32 matmul rate in GFLOP/s: a 512×576·576×1536 product repeated for
/// 0.2 s (`None` if the product fails).
fn probe_gflops() -> Option<f64> {
    let dev = candle_core::Device::Cpu;
    let (m, k, n) = (512usize, 576usize, 1536usize);
    let a = candle_core::Tensor::ones((m, k), candle_core::DType::F32, &dev).and_then(|t| t.affine(0.5, 0.1)).ok()?;
    let b = candle_core::Tensor::ones((k, n), candle_core::DType::F32, &dev).and_then(|t| t.affine(0.25, 0.2)).ok()?;
    a.matmul(&b).ok()?;
    let start = Instant::now();
    let mut reps = 0u32;
    while start.elapsed().as_secs_f64() < 0.2 || reps < 3 {
        a.matmul(&b).ok()?;
        reps += 1;
    }
    Some(2.0 * (m * k * n) as f64 * reps as f64 / start.elapsed().as_secs_f64() / 1e9)
}

/// Total RAM of this machine, bytes.
pub fn machine_ram_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Estimates a run from its config and the model's architecture. `rows`: the dataset's
/// example count when known (for the number of steps); `longest`: its longest example in
/// tokens when known (batches are padded to their longest example, so a dataset of short
/// examples never reaches `data.max_len`).
pub fn estimate(cfg: &RunConfig, model: &LlamaConfig, rows: Option<u64>, longest: Option<usize>) -> Result<Estimate> {
    cfg.peft.validate()?;
    let t = &cfg.train;
    // Virtual tokens of prompt tuning and P-tuning run through the model like real ones;
    // prefix tuning's (and P-tuning v2's) only as keys and values in every attention layer.
    let virt = cfg.peft.num_virtual_tokens();
    let prompt_learning = cfg.peft.prompt_method().is_some();
    let prefix = cfg.peft.prompt_method().is_some_and(|m| m.is_prefix());
    let seq = longest.map_or(cfg.data.max_len, |l| l.min(cfg.data.max_len)).max(1) + virt;
    // Positions through the layers (`s`), and the keys each attends over.
    let (b, s) = (t.batch_size as u64, if prefix { seq - virt } else { seq } as u64);
    let keys = seq as u64;
    let layers = model.num_hidden_layers as u64;
    let total = total_params(model);
    let ad = adapted(model, &cfg.peft)?;
    let trainable: u64 = ad.iter().map(|a| a.3 as u64).sum();
    let mut adapter_floats: f64 = ad.iter().filter(|a| a.0.starts_with("model.layers.0.")).map(|a| a.4 as f64).sum();
    // A GPU run: `cuda`/`cuda:N`, or `auto` in a CUDA build (without opening the device).
    let on_gpu = match crate::device::DeviceChoice::parse(&cfg.train.device, "train.device")? {
        crate::device::DeviceChoice::Cuda(_) => true,
        crate::device::DeviceChoice::Auto => crate::device::CUDA_BUILD,
        crate::device::DeviceChoice::Cpu => false,
    };
    // DoRA without dropout (`ops::lora_linear_scaled`) reads the unscaled product that
    // `adapted` counts back from its output (y / g) instead of keeping it.
    let dora_unscaled_from_output = matches!(&cfg.peft, PeftConfig::Lora(l) | PeftConfig::Qlora(l) if l.use_dora && l.lora_dropout == 0.0);
    if dora_unscaled_from_output {
        adapter_floats -= ad.iter().filter(|a| a.0.starts_with("model.layers.0.")).map(|a| a.2 as f64).sum::<f64>();
    }
    adapter_floats -= fused_epilogue_floats(model, &cfg.peft, &ad.iter().map(|a| a.0.as_str()).collect::<Vec<_>>());
    if prefix {
        // Each layer's keys and values with the prefix in front (b, kv heads, keys, head_dim).
        adapter_floats += 2.0 * (model.kv_heads() * model.head_dim()) as f64 * keys as f64 / s as f64;
    }
    // Full fine-tuning keeps the base's activations, and its trained norms
    // [`FULL_NORM_FLOATS_PER_HIDDEN`] more per token and layer.
    let full = match &cfg.peft {
        PeftConfig::Full(f) => Some(f),
        _ => None,
    };
    if full.is_some_and(|f| f.train_norms) {
        adapter_floats += FULL_NORM_FLOATS_PER_HIDDEN * model.hidden_size as f64;
    }
    // An LM head adapted by DoRA, AdaLoRA or a feed-forward IA3 differentiates each loss
    // chunk's own graph in the forward ([`ADAPTED_HEAD_CHUNK_COPIES`]). (LoRA's head takes
    // `ops::linear_cross_entropy_lora_sum`, full fine-tuning's
    // `ops::linear_cross_entropy_trained_sum`, IA3's output scaling and BitFit's
    // `ops::linear_cross_entropy_affine_sum`: one chunk of logits, like a frozen head; IA3's
    // keeps a second, the shifted logits its scale's gradient reads.)
    let scaled_head = matches!(&cfg.peft, PeftConfig::Ia3(c) if !c.is_feedforward("lm_head"));
    let chunked_head = match &cfg.peft {
        PeftConfig::Lora(l) | PeftConfig::Qlora(l) => !l.use_dora,
        PeftConfig::Bitfit(_) => true,
        _ => scaled_head,
    };
    let head_targeted = ad.iter().any(|a| a.0 == "lm_head");
    let head_adapted = !chunked_head && head_targeted;
    let head_chunks = if scaled_head && head_targeted { 2 } else { 1 };

    // QLoRA holds the projections in 4-bit blocks (≤ 5 bits a weight: Q4_1; Q4_K is 4.5) and
    // dequantizes one at a time; everything else stays f32.
    let qlora = matches!(cfg.peft, PeftConfig::Qlora(_));
    // Mixed precision (train.dtype = "bf16"/"f16"): the base and its activations, the adapters'
    // included, at 2 bytes.
    let half = cfg.train.dtype != crate::train::config::Precision::F32;
    let wbytes: u64 = if half { 2 } else { 4 };
    // DoRA's down_proj without dropout, f32 on the CPU, makes SwiGLU's product inside its op
    // (`ops::lora_linear_scaled_swiglu`, the scale as the op's column scale): none kept for it.
    if dora_unscaled_from_output && !half && !on_gpu && ad.iter().any(|a| a.0 == "model.layers.0.mlp.down_proj") {
        adapter_floats -= model.intermediate_size as f64;
    }
    let shapes = linear_shapes(model);
    // The largest projection's weight count.
    let largest_linear: u64 = shapes.iter().map(|(_, i, o)| (*i * *o) as u64).max().unwrap_or(0);
    let weights = if qlora {
        let lin: u64 = shapes.iter().map(|(_, i, o)| (*i * *o) as u64).sum();
        wbytes * (total - lin.min(total)) + lin * 5 / 8 + wbytes * largest_linear
    } else {
        // Held in the activations' dtype (`model::load_in` converts each tensor as it reads it,
        // so a 16-bit base never exists in f32 all at once).
        // Full fine-tuning's trained weights are counted with the adapter: the trainer makes the
        // model's frozen weights views of them (`peft::full::share_frozen_with_trained`).
        wbytes * (total - full.map_or(0, |_| trainable).min(total))
    };
    let adapter = match full {
        Some(f) => {
            let embedding = if f.train_embeddings { EMBEDDING_GRAD_COPIES * 4.0 * (model.vocab_size * model.hidden_size) as f64 } else { 0.0 };
            trainable * FULL_BYTES_PER_PARAM + embedding as u64
        }
        None if matches!(cfg.peft, PeftConfig::AdaLora(_)) => trainable * (ADAPTER_BYTES_PER_PARAM + ADALORA_IMPORTANCE_BYTES_PER_PARAM),
        None => trainable * ADAPTER_BYTES_PER_PARAM,
    };
    let tokens = b * s;
    let act_bytes_per_tok_layer = wbytes as f64 * activation_floats_per_token_layer(model, adapter_floats);
    // LoRA, QLoRA (DoRA too) and AdaLoRA train through one op per projection
    // (`ops::lora_linear`, `ops::lora_linear_scaled`).
    let lora_op = matches!(cfg.peft, PeftConfig::Lora(_) | PeftConfig::Qlora(_) | PeftConfig::AdaLora(_));
    let half_factor = match (half, lora_op) {
        (false, _) => 1.0,
        (true, true) => LORA_HALF_ACTIVATION_FACTOR,
        (true, false) => HALF_ACTIVATION_FACTOR,
    };
    let factor = half_factor * if lora_op { LORA_ACTIVATION_FACTOR } else { ACTIVATION_FACTOR };
    let counted = act_bytes_per_tok_layer * (tokens * layers) as f64;
    // DoRA's norms keep (A·Wᵀ)ᵀ + s·B·(A·Aᵀ), (out, r) in f32, for their backward
    // (`ops::dora_row_norm`), every adapted projection's until the backward (a checkpointed
    // run: one layer's, in the noise).
    let dora_norms: u64 = match &cfg.peft {
        PeftConfig::Lora(l) | PeftConfig::Qlora(l) if l.use_dora => ad.iter().map(|a| 4 * (l.rank_and_scale(&a.0).0 * a.2) as u64).sum(),
        _ => 0,
    };
    let acts = (factor * counted) as u64 + wbytes * tokens * model.hidden_size as u64 * 2 + dora_norms;
    let heads = model.num_attention_heads as u64;
    let attn = if on_gpu {
        // One query block of scores at a time (`ops::causal_attention` on tensor ops), in every
        // layer alike.
        let attn_factor = if half { HALF_ATTENTION_FACTOR } else { 1.0 };
        let block = crate::model::ops::attention_block_len(b as usize, model.num_attention_heads, s as usize, keys as usize) as u64;
        (attn_factor * ATTENTION_COPIES * 4.0 * (b * heads * block * keys) as f64) as u64
    } else {
        // `model::attention_cpu`: two (tile × keys) f32 buffers per thread; the backward's dQ
        // and per-query-head dK, dV (f32), and with 16-bit activations f32 copies of q, k, v,
        // the output and its gradient.
        let threads = rayon::current_num_threads() as u64;
        let tile = (crate::model::attention_cpu::TILE as u64).min(s);
        let per_head = b * heads * s * model.head_dim() as u64;
        4 * (2 * threads * tile * keys + if half { 8 } else { 3 } * per_head)
    };
    let chunk = (t.loss_chunk as u64).min(tokens).max(1);
    let loss = if head_adapted {
        (ADAPTED_HEAD_CHUNK_COPIES * 4.0 * (chunk * model.vocab_size as u64) as f64) as u64
    } else {
        head_chunks * 4 * chunk * model.vocab_size as u64
    };
    // A 16-bit run holds a fixed amount beyond its counted parts (an f32 run's factors absorb
    // the same).
    let fixed = |checkpointed: bool| match (half && !qlora, checkpointed) {
        (false, _) => 0,
        (true, false) => HALF_FIXED_BYTES,
        (true, true) => HALF_FIXED_BYTES_CHECKPOINTED,
    };
    // Loading a 16-bit base holds at most one tensor in f32 beside the converted ones (the
    // largest: the embedding or a projection), before any adapter exists: a bound, since the
    // largest is often read first.
    let largest = largest_linear.max((model.vocab_size * model.hidden_size) as u64);
    // On a GPU the device holds the CUDA runtime's share beside the tensors.
    let runtime = if on_gpu { CUDA_RUNTIME_BYTES } else { 0 };
    let load = if half && !qlora { weights + 4 * largest + fixed(false) + runtime } else { 0 };
    // Gradient checkpointing keeps each layer's input; at the peak, the layer being
    // recomputed in the backward holds its activations and part of their gradients
    // ([`CHECKPOINT_LAYER_COPIES`]), beside [`CHECKPOINT_TOKEN_FLOATS_PER_HIDDEN`]; attention
    // is the same either way.
    let layer_inputs = wbytes * tokens * model.hidden_size as u64 * layers;
    let ckpt_extra = (4.0 * CHECKPOINT_TOKEN_FLOATS_PER_HIDDEN * (tokens * model.hidden_size as u64) as f64) as u64;
    let acts_ckpt = (CHECKPOINT_LAYER_COPIES * half_factor * counted / layers.max(1) as f64) as u64 + layer_inputs + ckpt_extra;
    let attn_ckpt = attn;
    // It keeps a part of what a plain run keeps, never more (a model of one or two layers
    // gains next to nothing).
    let acts_ckpt = acts_ckpt.min(acts);
    // The loss's logits chunk (an adapted head's chunk graph too) lives in the forward only: a
    // checkpointed run peaks later, recomputing a layer in the backward, so the chunk counts
    // only where the layer inputs and it come to more than that.
    let loss_ckpt = (layer_inputs + loss).saturating_sub(acts_ckpt);
    let ckpt = (weights + adapter + acts_ckpt + attn_ckpt + loss_ckpt + fixed(true) + runtime).max(load);
    let checkpointing = t.gradient_checkpointing;
    let (acts, attn, loss) = if checkpointing { (acts_ckpt, attn_ckpt, loss_ckpt) } else { (acts, attn, loss) };
    let training = weights + adapter + acts + attn + loss + fixed(checkpointing) + runtime;
    let total_bytes = training.max(load);

    // FLOPs: forward 2·tokens·(linear params) + attention 4·b·s²·(heads·head_dim) per layer;
    // backward: input gradients of every linear (2·tokens·params again), attention ×2.5 (the
    // scores recomputed, then dP, dV, dQ, dK), LoRA weight gradients.
    let lin_params: f64 = shapes.iter().map(|(_, i, o)| (*i * *o) as f64).sum();
    let attn_fwd = 4.0 * (b * s * keys) as f64 * (model.num_attention_heads * model.head_dim()) as f64 * layers as f64 / 2.0;
    let lora_flops: f64 = if full.is_some() {
        // Weight gradients of every trained matrix (its forward is already counted).
        2.0 * trainable as f64 * tokens as f64
    } else if prompt_learning {
        // A prompt encoder runs once a step, over the virtual tokens (not once a token).
        ad.iter().map(|a| 2.0 * a.3 as f64).sum::<f64>() * virt as f64 * 3.0
    } else {
        // DoRA with dropout multiplies the dropped input by the frozen weight too (forward and
        // input gradient: 4·tokens·in·out a target).
        let dora_dropout = matches!(&cfg.peft, PeftConfig::Lora(l) | PeftConfig::Qlora(l) if l.use_dora && l.lora_dropout > 0.0);
        let second_product: f64 = if dora_dropout { ad.iter().map(|a| 4.0 * (a.1 * a.2) as f64).sum() } else { 0.0 };
        (ad.iter().map(|a| 2.0 * a.3 as f64).sum::<f64>() * 3.0 + second_product) * tokens as f64
    };
    let mut flops_micro = 2.0 * tokens as f64 * lin_params * 2.0 + 3.5 * attn_fwd + lora_flops;
    if checkpointing {
        // Every decoder layer runs forward twice (the LM head once).
        let head = (model.hidden_size * model.vocab_size) as f64;
        flops_micro += 2.0 * tokens as f64 * (lin_params - head) + attn_fwd;
    }
    let flops = flops_micro * t.grad_accum as f64;
    let gflops = machine_gflops();
    let precision_factor = match cfg.train.dtype {
        crate::train::config::Precision::F32 => 1.0,
        crate::train::config::Precision::Bf16 => HALF_CPU_TIME_FACTOR,
        crate::train::config::Precision::F16 => F16_CPU_TIME_FACTOR,
    };
    let overhead = if full.is_some() {
        FULL_TIME_OVERHEAD
    } else if lora_op {
        LORA_TIME_OVERHEAD
    } else {
        TIME_OVERHEAD
    };
    let step_s = flops / (gflops * 1e9) * overhead * precision_factor + trainable as f64 * SECONDS_PER_TRAINABLE;

    let total_steps = if t.max_steps > 0 {
        t.max_steps as u64
    } else {
        let rows = rows.unwrap_or(0);
        let train_rows = rows.saturating_sub(((cfg.data.val_fraction * rows as f64).round() as u64).min(cfg.data.val_max as u64));
        let micro = train_rows.div_ceil(b.max(1));
        ((t.epochs * micro as f64) / t.grad_accum as f64).ceil() as u64
    };
    let mut warnings = Vec::new();
    if on_gpu {
        warnings.push(format!(
            "train.device = \"{}\": this estimate is calibrated on the CPU (peak RSS, this machine's f32 matmul rate) plus the CUDA runtime's share measured on one H200 (within -1% to +9% of its GPU memory on four LoRA shapes); its time does not apply on a GPU",
            cfg.train.device
        ));
    }
    if let Some(ram) = machine_ram_bytes().filter(|_| !on_gpu) {
        if total_bytes > ram * 9 / 10 {
            warnings.push(format!(
                "predicted peak memory {:.1} GiB is close to or above this machine's {:.1} GiB: lower train.batch_size or data.max_len",
                total_bytes as f64 / (1u64 << 30) as f64,
                ram as f64 / (1u64 << 30) as f64
            ));
        }
    }
    if half && !on_gpu {
        warnings.push(format!(
            "train.dtype = \"{}\" is meant for GPUs: on the CPU it takes {} the time of f32 (the CPU's fast kernels are f32, so 16-bit operands are widened for them), for about two thirds of the memory",
            cfg.train.dtype.name(),
            if cfg.train.dtype == crate::train::config::Precision::F16 { "about twice" } else { "about one and a half times" }
        ));
    }
    if full.is_some() {
        warnings.push(format!(
            "full fine-tuning trains all {:.0}M of these parameters: their copies, gradients and AdamW state alone take {:.1} GiB (about {FULL_BYTES_PER_PARAM} bytes a parameter, the weight's own value included), and the tuned model is saved whole; LoRA on all-linear reaches similar quality on small tasks at a fraction of that",
            trainable as f64 / 1e6,
            adapter as f64 / (1u64 << 30) as f64
        ));
    }
    if cfg.data.max_len + virt > model.max_position_embeddings {
        let with = if virt > 0 { format!(" plus {virt} virtual tokens") } else { String::new() };
        warnings.push(format!("data.max_len {}{with} is longer than the model's context ({})", cfg.data.max_len, model.max_position_embeddings));
    }
    let mut parts: Vec<(String, u64)> = vec![
        (
            match (qlora, half) {
                (true, _) => "weights (4-bit projections)",
                (false, true) => "weights (16-bit)",
                (false, false) if full.is_some() => "frozen weights (f32)",
                (false, false) => "weights (f32)",
            }
            .into(),
            weights,
        ),
        (if full.is_some() { "trained weights, gradients + optimizer" } else { "adapter + optimizer" }.into(), adapter),
        (if checkpointing { "activations (layer inputs + one layer)" } else { "activations" }.into(), acts),
        (if on_gpu { "attention (one query block)" } else { "attention (tiles, gradients)" }.into(), attn),
        ("loss (logits chunk)".into(), loss),
    ];
    // The parts only some runs have: 16-bit runs' fixed term, and the load where it peaks
    // above training (small 16-bit runs).
    parts.extend(
        [
            ("fixed (16-bit runs)".to_string(), fixed(checkpointing)),
            ("CUDA runtime (context, cuBLAS workspace, kernels, pool slack)".to_string(), runtime),
            ("loading (one tensor in f32), above training".to_string(), load.saturating_sub(training)),
        ]
            .into_iter()
            .filter(|(_, b)| *b > 0),
    );
    Ok(Estimate {
        total_params: total,
        trainable_params: trainable,
        trainable_pct: 100.0 * trainable as f64 / total.max(1) as f64,
        memory: MemoryEstimate {
            total_bytes,
            parts,
            total_bytes_checkpointed: ckpt,
        },
        step_s,
        total_steps,
        total_s: step_s * total_steps as f64,
        seq_len: seq,
        flops_per_step: flops,
        machine_gflops: gflops,
        warnings,
    })
}

/// Counts the records of a dataset file cheaply (for the number of steps): an imported
/// record's rows when the path matches, else a streaming count.
fn count_rows(path: &std::path::Path, format: crate::data::Format) -> Option<u64> {
    let it = crate::data::read_records(path, format).ok()?;
    Some(it.filter(|r| r.is_ok()).count() as u64)
}

/// Data files up to this size that are not imported are scanned (tokenized) by an estimate.
const SCAN_LIMIT_BYTES: u64 = 32 << 20;

/// (examples, longest example in tokens) of a data file, as `import_dataset` measures them;
/// None when it cannot be read (the run itself will report why).
fn scan_file(path: &std::path::Path, cfg: &RunConfig) -> Option<(u64, usize)> {
    let (tokenizer, spec) = crate::model::load_tokenizer(&cfg.model_path()).ok()?;
    let template = crate::train::trainer::template_for_spec(&spec).ok()?;
    let (_, st, _) = super::datasets::scan(path, cfg.data.format, cfg.data.max_len, &template, &tokenizer, |_| {}).ok()?;
    (st.examples > 0).then_some((st.examples as u64, st.longest))
}

impl Workbench {
    /// Estimates a run before it starts.
    pub async fn estimate(&self, req: &EstimateRequest) -> Result<Estimate> {
        let model_path = req.config.model_path();
        let model = crate::model::load_config(&model_path)?;
        let cfg = req.config.clone();
        let imported = self.store.datasets().await?.into_iter().find(|d| std::path::Path::new(&d.path) == cfg.data.path);
        let mut longest = imported.as_ref().and_then(|d| d.stats.get("longest")).and_then(|v| v.as_u64()).map(|v| v as usize);
        let small = std::fs::metadata(&cfg.data.path).map(|m| m.len() <= SCAN_LIMIT_BYTES).unwrap_or(false);
        let rows = match imported {
            Some(d) => Some(d.rows as u64),
            // A small file not imported: measured as an import would (rows, longest example),
            // so batches shorter than max_len are predicted as such.
            None if small => {
                let (p, c) = (cfg.data.path.clone(), cfg.clone());
                let scanned = tokio::task::spawn_blocking(move || scan_file(&p, &c)).await.map_err(|e| Error::Msg(e.to_string()))?;
                longest = scanned.map(|s| s.1);
                scanned.map(|s| s.0)
            }
            None if cfg.train.max_steps == 0 => {
                let (p, f) = (cfg.data.path.clone(), cfg.data.format);
                tokio::task::spawn_blocking(move || count_rows(&p, f)).await.map_err(|e| Error::Msg(e.to_string()))?
            }
            None => None,
        };
        let rows = rows.map(|r| cfg.data.max_examples.map_or(r, |m| r.min(m as u64)));
        tokio::task::spawn_blocking(move || estimate(&cfg, &model, rows, longest)).await.map_err(|e| Error::Msg(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rate is the median of this probe and the recorded ones of the same thread count;
    /// the file keeps the newest RATE_HISTORY of each count and survives a line it cannot read.
    #[test]
    fn the_rate_settles_on_the_median_of_recent_probes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data").join("machine-rate.txt");
        // Nothing recorded (and no folder yet): the probe itself.
        assert_eq!(settled_rate(&file, 2, 150.0), 150.0);
        // 150 and 180, 190, 185 recorded; a slow probe of 100 moves the median, not to 100.
        for r in [180.0, 190.0] {
            settled_rate(&file, 2, r);
        }
        std::fs::write(&file, format!("{}8 400.0\nnot a reading\n2 185.0\n", std::fs::read_to_string(&file).unwrap())).unwrap();
        assert_eq!(settled_rate(&file, 2, 100.0), 180.0, "median of 150 180 190 185 100");
        // Another thread count's readings are kept but not counted.
        assert_eq!(settled_rate(&file, 8, 420.0), 420.0, "median of 400 420");
        // Only the newest RATE_HISTORY of a count stay: after nine quiet probes of 200, the old ones are gone.
        for _ in 0..RATE_HISTORY {
            settled_rate(&file, 2, 200.0);
        }
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.lines().filter(|l| l.starts_with("2 ")).count(), RATE_HISTORY, "{text}");
        assert!(text.lines().all(|l| l == "2 200.0" || l.starts_with("8 ")), "{text}");
        assert_eq!(settled_rate(&file, 2, 90.0), 200.0);
    }

    /// The tensors the estimate stops counting are those whose projection op takes the step
    /// before or after it itself: every step of a frozen or LoRA q/k/v/o/down; DoRA's q/k/v
    /// (without a bias) but not its o/down; none under full fine-tuning; not an IA3 target's.
    #[test]
    fn epilogue_floats_follow_the_ops_that_take_the_step() {
        let c = LlamaConfig::tiny(32); // q 16 wide, k and v 8, hidden 16, intermediate 24
        let floats = |c: &LlamaConfig, method: &str| {
            let peft: PeftConfig = toml::from_str(method).unwrap();
            let ad = adapted(c, &peft).unwrap();
            fused_epilogue_floats(c, &peft, &ad.iter().map(|a| a.0.as_str()).collect::<Vec<_>>())
        };
        let heads = 16.0 + 8.0 + 8.0;
        let all = heads + 16.0 + 24.0 + 16.0;
        assert_eq!(floats(&c, "method = \"lora\"\ntarget_modules = \"all-linear\""), all);
        assert_eq!(floats(&c, "method = \"lora\"\ntarget_modules = [\"q_proj\", \"v_proj\"]"), all);
        assert_eq!(floats(&c, "method = \"adalora\"\ntarget_modules = [\"down_proj\"]"), all);
        assert_eq!(floats(&c, "method = \"lora\"\nuse_dora = true\ntarget_modules = \"all-linear\""), heads, "DoRA's o and down take no step");
        assert_eq!(floats(&c, "method = \"lora\"\nuse_dora = true\ntarget_modules = [\"o_proj\"]"), all - 16.0);
        let biased = LlamaConfig { attention_bias: true, ..c.clone() };
        assert_eq!(floats(&biased, "method = \"lora\"\nuse_dora = true\ntarget_modules = \"all-linear\""), 0.0, "with a bias DoRA's q, k, v split on their own");
        assert_eq!(floats(&c, "method = \"full\""), 0.0);
        let ia3 = "method = \"ia3\"\ntarget_modules = [\"k_proj\", \"v_proj\", \"down_proj\"]\nfeedforward_modules = [\"down_proj\"]";
        assert_eq!(floats(&c, ia3), 16.0 + 16.0, "q and o, not IA3's k, v, down");
        assert_eq!(floats(&c, "method = \"prompt_tuning\"\nnum_virtual_tokens = 4"), all);
    }
}
