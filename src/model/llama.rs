//! A Llama-family decoder written for training (Llama 2/3, SmolLM, Mistral, Qwen2).
//!
//! Follows HF transformers' `LlamaForCausalLM` (modeling_llama.py): pre-norm decoder layers,
//! grouped-query attention with rotate-half RoPE, SwiGLU MLP, optional tied LM head. Every
//! projection is a [`Linear`] slot a PEFT method can wrap; the base weights are plain tensors
//! (never `Var`s), so only adapter tensors receive gradients. Only ops with a backward are
//! used (see `ops`); there is no KV cache in the model struct. Inference passes a [`KvCache`];
//! on the CPU its attention runs in `attend` (cache grown in place, row-deterministic).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use super::attend::{self, Heads, HostKv};
use super::config::LlamaConfig;
use super::linear::{ForwardCtx, FrozenWeight, Linear};
use super::{ops, profile};
use crate::{Error, Result};

/// Causal self-attention with grouped-query heads.
#[derive(Clone, Debug)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
}

/// The SwiGLU feed-forward block.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
}

/// One pre-norm decoder layer.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    /// Self-attention.
    pub self_attn: Attention,
    /// Feed-forward.
    pub mlp: Mlp,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
}

/// The whole decoder plus LM head.
#[derive(Clone, Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: FrozenWeight,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// The LM head (shares the embedding matrix when tied).
    pub lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    prompt: Option<Arc<dyn PromptSource>>,
    tuned: Option<Arc<dyn TunedWeights>>,
}

/// What a prompt-learning method places before the real tokens (see `peft::prompt`). Virtual
/// tokens take the first positions, so the real tokens' positions (RoPE) start after them, as
/// in HF PEFT.
#[derive(Clone, Debug)]
pub enum VirtualTokens {
    /// Input embeddings (n, hidden) placed before the token embeddings (prompt tuning,
    /// P-tuning): they run through every layer like tokens.
    Embeddings(Tensor),
    /// For every layer, keys and values (kv_heads, n, head_dim) placed before the real ones in
    /// attention (prefix tuning, P-tuning v2). They are used as they are (no RoPE), as in HF
    /// PEFT, which hands them to the model as a pre-filled KV cache.
    KeyValues(Vec<(Tensor, Tensor)>),
}

impl VirtualTokens {
    /// Number of virtual positions.
    pub fn len(&self) -> Result<usize> {
        Ok(match self {
            VirtualTokens::Embeddings(e) => e.dim(0)?,
            VirtualTokens::KeyValues(kv) => kv.first().map(|(k, _)| k.dim(1)).transpose()?.unwrap_or(0),
        })
    }
}

/// Where an RMSNorm weight sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormSite {
    /// `model.layers.{i}.input_layernorm`.
    Input(usize),
    /// `model.layers.{i}.post_attention_layernorm`.
    PostAttention(usize),
    /// `model.norm`.
    Final,
}

impl NormSite {
    /// The HF name of the norm's weight (`model.layers.3.input_layernorm.weight`).
    pub fn hf_name(self) -> String {
        match self {
            NormSite::Input(i) => format!("model.layers.{i}.input_layernorm.weight"),
            NormSite::PostAttention(i) => format!("model.layers.{i}.post_attention_layernorm.weight"),
            NormSite::Final => "model.norm.weight".into(),
        }
    }
}

/// Trained replacements for the model's weights outside its linear slots — the embedding and
/// the RMSNorm weights — installed with [`Llama::set_tuned`] (full fine-tuning; linears are
/// replaced through their adapter slots). The frozen weights stay as they were.
pub trait TunedWeights: Send + Sync + std::fmt::Debug {
    /// The embedding matrix (vocab, hidden) to use instead of the frozen one, if trained.
    fn embedding(&self, ctx: &ForwardCtx) -> Option<Tensor>;
    /// The norm weight (hidden,) to use at `site`, if trained.
    fn norm(&self, site: NormSite, ctx: &ForwardCtx) -> Option<Tensor>;
}

/// A prompt-learning method's module, installed on the model with [`Llama::set_prompt`].
pub trait PromptSource: Send + Sync + std::fmt::Debug {
    /// Number of virtual positions it adds in front of a sequence.
    fn num_virtual_tokens(&self) -> usize;
    /// The virtual tokens for a forward pass (tracked for the backward when `ctx.train`).
    fn virtual_tokens(&self, ctx: &ForwardCtx) -> Result<VirtualTokens>;
    /// Downcasting.
    fn as_any(&self) -> &dyn std::any::Any;
}

impl Attention {
    /// `residual` (the layer's input) plus the attention of `xs` (its norm). `prefix`: virtual keys and values (kv_heads, n, head_dim) before the real ones,
    /// for a pass without a cache (a cache holds them from its first pass).
    fn forward(
        &self,
        xs: &Tensor,
        residual: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        ctx: &ForwardCtx,
        cache: Option<&mut LayerCache>,
        prefix: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        if let Some(c) = cache {
            if uses_host_cache(xs) {
                return Ok((residual + self.forward_host(xs, cos, sin, ctx, &mut c.host)?)?);
            }
            return self.forward_ops(xs, residual, cos, sin, ctx, Some(c), None);
        }
        self.forward_ops(xs, residual, cos, sin, ctx, None, prefix)
    }

