//! Exporting a fine-tuned model: the adapter folder as it is, or the base model with the
//! adapter merged into its weights, as a HF transformers folder or a llama.cpp GGUF file (with
//! an Ollama `Modelfile` next to it).
//!
//! * [`export_adapter`]: the PEFT adapter folder, copied (loads in HF PEFT, vLLM, and
//!   llama.cpp's `convert_lora_to_gguf.py`).
//! * [`export_hf`]: `model.safetensors` (tied embeddings stored once, as transformers saves
//!   them), `config.json` (`LlamaForCausalLM`), `generation_config.json` and the tokenizer files
//!   (`tokenizer.json`, `tokenizer_config.json` with the chat template, `special_tokens_map.json`).
//!   The folder loads with `AutoModelForCausalLM.from_pretrained` and with [`crate::model::load`].
//! * [`export_gguf`]: the merged model as GGUF, written the way llama.cpp's
//!   `convert_hf_to_gguf.py` + `llama-quantize` write it: llama architecture keys, tensors under
//!   llama.cpp names, q/k projection rows permuted back to llama.cpp's interleaved-RoPE layout
//!   ([`permute_rows`], the inverse of [`crate::model::gguf::unpermute_rows`]), norms and biases
//!   in F32, and the tokenizer metadata (copied verbatim from a GGUF source; built from
//!   `tokenizer.json` for a HF-folder source). Quantization types: see [`GgufType`].
//! * [`ollama_modelfile`] / [`write_modelfile`]: an Ollama `Modelfile` (`FROM`, a Go
//!   `TEMPLATE` derived from the Jinja chat template, `PARAMETER stop`, sampling defaults).
//!
//! Every export refuses to overwrite an existing file or non-empty folder, writes into a
//! hidden temporary sibling (`.<name>.partial-<pid>`) that is renamed into place only when
//! complete, and removes it on any error: a failed export leaves nothing behind.
//!
//! The merge happens in f32 on the CPU ([`load_merged`]); the lower-level [`write_hf`] and
//! [`write_gguf`] take an already loaded (and merged) model, e.g. to write several formats
//! from one load.

mod gguf;
mod gguf_stream;
mod hf;
mod modelfile;
mod staging;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::model::{self, LoadedModel};
use crate::peft::Adapter;
use crate::{Error, Result};

pub use gguf::{permute_rows, write_gguf, GgufType};
pub use hf::write_hf;
pub use modelfile::{derive_go_template, ollama_modelfile, write_modelfile, GoTemplate};

/// The dtype of the weights in an exported HF folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HfDtype {
    /// 32-bit floats (exact: the merged weights as computed).
    F32,
    /// bfloat16 (what most HF checkpoints ship; half the size).
    Bf16,
    /// IEEE half precision.
    F16,
}

impl HfDtype {
    /// The candle dtype.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            HfDtype::F32 => candle_core::DType::F32,
            HfDtype::Bf16 => candle_core::DType::BF16,
            HfDtype::F16 => candle_core::DType::F16,
        }
    }

    /// The name transformers uses in `config.json`'s `torch_dtype` (`float32`, `bfloat16`,
    /// `float16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            HfDtype::F32 => "float32",
            HfDtype::Bf16 => "bfloat16",
            HfDtype::F16 => "float16",
        }
    }
}

impl fmt::Display for HfDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HfDtype::F32 => "f32",
            HfDtype::Bf16 => "bf16",
            HfDtype::F16 => "f16",
        })
    }
}

impl FromStr for HfDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(HfDtype::F32),
            "bf16" | "bfloat16" => Ok(HfDtype::Bf16),
            "f16" | "float16" => Ok(HfDtype::F16),
            _ => Err(Error::config("dtype", format!("`{s}` is not an export dtype (f32, bf16 or f16)"))),
        }
    }
}

/// What an export wrote.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExportReport {
    /// The file or folder written.
    pub path: PathBuf,
    /// Every file written, with the Modelfile of a GGUF export.
    pub files: Vec<PathBuf>,
    /// Total size in bytes.
    pub bytes: u64,
    /// Number of weight tensors written.
    pub tensors: usize,
    /// Tensors per storage type (`F32`, `BF16`, `Q8_0`, `Q4_K`, …).
    pub tensor_types: BTreeMap<String, usize>,
    /// Wall-clock seconds, loading and merging included.
    pub seconds: f64,
}

/// Loads `model_path` (a `.gguf` file or HF folder) with dense f32 weights on the CPU and, when
/// `adapter` is given, folds that PEFT adapter folder into the weights ([`Adapter::merge_into`]:
/// LoRA, DoRA, IA3, BitFit). The result computes what base + adapter computes, with no adapter
/// installed.
pub fn load_merged(model_path: &Path, adapter: Option<&Path>) -> Result<LoadedModel> {
    let mut m = model::load(model_path, &Device::Cpu)?;
    if let Some(dir) = adapter {
        let a = Adapter::load(&mut m.model, dir)?;
        a.merge_into(&mut m.model)?;
    }
    Ok(m)
}

