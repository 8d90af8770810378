//! A GGUF (version 3) writer that streams: the header (metadata and every tensor's name, shape,
//! type and offset, all known before any weight is converted) is written first, then each
//! tensor is converted and written in turn, so only one converted tensor is in memory at a
//! time (candle's `gguf_file::write` wants them all at once). Layout as llama.cpp's
//! `gguf_write_to_file`: 32-byte alignment of the data section and of every tensor.

use std::io::Write;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;

use crate::{Error, Result};

const ALIGNMENT: u64 = 32;

fn io(e: std::io::Error) -> Error {
    Error::Msg(format!("cannot write: {e}"))
}

/// One tensor to write: its GGUF name, shape (HF order: rows first) and storage type.
#[derive(Clone, Debug)]
pub struct TensorPlan {
    /// GGUF tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Shape, outermost first (written innermost first, as GGUF wants).
    pub dims: Vec<usize>,
    /// Storage type.
    pub ty: GgmlDType,
}

impl TensorPlan {
    /// Bytes of the converted tensor.
    pub fn bytes(&self) -> Result<u64> {
        let n: usize = self.dims.iter().product();
        let bs = self.ty.block_size();
        if n % bs != 0 {
            return Err(Error::Msg(format!("{}: {n} values are not whole {:?} blocks of {bs}", self.name, self.ty)));
        }
        Ok((n / bs * self.ty.type_size()) as u64)
    }
}

/// ggml's type id of `ty`.
fn type_id(ty: GgmlDType) -> u32 {
    match ty {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// Counts what goes through it, so the writer knows where the data section starts.
struct Counting<W> {
    inner: W,
    pos: u64,
}

impl<W: Write> Counting<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.inner.write_all(bytes).map_err(io)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }
    fn string(&mut self, s: &str) -> Result<()> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s.as_bytes())
    }
    fn pad(&mut self) -> Result<()> {
        let pad = (ALIGNMENT - self.pos % ALIGNMENT) % ALIGNMENT;
        self.put(&vec![0u8; pad as usize])
    }
    fn value(&mut self, v: &Value) -> Result<()> {
        match v {
            Value::U8(x) => self.put(&x.to_le_bytes()),
            Value::I8(x) => self.put(&x.to_le_bytes()),
            Value::U16(x) => self.put(&x.to_le_bytes()),
            Value::I16(x) => self.put(&x.to_le_bytes()),
            Value::U32(x) => self.put(&x.to_le_bytes()),
            Value::I32(x) => self.put(&x.to_le_bytes()),
            Value::U64(x) => self.put(&x.to_le_bytes()),
            Value::I64(x) => self.put(&x.to_le_bytes()),
            Value::F32(x) => self.put(&x.to_le_bytes()),
            Value::F64(x) => self.put(&x.to_le_bytes()),
            Value::Bool(x) => self.put(&[u8::from(*x)]),
            Value::String(s) => self.string(s),
            Value::Array(items) => {
                let ty = items.first().map(value_type).unwrap_or(4);
                if items.iter().any(|i| value_type(i) != ty) {
                    return Err(Error::Msg("GGUF arrays hold values of one type".into()));
                }
                self.put(&ty.to_le_bytes())?;
                self.put(&(items.len() as u64).to_le_bytes())?;
                items.iter().try_for_each(|i| self.value(i))
            }
        }
    }
}

/// Writes a GGUF file to `w`: `meta` in order, then the tensors of `plan`, whose bytes
/// `data(i)` produces one at a time (checked against the planned size).
pub fn write(w: impl Write, meta: &[(String, Value)], plan: &[TensorPlan], mut data: impl FnMut(usize) -> Result<Vec<u8>>) -> Result<()> {
    let mut w = Counting { inner: w, pos: 0 };
    w.put(b"GGUF")?;
    w.put(&3u32.to_le_bytes())?;
    w.put(&(plan.len() as u64).to_le_bytes())?;
    w.put(&(meta.len() as u64).to_le_bytes())?;
    for (k, v) in meta {
        w.string(k)?;
        w.put(&value_type(v).to_le_bytes())?;
        w.value(v)?;
    }
    let mut offset = 0u64;
    for t in plan {
        w.string(&t.name)?;
        w.put(&(t.dims.len() as u32).to_le_bytes())?;
        for d in t.dims.iter().rev() {
            w.put(&(*d as u64).to_le_bytes())?;
        }
        w.put(&type_id(t.ty).to_le_bytes())?;
        w.put(&offset.to_le_bytes())?;
        offset += t.bytes()?.div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    w.pad()?;
    for (i, t) in plan.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() as u64 != t.bytes()? {
            return Err(Error::Msg(format!("{}: {} bytes, {} planned", t.name, bytes.len(), t.bytes()?)));
        }
        w.put(&bytes)?;
        w.pad()?;
    }
    w.inner.flush().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, QTensor};
    use candle_core::{Device, Tensor};

    #[test]
    fn same_bytes_as_candles_writer_apart_from_the_version() {
        let meta = vec![
            ("general.architecture".to_string(), Value::String("llama".into())),
            ("llama.block_count".to_string(), Value::U32(2)),
            ("general.flag".to_string(), Value::Bool(true)),
            ("tokenizer.ggml.scores".to_string(), Value::Array(vec![Value::F32(0.5), Value::F32(-1.0)])),
            ("tokenizer.ggml.tokens".to_string(), Value::Array(vec![Value::String("a".into()), Value::String("bc".into())])),
        ];
        let mk = |n: usize, k: usize, ty| {
            let x: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.0).collect();
            QTensor::quantize(&Tensor::from_vec(x, (n, k), &Device::Cpu).unwrap(), ty).unwrap()
        };
        let tensors = vec![
            ("a.weight".to_string(), mk(3, 64, GgmlDType::Q8_0)),
            ("b.weight".to_string(), mk(2, 256, GgmlDType::Q4K)),
            ("c.weight".to_string(), mk(1, 5, GgmlDType::F32)),
            ("d.weight".to_string(), mk(4, 32, GgmlDType::F16)),
        ];
        let mut theirs = std::io::Cursor::new(Vec::new());
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut theirs, &meta_refs, &t_refs).unwrap();
        let plan: Vec<TensorPlan> =
            tensors.iter().map(|(k, t)| TensorPlan { name: k.clone(), dims: t.shape().dims().to_vec(), ty: t.dtype() }).collect();
        let mut ours = Vec::new();
        write(&mut ours, &meta, &plan, |i| Ok(tensors[i].1.data().unwrap().to_vec())).unwrap();
        let theirs = theirs.into_inner();
        assert_eq!(&ours[4..8], &3u32.to_le_bytes());
        assert_eq!(&theirs[4..8], &2u32.to_le_bytes());
        assert_eq!(ours.len(), theirs.len());
        assert!(ours[..4] == theirs[..4] && ours[8..] == theirs[8..], "only the version differs");
        // And it reads back.
        let c = gguf_file::Content::read(&mut std::io::Cursor::new(&ours)).unwrap();
        assert_eq!(c.tensor_infos.len(), 4);
        assert_eq!(c.metadata["llama.block_count"].to_u32().unwrap(), 2);

        // A tensor of the wrong size is refused.
        let err = write(Vec::new(), &meta, &plan, |_| Ok(vec![0u8; 3])).unwrap_err().to_string();
        assert!(err.contains("planned"), "{err}");
    }
}