    /// Inference on the CPU: the cache grows in place and every query row is computed the same
    /// way in a one-token step as in a prefill (see `attend`).
    fn forward_host(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor, ctx: &ForwardCtx, cache: &mut HostKv) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let h = Heads { b, s, n_heads: self.n_heads, n_kv: self.n_kv, head_dim: self.head_dim };
        let host = |t: Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let q = host(self.q_proj.forward(xs, ctx)?)?;
        let k = host(self.k_proj.forward(xs, ctx)?)?;
        let v = host(self.v_proj.forward(xs, ctx)?)?;
        let (cos, sin) = (host(cos.clone())?, host(sin.clone())?);
        cache.append(&h, &k, &v, &cos, &sin);
        let out = attend::attend(&h, &q, cache, &cos, &sin);
        let out = Tensor::from_vec(out, (b, s, self.n_heads * self.head_dim), xs.device())?;
        self.o_proj.forward(&out, ctx)
    }

    /// Attention from candle ops (differentiable; any device), added to `residual`.
    #[allow(clippy::too_many_arguments)]
    fn forward_ops(
        &self,
        xs: &Tensor,
        residual: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        ctx: &ForwardCtx,
        cache: Option<&mut LayerCache>,
        prefix: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv, self.head_dim);
        // Per head, rotated: q as (b, nkv, rep·s, hd), the nh/nkv query heads sharing a KV head
        // stacked along the row axis (grouped-query attention without copying K/V); k and v as
        // (b, nkv, s, hd).
        let rope = Some((cos, sin));
        let split = |heads, rope| ops::Epilogue::Heads(ops::HeadSplit { heads, groups: nkv, rope });
        let q = self.q_proj.forward_then(xs, ctx, split(nh, rope))?;
        let mut k = self.k_proj.forward_then(xs, ctx, split(nkv, rope))?;
        let mut v = self.v_proj.forward_then(xs, ctx, split(nkv, None))?;
        if let Some((pk, pv)) = prefix {
            let n = pk.dim(1)?;
            let pk = pk.to_dtype(k.dtype())?.unsqueeze(0)?.broadcast_as((b, nkv, n, hd))?.contiguous()?;
            let pv = pv.to_dtype(v.dtype())?.unsqueeze(0)?.broadcast_as((b, nkv, n, hd))?.contiguous()?;
            k = Tensor::cat(&[&pk, &k], 2)?;
            v = Tensor::cat(&[&pv, &v], 2)?;
        }
        if let Some(c) = cache {
            if let (Some(pk), Some(pv)) = (&c.k, &c.v) {
                // A prefilled prefix may still be in its adapter's f32 (mixed precision).
                k = Tensor::cat(&[&pk.to_dtype(k.dtype())?, &k], 2)?;
                v = Tensor::cat(&[&pv.to_dtype(v.dtype())?, &v], 2)?;
            }
            c.k = Some(k.clone());
            c.v = Some(v.clone());
        }
        let out = ops::causal_attention(&q, &k, &v, s, 1.0 / (hd as f64).sqrt())?;
        self.o_proj.forward_then(&out, ctx, ops::Epilogue::Residual(residual))
    }
}

impl Mlp {
    /// `residual` + the MLP of `xs`.
    fn forward(&self, xs: &Tensor, residual: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let g = self.gate_proj.forward(xs, ctx)?;
        let u = self.up_proj.forward(xs, ctx)?;
        self.down_proj.forward_swiglu_then(&g, &u, ctx, ops::Epilogue::Residual(residual))
    }
}

impl DecoderLayer {
    fn forward(
        &self,
        xs: &Tensor,
        cfg: &LlamaConfig,
        cos: &Tensor,
        sin: &Tensor,
        ctx: &ForwardCtx,
        cache: Option<&mut LayerCache>,
        prefix: Option<&(Tensor, Tensor)>,
        norms: [Option<Tensor>; 2],
    ) -> Result<Tensor> {
        let [n1, n2] = norms;
        let h = ops::rms_norm(xs, n1.as_ref().unwrap_or(&self.input_layernorm), cfg.rms_norm_eps)?;
        // Each sublayer's last projection adds its output to the stream inside its own op
        // where it can (`ops::Epilogue::Residual`).
        let xs = self.self_attn.forward(&h, xs, cos, sin, ctx, cache, prefix)?;
        let h = ops::rms_norm(&xs, n2.as_ref().unwrap_or(&self.post_attention_layernorm), cfg.rms_norm_eps)?;
        self.mlp.forward(&h, &xs, ctx)
    }
}

/// Adds gradients into running sums, slot by slot (`acc[i] + more[i]`; a slot without a
/// gradient stays as it is): micro-batches, layers recomputed by checkpointing, extra terms.
pub fn add_grads(acc: &mut [Option<Tensor>], more: impl IntoIterator<Item = Option<Tensor>>) -> Result<()> {
    for (a, g) in acc.iter_mut().zip(more) {
        if let Some(g) = g {
            *a = Some(match a.take() {
                Some(x) => (x + g)?,
                None => g,
            });
        }
    }
    Ok(())
}

/// The dtype losses come out in: f32, or f64 for an f64 model (gradient checks).
fn loss_dtype(model: DType) -> DType {
    if model == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Whether inference attention on `xs` runs on the host cache (`attend`) rather than ops.
fn uses_host_cache(xs: &Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32
}

fn rope_tables(cfg: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let max = cfg.max_position_embeddings.max(1);
    let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / hd as f32)).collect();
    let mut cos = Vec::with_capacity(max * hd / 2);
    let mut sin = Vec::with_capacity(max * hd / 2);
    for p in 0..max {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((Tensor::from_vec(cos, (max, hd / 2), device)?, Tensor::from_vec(sin, (max, hd / 2), device)?))
}