/// Copies a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors` and any
/// other files in it, e.g. a README) to `out_dir`, which must not exist (or be an empty
/// folder). The config must parse and the weights file must be a readable safetensors file.
pub fn export_adapter(adapter_dir: &Path, out_dir: &Path) -> Result<ExportReport> {
    let start = Instant::now();
    let cfg = adapter_dir.join("adapter_config.json");
    let weights = adapter_dir.join("adapter_model.safetensors");
    if !cfg.is_file() {
        return Err(Error::bad_input(adapter_dir, None, "not an adapter folder: it has no adapter_config.json"));
    }
    if !weights.is_file() {
        return Err(Error::bad_input(adapter_dir, None, "not an adapter folder: it has no adapter_model.safetensors"));
    }
    let text = std::fs::read_to_string(&cfg).map_err(|e| Error::io(&cfg, e))?;
    serde_json::from_str::<serde_json::Value>(&text).map_err(|e| Error::bad_input(&cfg, Some(e.line()), e.to_string()))?;
    let bytes = std::fs::read(&weights).map_err(|e| Error::io(&weights, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::bad_input(&weights, None, format!("not a readable safetensors file: {e}")))?;
    let n_tensors = st.len();
    let mut types = BTreeMap::new();
    for (_, t) in st.tensors() {
        *types.entry(format!("{:?}", t.dtype())).or_insert(0) += 1;
    }
    drop(bytes);

    let stage = staging::Staged::dir(out_dir)?;
    let mut files = Vec::new();
    let entries = std::fs::read_dir(adapter_dir).map_err(|e| Error::io(adapter_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(adapter_dir, e))?;
        let src = entry.path();
        let name = entry.file_name();
        if src.is_dir() || name.to_string_lossy().starts_with('.') {
            // Nested folders (e.g. checkpoints) and hidden temporaries are not part of an adapter.
            continue;
        }
        let dst = stage.tmp_path().join(&name);
        std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        staging::sync_file(&dst)?;
        files.push(out_dir.join(&name));
    }
    files.sort();
    let bytes = stage.commit()?;
    Ok(ExportReport {
        path: out_dir.to_path_buf(),
        files,
        bytes,
        tensors: n_tensors,
        tensor_types: types,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Merges `adapter` (when given) into the model at `model_path` and writes the result as a HF
/// transformers folder `out_dir` (see the module docs for its files) with weights in `dtype`.
/// `progress(done, total)` is called after each tensor. `out_dir` must not exist (or be an
/// empty folder); nothing is left behind on error.
pub fn export_hf(
    model_path: &Path,
    adapter: Option<&Path>,
    out_dir: &Path,
    dtype: HfDtype,
    progress: impl FnMut(usize, usize),
) -> Result<ExportReport> {
    let start = Instant::now();
    // Fail before the (slow) load when the destination is taken or not writable.
    let probe = staging::Staged::dir(out_dir)?;
    drop(probe);
    let m = load_merged(model_path, adapter)?;
    let mut report = write_hf(&m, out_dir, dtype, progress)?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Merges `adapter` (when given) into the model at `model_path` and writes the result as a
/// GGUF file `out_file` with matrices in `qtype`. With `modelfile`, an Ollama `Modelfile`
/// (sampling defaults from those options) is written next to it, in the same all-or-nothing
/// way. `progress(done, total)` is called after each tensor. Neither file may exist yet.
pub fn export_gguf(
    model_path: &Path,
    adapter: Option<&Path>,
    out_file: &Path,
    qtype: GgufType,
    modelfile: Option<&crate::infer::SampleOptions>,
    progress: impl FnMut(usize, usize),
) -> Result<ExportReport> {
    let start = Instant::now();
    let probe = staging::Staged::file(out_file)?;
    let probe_mf = modelfile.map(|_| staging::Staged::file(&modelfile::modelfile_path(out_file))).transpose()?;
    drop((probe, probe_mf));
    let m = load_merged(model_path, adapter)?;
    let mut report = write_gguf(&m, out_file, qtype, modelfile, progress)?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Refuses a model that still has adapters installed: an export writes the base weights, so
/// an unmerged adapter would be silently dropped.
fn ensure_merged(m: &LoadedModel) -> Result<()> {
    if let Some(lin) = m.model.linears().into_iter().find(|l| l.adapter().is_some()) {
        return Err(Error::Msg(format!(
            "{} still has an adapter installed: merge it first (Adapter::merge_into) or export with the adapter folder",
            lin.name()
        )));
    }
    Ok(())
}

/// The shortest decimal that reads back as the same f32 (GGUF stores `rms_norm_eps` and
/// `rope_theta` as f32: 9.999999747378752e-06 is written as 1e-05).
fn f32_clean(x: f64) -> f64 {
    let f = x as f32;
    if f as f64 == x {
        f.to_string().parse().unwrap_or(x)
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_parse_and_print() {
        for d in [HfDtype::F32, HfDtype::Bf16, HfDtype::F16] {
            assert_eq!(d.to_string().parse::<HfDtype>().unwrap(), d);
        }
        assert!("q4".parse::<HfDtype>().unwrap_err().to_string().contains("f32, bf16 or f16"));
        assert_eq!(f32_clean(9.999999747378752e-06), 1e-5);
        assert_eq!(f32_clean(100000.0), 100000.0);
    }
}