impl Llama {
    /// Builds the model from HF-named tensors (`model.layers.0.self_attn.q_proj.weight`, …).
    /// `source` names the file in errors.
    pub fn from_tensors(cfg: LlamaConfig, t: HashMap<String, Tensor>, source: &std::path::Path, device: &Device) -> Result<Self> {
        Self::from_tensors_dtype(cfg, t, source, device, DType::F32)
    }

    /// Like [`Llama::from_tensors`] with the weights in `dtype` (F64 for gradient checks).
    pub fn from_tensors_dtype(
        cfg: LlamaConfig,
        t: HashMap<String, Tensor>,
        source: &std::path::Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let w = t.into_iter().map(|(k, v)| (k, FrozenWeight::Dense(v))).collect();
        Self::from_weights(cfg, w, source, device, dtype)
    }

    /// Builds the model from HF-named weights that may be quantized (GGUF inference): dense
    /// ones are converted to `dtype` on `device`, quantized matrices are kept as they are,
    /// and vectors (norms, biases) are always dense.
    pub fn from_weights(
        cfg: LlamaConfig,
        mut t: HashMap<String, FrozenWeight>,
        source: &std::path::Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let present: std::collections::HashSet<String> = t.keys().cloned().collect();
        let mut take_w = |name: &str| -> Result<FrozenWeight> {
            let x = t
                .remove(name)
                .ok_or_else(|| Error::bad_input(source, None, format!("tensor `{name}` is missing")))?;
            Ok(match x {
                FrozenWeight::Dense(x) => FrozenWeight::Dense(x.to_dtype(dtype)?.to_device(device)?),
                q => q,
            })
        };
        let dense = |w: FrozenWeight| -> Result<Tensor> { Ok(w.dense()?.to_dtype(dtype)?.to_device(device)?) };
        let embed_tokens = take_w("model.embed_tokens.weight")?;
        let (nh, nkv, hd, h) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim(), cfg.hidden_size);
        let check = |name: &str, x: &[usize], want: &[usize]| -> Result<()> {
            if x != want {
                return Err(Error::bad_input(source, None, format!("tensor `{name}` has shape {x:?}, expected {want:?}")));
            }
            Ok(())
        };
        check("model.embed_tokens.weight", embed_tokens.dims(), &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            // `bias`: required (q/k/v of Qwen2-style configs); otherwise read when present (a
            // merged BitFit model has biases wherever they were trained).
            let mut lin = |m: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                let name = format!("{p}.{m}");
                let w = take_w(&format!("{name}.weight"))?;
                check(&format!("{name}.weight"), w.dims(), &[out, inp])?;
                let bias_name = format!("{name}.bias");
                let b = if bias || present.contains(&bias_name) { Some(dense(take_w(&bias_name)?)?) } else { None };
                if let Some(b) = &b {
                    check(&format!("{name}.bias"), b.dims(), &[out])?;
                }
                Ok(Linear::with_weight(name, w, b))
            };
            let ab = cfg.attention_bias;
            let self_attn = Attention {
                q_proj: lin("self_attn.q_proj", nh * hd, h, ab)?,
                k_proj: lin("self_attn.k_proj", nkv * hd, h, ab)?,
                v_proj: lin("self_attn.v_proj", nkv * hd, h, ab)?,
                o_proj: lin("self_attn.o_proj", h, nh * hd, false)?,
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            };
            let mlp = Mlp {
                gate_proj: lin("mlp.gate_proj", cfg.intermediate_size, h, false)?,
                up_proj: lin("mlp.up_proj", cfg.intermediate_size, h, false)?,
                down_proj: lin("mlp.down_proj", h, cfg.intermediate_size, false)?,
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: dense(take_w(&format!("{p}.input_layernorm.weight"))?)?,
                post_attention_layernorm: dense(take_w(&format!("{p}.post_attention_layernorm.weight"))?)?,
            });
        }
        let norm = dense(take_w("model.norm.weight")?)?;
        let lm_w = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            take_w("lm_head.weight").or_else(|_| Ok::<_, Error>(embed_tokens.clone()))?
        };
        let lm_head = Linear::with_weight("lm_head", lm_w, None);
        let (cos, sin) = rope_tables(&cfg, device)?;
        Ok(Llama { cfg, embed_tokens, layers, norm, lm_head, cos, sin, device: device.clone(), prompt: None, tuned: None })
    }

    /// A model with seeded random weights (tests and benchmarks of shapes).
    pub fn random(cfg: LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::random_dtype(cfg, seed, device, DType::F32)
    }

    /// [`Llama::random`] in `dtype`.
    pub fn random_dtype(cfg: LlamaConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut t = HashMap::new();
        // Each tensor drawn in f32 (offset added there) and converted to `dtype` at once, so a
        // 16-bit model never exists in f32 all at once (a benchmark's load peak).
        let mut rnd = |shape: &[usize], scale: f32, offset: f32| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale + offset).collect();
            Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
        };
        let (h, nh, nkv, hd, f) = (cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim(), cfg.intermediate_size);
        let s = 1.0 / (h as f32).sqrt();
        t.insert("model.embed_tokens.weight".to_string(), rnd(&[cfg.vocab_size, h], 1.0, 0.0)?);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            for (m, o, inp) in [
                ("self_attn.q_proj", nh * hd, h),
                ("self_attn.k_proj", nkv * hd, h),
                ("self_attn.v_proj", nkv * hd, h),
                ("self_attn.o_proj", h, nh * hd),
                ("mlp.gate_proj", f, h),
                ("mlp.up_proj", f, h),
                ("mlp.down_proj", h, f),
            ] {
                t.insert(format!("{p}.{m}.weight"), rnd(&[o, inp], s * 2.0, 0.0)?);
                if cfg.attention_bias && m != "self_attn.o_proj" && m.starts_with("self_attn") {
                    t.insert(format!("{p}.{m}.bias"), rnd(&[o], 0.1, 0.0)?);
                }
            }
            t.insert(format!("{p}.input_layernorm.weight"), rnd(&[h], 0.2, 1.0)?);
            t.insert(format!("{p}.post_attention_layernorm.weight"), rnd(&[h], 0.2, 1.0)?);
        }
        t.insert("model.norm.weight".to_string(), rnd(&[h], 0.2, 1.0)?);
        if !cfg.tie_word_embeddings {
            t.insert("lm_head.weight".to_string(), rnd(&[cfg.vocab_size, h], s, 0.0)?);
        }
        Self::from_tensors_dtype(cfg, t, std::path::Path::new("<random>"), device, dtype)
    }

    /// Holds every dense frozen weight (embedding, projections, biases, norms) in `dtype`:
    /// mixed-precision training keeps the base and the activations in bf16 while adapters and
    /// optimizer state stay f32. Quantized blocks stay as they are; a tied LM head stays tied.
    pub fn cast(&mut self, dtype: DType) -> Result<()> {
        let tied = self.lm_head_is_embedding();
        if let FrozenWeight::Dense(w) = &self.embed_tokens {
            self.embed_tokens = FrozenWeight::Dense(w.to_dtype(dtype)?);
        }
        let embed = self.embed_tokens.clone();
        for lin in self.linears_mut() {
            if tied && lin.name() == "lm_head" {
                lin.set_frozen_weight(embed.clone())?;
            } else if let FrozenWeight::Dense(w) = lin.weight() {
                let w = w.to_dtype(dtype)?;
                lin.set_weight(w);
            }
            if let Some(b) = lin.bias() {
                let b = b.to_dtype(dtype)?;
                lin.set_bias(Some(b));
            }
        }
        for site in self.norm_sites() {
            let w = self.norm_weight(site)?.to_dtype(dtype)?;
            self.set_norm_weight(site, w)?;
        }
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of base-model parameters (the tied LM head counted once).
    pub fn num_params(&self) -> usize {
        let mut n = self.embed_tokens.elem_count() + self.norm.elem_count();
        for l in &self.layers {
            n += l.input_layernorm.elem_count() + l.post_attention_layernorm.elem_count();
        }
        for lin in self.linears() {
            if lin.name() == "lm_head" && self.cfg.tie_word_embeddings {
                continue;
            }
            n += lin.weight().elem_count() + lin.bias().map(|b| b.elem_count()).unwrap_or(0);
        }
        n
    }

    /// The embedding matrix (vocab, hidden).
    pub fn embed_tokens(&self) -> &FrozenWeight {
        &self.embed_tokens
    }

    /// Every linear slot with its HF module path, in model order (LM head last).
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = Vec::new();
        for l in &self.layers {
            let a = &l.self_attn;
            let m = &l.mlp;
            v.extend([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]);
        }
        v.push(&self.lm_head);
        v
    }

    /// Mutable access to every linear slot (for installing adapters and merging).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = Vec::new();
        for l in &mut self.layers {
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            v.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj, &mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]);
        }
        v.push(&mut self.lm_head);
        v
    }

    /// Final hidden states (after the last norm), (b, s, hidden). `ids`: (b, s) u32.
    pub fn hidden(&self, ids: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        self.hidden_cached(ids, ctx, None)
    }

    /// Like [`Llama::hidden`], continuing from (and extending) an inference KV cache: `ids`
    /// are the new tokens, placed after the `cache.len()` already cached positions (virtual
    /// tokens of an installed prompt-learning method included).
    pub fn hidden_cached(&self, ids: &Tensor, ctx: &ForwardCtx, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (_, new) = ids.dims2()?;
        let (h, front) = self.hidden_full(ids, ctx, cache)?;
        Ok(if front == 0 { h } else { h.narrow(1, front, new)? })
    }

    /// Hidden states with the virtual tokens' rows in front when a prompt-learning method puts
    /// embeddings there (returns how many). The virtual tokens come first in the first pass
    /// over a sequence (no cache, or an empty one); a cache keeps them for later passes.
    fn hidden_full(&self, ids: &Tensor, ctx: &ForwardCtx, mut cache: Option<&mut KvCache>) -> Result<(Tensor, usize)> {
        let pos = cache.as_ref().map(|c| c.len).unwrap_or(0);
        let stem = self.stem(ids, ctx, pos)?;
        let mut xs = stem.xs.clone();
        if let Some(c) = cache.as_deref_mut() {
            if pos == 0 || c.layers.len() != self.layers.len() {
                c.layers = vec![LayerCache::default(); self.layers.len()];
            }
            if let Some(kv) = &stem.prefixes {
                let host = uses_host_cache(&xs);
                for (lc, (k, v)) in c.layers.iter_mut().zip(kv) {
                    lc.prefill(stem.batch, k, v, host)?;
                }
            }
            c.len = stem.seq_end;
        }
        let with_cache = cache.is_some();
        let ctx = &ForwardCtx { generation: with_cache, ..*ctx };
        for i in 0..self.layers.len() {
            let lc = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            xs = self.layer_forward(i, &xs, &stem, ctx, lc)?;
        }
        Ok((self.final_norm(&xs, ctx)?, stem.front))
    }

    /// Everything before the decoder layers for `ids` placed after `pos` cached positions:
    /// the token embeddings (virtual input tokens in front in a first pass), the per-layer
    /// virtual keys and values, and the RoPE tables for the rows.
    fn stem(&self, ids: &Tensor, ctx: &ForwardCtx, pos: usize) -> Result<Stem> {
        let (b, new) = ids.dims2()?;
        let virt = match &self.prompt {
            Some(p) if pos == 0 => Some(p.virtual_tokens(ctx)?),
            _ => None,
        };
        let nv = virt.as_ref().map(|v| v.len()).transpose()?.unwrap_or(0);
        let s = pos + nv + new;
        if s > self.cfg.max_position_embeddings {
            let virt_note = if nv > 0 { format!(" ({nv} of them the adapter's virtual tokens)") } else { String::new() };
            return Err(Error::Msg(format!(
                "sequence of {s} tokens{virt_note} is longer than the model's context ({})",
                self.cfg.max_position_embeddings
            )));
        }
        let flat = ids.flatten_all()?;
        let embedded = profile::region("embedding fwd", &self.device, || -> Result<Tensor> {
            Ok(match self.tuned.as_deref().and_then(|t| t.embedding(ctx)) {
                Some(w) => w.embedding(&flat)?,
                None => self.embed_tokens.rows(&flat)?,
            })
        })?;
        let mut xs = embedded.reshape((b, new, self.cfg.hidden_size))?;
        let mut prefixes = None;
        let mut front = 0;
        match virt {
            Some(VirtualTokens::Embeddings(e)) => {
                let e = e.to_dtype(xs.dtype())?.unsqueeze(0)?.broadcast_as((b, nv, self.cfg.hidden_size))?.contiguous()?;
                xs = Tensor::cat(&[&e, &xs], 1)?;
                front = nv;
            }
            Some(VirtualTokens::KeyValues(kv)) => {
                if kv.len() != self.layers.len() {
                    return Err(Error::Msg(format!("prefix for {} layers on a model with {}", kv.len(), self.layers.len())));
                }
                prefixes = Some(kv);
            }
            None => {}
        }
        let rows = front + new;
        let cos = self.cos.narrow(0, s - rows, rows)?;
        let sin = self.sin.narrow(0, s - rows, rows)?;
        Ok(Stem { xs, front, prefixes, cos, sin, batch: b, seq_end: s })
    }

    /// Decoder layer `i` on `xs`. Each layer draws its own dropout masks from the pass's seed,
    /// so running a layer again (gradient checkpointing) draws the same ones.
    fn layer_forward(&self, i: usize, xs: &Tensor, stem: &Stem, ctx: &ForwardCtx, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let lctx = ForwardCtx { seed: ctx.seed.wrapping_mul(1_000_003).wrapping_add(i as u64), ..*ctx };
        // A cache holds the virtual keys and values from its first pass.
        let prefix = if cache.is_some() { None } else { stem.prefixes.as_ref().map(|p| &p[i]) };
        let tuned = self.tuned.as_deref();
        let norms = [NormSite::Input(i), NormSite::PostAttention(i)].map(|site| tuned.and_then(|t| t.norm(site, ctx)));
        self.layers[i].forward(xs, &self.cfg, &stem.cos, &stem.sin, &lctx, cache, prefix, norms)
    }

    /// The final RMSNorm.
    fn final_norm(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let norm = self.tuned.as_deref().and_then(|t| t.norm(NormSite::Final, ctx));
        Ok(ops::rms_norm(xs, norm.as_ref().unwrap_or(&self.norm), self.cfg.rms_norm_eps)?)
    }

    /// Installs (or with None removes) a prompt-learning method's virtual tokens.
    pub fn set_prompt(&mut self, prompt: Option<Arc<dyn PromptSource>>) {
        self.prompt = prompt;
    }

    /// Installs (or with None removes) trained replacements for the embedding and norms.
    pub fn set_tuned(&mut self, tuned: Option<Arc<dyn TunedWeights>>) {
        self.tuned = tuned;
    }

    /// The installed trained replacements, if any.
    pub fn tuned(&self) -> Option<&Arc<dyn TunedWeights>> {
        self.tuned.as_ref()
    }

    /// The frozen RMSNorm weight at `site`.
    pub fn norm_weight(&self, site: NormSite) -> Result<&Tensor> {
        let layer = |i: usize| self.layers.get(i).ok_or_else(|| Error::Msg(format!("the model has no layer {i}")));
        Ok(match site {
            NormSite::Input(i) => &layer(i)?.input_layernorm,
            NormSite::PostAttention(i) => &layer(i)?.post_attention_layernorm,
            NormSite::Final => &self.norm,
        })
    }

    /// Replaces the frozen RMSNorm weight at `site` with one of the same shape (used by merge).
    pub fn set_norm_weight(&mut self, site: NormSite, w: Tensor) -> Result<()> {
        let have = self.norm_weight(site)?.dims().to_vec();
        if w.dims() != have {
            return Err(Error::Msg(format!("norm {site:?}: weight {:?} does not replace {have:?}", w.dims())));
        }
        let slot = match site {
            NormSite::Input(i) => &mut self.layers[i].input_layernorm,
            NormSite::PostAttention(i) => &mut self.layers[i].post_attention_layernorm,
            NormSite::Final => &mut self.norm,
        };
        *slot = w;
        Ok(())
    }

    /// Every norm site in model order (each layer's two, then the final norm).
    pub fn norm_sites(&self) -> Vec<NormSite> {
        let mut v: Vec<NormSite> = (0..self.layers.len()).flat_map(|i| [NormSite::Input(i), NormSite::PostAttention(i)]).collect();
        v.push(NormSite::Final);
        v
    }

    /// Replaces the frozen embedding matrix with a dense one of the same shape (used by
    /// merge); a tied LM head keeps its own weight until it is set too.
    pub fn set_embed_tokens(&mut self, w: Tensor) -> Result<()> {
        if w.dims() != self.embed_tokens.dims() {
            return Err(Error::Msg(format!("embedding {:?} does not replace {:?}", w.dims(), self.embed_tokens.dims())));
        }
        self.embed_tokens = FrozenWeight::Dense(w);
        Ok(())
    }

    /// Positions the installed prompt-learning method takes in front of every sequence (0
    /// without one): the context left for tokens is `max_position_embeddings` minus this.
    pub fn num_virtual_tokens(&self) -> usize {
        self.prompt.as_ref().map_or(0, |p| p.num_virtual_tokens())
    }

    /// The installed prompt-learning module, if any.
    pub fn prompt(&self) -> Option<&Arc<dyn PromptSource>> {
        self.prompt.as_ref()
    }

    /// Logits (b, s, vocab) for every position.
    pub fn logits(&self, ids: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let h = self.hidden(ids, ctx)?;
        self.lm_head.forward(&h, ctx)
    }

    /// Sum of next-token cross-entropy over the positions whose label is not -100, and the
    /// number of such positions. `labels` are aligned with `ids` (HF convention): position t
    /// predicts `labels[t+1]`. The LM head runs only on counted positions, in chunks of
    /// `chunk` rows, so the full (b·s, vocab) logits never exist at once.
    pub fn loss_sum(&self, ids: &Tensor, labels: &[i64], ctx: &ForwardCtx, chunk: usize) -> Result<(Tensor, usize)> {
        let (b, s) = ids.dims2()?;
        let (h, front) = self.hidden_full(ids, ctx, None)?;
        let (rows, targets) = self.label_rows(b, s, front, labels)?;
        if rows.is_empty() {
            return Ok((Tensor::zeros((), loss_dtype(self.embed_tokens.dtype()), &self.device)?, 0));
        }
        let h = h.reshape((b * (front + s), self.cfg.hidden_size))?;
        Ok((self.head_loss(&h, &rows, &targets, ctx, chunk)?, rows.len()))
    }

    /// The rows of the flattened hidden states (b·(front + s), hidden) that predict a label,
    /// and those labels. With virtual input tokens in front (prompt tuning, P-tuning), the
    /// last of them predicts the first real label, as in HF PEFT (which pads the labels with
    /// -100 for the virtual positions and shifts as usual).
    fn label_rows(&self, b: usize, s: usize, front: usize, labels: &[i64]) -> Result<(Vec<u32>, Vec<u32>)> {
        let width = front + s;
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for bi in 0..b {
            let first = if front > 0 { 0 } else { 1 };
            for t in first..s {
                let l = labels[bi * s + t];
                if l >= 0 {
                    if l as usize >= self.cfg.vocab_size {
                        return Err(Error::Msg(format!("label {l} is outside the vocabulary ({} tokens)", self.cfg.vocab_size)));
                    }
                    // The row before label t's position.
                    rows.push((bi * width + front + t - 1) as u32);
                    targets.push(l as u32);
                }
            }
        }
        Ok((rows, targets))
    }

    /// Summed cross-entropy of the LM head on the given rows of `h` (flattened final hidden
    /// states) against `targets`.
    fn head_loss(&self, h: &Tensor, rows: &[u32], targets: &[u32], ctx: &ForwardCtx, chunk: usize) -> Result<Tensor> {
        let n = rows.len();
        let idx = Tensor::from_slice(rows, n, &self.device)?;
        let hs = h.index_select(&idx, 0)?;
        let unbiased = self.lm_head.adapter().filter(|_| self.lm_head.bias().is_none());
        Ok(if let Some(w) = unbiased.and_then(|a| a.trained_weight(ctx)) {
            // A head whose weight trains (full fine-tuning): chunk by chunk, its gradient too.
            ops::linear_cross_entropy_trained_sum(&hs, &w, targets, chunk)?
        } else if let Some((input, a, b, scale)) = unbiased.and_then(|a| a.head_pair(&hs, ctx)).transpose()? {
            // LoRA on the head: chunk by chunk, the pair's gradients too.
            let pair = ops::HeadPair { input: &input, a: &a, b: &b, scale };
            ops::linear_cross_entropy_lora_sum(&hs, &self.lm_head.weight().dense()?, pair, targets, chunk)?
        } else if self.lm_head.adapter().is_none() && self.lm_head.bias().is_none() {
            ops::linear_cross_entropy(&hs, &self.lm_head.weight().dense()?, targets, chunk)?.sum_all()?
        } else if let Some((scale, shift)) = self.head_affine(ctx)? {
            // IA3 or BitFit on the head, or a frozen bias: chunk by chunk, their gradients too.
            let affine = ops::HeadAffine { scale: scale.as_ref(), shift: shift.as_ref() };
            ops::linear_cross_entropy_affine_sum(&hs, &self.lm_head.weight().dense()?, affine, targets, chunk)?
        } else if ctx.train {
            // Any other adapter on the LM head (DoRA, AdaLoRA, …).
            profile::region("lm head + loss fwd", &self.device, || self.adapted_head_loss(&hs, targets, ctx, chunk))?
        } else {
            // Evaluation: logits through the slot, then cross-entropy, chunk by chunk (no graph).
            let mut parts = Vec::new();
            for start in (0..n).step_by(chunk.max(1)) {
                let end = (start + chunk.max(1)).min(n);
                let logits = self.lm_head.forward(&hs.narrow(0, start, end - start)?, ctx)?;
                parts.push(ops::cross_entropy_rows(&logits, &targets[start..end])?);
            }
            Tensor::cat(&parts, 0)?.sum_all()?
        })
    }

    /// The LM head's column-wise scale and shift ([`ops::HeadAffine`]): its adapter's
    /// ([`crate::model::LinearAdapter::head_affine`]) with the frozen bias added to the shift, or the frozen
    /// bias alone; `None` when the adapter does something else to the head.
    fn head_affine(&self, ctx: &ForwardCtx) -> Result<Option<(Option<Tensor>, Option<Tensor>)>> {
        let (scale, shift) = match self.lm_head.adapter() {
            Some(a) => match a.head_affine(ctx) {
                Some(affine) => affine,
                None => return Ok(None),
            },
            None => (None, None),
        };
        let shift = match (shift, self.lm_head.bias()) {
            (Some(s), Some(b)) => Some(s.broadcast_add(&b.reshape(s.shape())?.to_dtype(s.dtype())?)?),
            (s, b) => s.or_else(|| b.cloned()),
        };
        Ok(Some((scale, shift)))
    }

    /// The summed loss of an LM head with an adapter while training, chunk by
    /// chunk: each chunk's logits go through the slot from a leaf copy of its rows, its loss is
    /// differentiated at once and its graph dropped, and the gradients (the rows', each of the
    /// adapter's trainable tensors' summed over the chunks) are handed on by
    /// [`ops::carry_gradient`] zeros. A graph over every row kept their logits and
    /// log-softmax for the backward (5.25 copies of (rows, vocab) f32 measured: 2 GiB at 2048
    /// rows of a 49k vocabulary); this keeps one chunk's (the estimate's
    /// `ADAPTED_HEAD_CHUNK_COPIES`). The same FLOPs: each chunk's backward runs once, in the
    /// forward pass.
    fn adapted_head_loss(&self, hs: &Tensor, targets: &[u32], ctx: &ForwardCtx, chunk: usize) -> Result<Tensor> {
        let params = self.lm_head.adapter().map(|a| a.trainable_tensors()).unwrap_or_default();
        let n = hs.dim(0)?;
        let rows_tracked = hs.track_op();
        let mut loss: Option<Tensor> = None;
        let mut dh = Vec::new();
        let mut dp: Vec<Option<Tensor>> = vec![None; params.len()];
        let sum = |acc: Option<Tensor>, t: Tensor| -> Result<Tensor> { Ok(match acc { Some(a) => (a + t)?, None => t }) };
        for start in (0..n).step_by(chunk.max(1)) {
            let rows = chunk.max(1).min(n - start);
            let part = hs.narrow(0, start, rows)?.detach();
            // A leaf (a copy of the chunk's rows) when the rows want their gradient.
            let input = if rows_tracked { candle_core::Var::from_tensor(&part)?.as_tensor().clone() } else { part };
            let l = ops::cross_entropy_sum(&self.lm_head.forward(&input, ctx)?, &targets[start..start + rows])?;
            let grads = l.backward()?;
            if rows_tracked {
                let g = grads.get(&input).ok_or_else(|| Error::Msg("adapted LM head: the rows got no gradient".into()))?;
                dh.push(g.detach());
            }
            for (slot, p) in dp.iter_mut().zip(&params) {
                if let Some(g) = grads.get(p) {
                    *slot = Some(sum(slot.take(), g.detach())?);
                }
            }
            loss = Some(sum(loss, l.detach())?);
        }
        let Some(mut loss) = loss else { return Ok(Tensor::zeros((), loss_dtype(hs.dtype()), hs.device())?) };
        if rows_tracked {
            loss = (loss + ops::carry_gradient(hs, Tensor::cat(&dh, 0)?)?)?;
        }
        for (p, g) in params.iter().zip(dp) {
            if let Some(g) = g {
                loss = (loss + ops::carry_gradient(p, g)?)?;
            }
        }
        Ok(loss)
    }

    /// [`Llama::loss_sum`] and the gradients of `scale ×` that sum for `vars`, with gradient
    /// checkpointing per decoder layer: the forward keeps only each layer's input (one
    /// (b, s, hidden) tensor per layer) and drops the layer's graph; the backward runs from
    /// the loss down, computing each layer again from its saved input and pulling the
    /// incoming gradient through it. Activation memory is the layer inputs plus one layer's
    /// graph instead of every layer's; the price is a second forward of every layer.
    /// The gradients equal the plain backward's (same ops, same dropout masks: each layer
    /// draws them from the pass's seed). Returns the loss sum (no graph), the number of
    /// counted positions and, for each of `vars`, its gradient (None when it gets none).
    pub fn loss_grads_checkpointed(
        &self,
        ids: &Tensor,
        labels: &[i64],
        ctx: &ForwardCtx,
        chunk: usize,
        scale: f64,
        vars: &[&Tensor],
    ) -> Result<(Tensor, usize, Vec<Option<Tensor>>)> {
        let (b, s) = ids.dims2()?;
        let stem = self.stem(ids, ctx, 0)?;
        let (rows, targets) = self.label_rows(b, s, stem.front, labels)?;
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        if rows.is_empty() {
            return Ok((Tensor::zeros((), loss_dtype(self.embed_tokens.dtype()), &self.device)?, 0, grads));
        }
        // Gradients are kept as values only (see the trainer: a variable's gradient can stay
        // attached to the graph it came from).
        let mut take = |store: &candle_core::backprop::GradStore| add_grads(&mut grads, vars.iter().map(|v| store.get(v).map(|g| g.detach())));
        // Forward: each layer's input is kept, its graph dropped with the detached output.
        let mut inputs = Vec::with_capacity(self.layers.len());
        let dev = &self.device;
        let (leaf, total) = profile::region("forward", dev, || -> Result<_> {
            let mut xs = stem.xs.detach();
            for i in 0..self.layers.len() {
                let out = self.layer_forward(i, &xs, &stem, ctx, None)?.detach();
                inputs.push(std::mem::replace(&mut xs, out));
            }
            // The head: final norm, LM head and loss, from the last layer's output as a leaf.
            let leaf = candle_core::Var::from_tensor(&xs)?;
            drop(xs);
            let h = self.final_norm(leaf.as_tensor(), ctx)?.reshape((b * (stem.front + s), self.cfg.hidden_size))?;
            Ok((leaf, self.head_loss(&h, &rows, &targets, ctx, chunk)?))
        })?;
        let loss = total.detach();
        let store = profile::region("backward", dev, || (total * scale)?.backward())?;
        take(&store)?;
        let mut upstream = store.get(leaf.as_tensor()).map(|g| g.detach());
        drop(store);
        // Down the layers: recompute each from its saved input and pull the gradient through.
        for i in (0..self.layers.len()).rev() {
            let (Some(g_out), Some(input)) = (upstream.take(), inputs.pop()) else { break };
            let leaf = candle_core::Var::from_tensor(&input)?;
            drop(input);
            let out = profile::region("forward (recompute)", dev, || self.layer_forward(i, leaf.as_tensor(), &stem, ctx, None))?;
            let store = profile::region("backward", dev, || (out * g_out)?.sum_all()?.backward())?;
            take(&store)?;
            upstream = store.get(leaf.as_tensor()).map(|g| g.detach());
        }
        // The stem: trained embeddings or virtual input tokens.
        if let Some(g) = upstream {
            if stem.xs.track_op() {
                take(&profile::region("backward", dev, || (&stem.xs * g)?.sum_all()?.backward())?)?;
            }
        }
        Ok((loss, rows.len(), grads))
    }
}

/// What runs before the decoder layers (see `Llama::stem`).
struct Stem {
    /// (b, front + new, hidden).
    xs: Tensor,
    /// Virtual input tokens in front of the real ones.
    front: usize,
    /// Per-layer virtual keys and values (prefix tuning).
    prefixes: Option<Vec<(Tensor, Tensor)>>,
    cos: Tensor,
    sin: Tensor,
    batch: usize,
    /// Positions covered after this pass (cached + virtual + new).
    seq_end: usize,
}

/// One layer's cached keys and values: on the CPU in a buffer that grows in place
/// ([`HostKv`]); on other devices as tensors (b, kv_heads, len, head_dim).
#[derive(Clone, Debug, Default)]
pub struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    host: HostKv,
}

/// An inference KV cache, passed to [`Llama::hidden_cached`] (the model holds none).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl LayerCache {
    /// Puts prefix keys and values (kv_heads, n, head_dim) for `b` batch rows at the front of
    /// an empty cache.
    fn prefill(&mut self, b: usize, k: &Tensor, v: &Tensor, host: bool) -> Result<()> {
        let (nkv, n, hd) = k.dims3()?;
        let k = k.unsqueeze(0)?.broadcast_as((b, nkv, n, hd))?;
        let v = v.unsqueeze(0)?.broadcast_as((b, nkv, n, hd))?;
        if host {
            let h = Heads { b, s: n, n_heads: nkv, n_kv: nkv, head_dim: hd };
            // The host cache takes the projections' layout, (b, s, kv_heads·head_dim).
            let flat = |t: Tensor| -> Result<Vec<f32>> { Ok(t.transpose(1, 2)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
            self.host.append_rotated(&h, &flat(k)?, &flat(v)?);
        } else {
            self.k = Some(k.contiguous()?);
            self.v = Some(v.contiguous()?);
        }
        Ok(())
    }
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Last-position helper: softmax-free greedy pick from (vocab,) logits.
pub fn argmax_last(logits: &Tensor) -> Result<u32> {
    Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?)
}

impl Llama {
    /// Every weight under its HF name, dense, in checkpoint order: the embedding, each layer's
    /// norms, projections and biases, the final norm, and `lm_head.weight` only when the LM
    /// head is not the embedding matrix itself (an untied model, or a merge that changed the
    /// head). What an export writes.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.dense()?)];
        let push_linear = |out: &mut Vec<(String, Tensor)>, lin: &Linear| -> Result<()> {
            out.push((format!("{}.weight", lin.name()), lin.weight().dense()?));
            if let Some(b) = lin.bias() {
                out.push((format!("{}.bias", lin.name()), b.clone()));
            }
            Ok(())
        };
        for (i, l) in self.layers.iter().enumerate() {
            out.push((NormSite::Input(i).hf_name(), l.input_layernorm.clone()));
            let (a, m) = (&l.self_attn, &l.mlp);
            for lin in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj] {
                push_linear(&mut out, lin)?;
            }
            out.push((NormSite::PostAttention(i).hf_name(), l.post_attention_layernorm.clone()));
        }
        out.push((NormSite::Final.hf_name(), self.norm.clone()));
        if !self.lm_head_is_embedding() || self.lm_head.bias().is_some() {
            push_linear(&mut out, &self.lm_head)?;
        }
        Ok(out)
    }

    /// Whether the LM head's weight is the embedding matrix itself (a tied head not changed
    /// since), not merely equal to it.
    fn lm_head_is_embedding(&self) -> bool {
        match (self.lm_head.weight(), &self.embed_tokens) {
            (FrozenWeight::Dense(a), FrozenWeight::Dense(b)) => a.id() == b.id(),
            (FrozenWeight::Quantized { q: a, .. }, FrozenWeight::Quantized { q: b, .. }) => std::sync::Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}
