//! Where tensors live: `cpu`, `cuda`, `cuda:N` or `auto`, as written in a run config
//! (`train.device`), a CLI flag (`--device`) or an API request.
//!
//! A CUDA device exists only in a build with the `cuda` cargo feature (`scripts/build-cuda`);
//! asking for one elsewhere is an error that says how to get such a build. `auto` takes the
//! first CUDA device when the build has CUDA and a GPU answers, and the CPU otherwise.

use candle_core::Device;

use crate::{Error, Result};

/// A parsed device choice (what the user wrote, before any device is opened).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first CUDA device if this build and machine have one, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N (`cuda` = `cuda:0`).
    Cuda(usize),
}

/// Whether this binary was built with CUDA support.
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

impl DeviceChoice {
    /// Parses `auto`, `cpu`, `cuda` or `cuda:N` (case-insensitive); `key` names the setting in
    /// the error.
    pub fn parse(spec: &str, key: &str) -> Result<Self> {
        let s = spec.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" | "" => return Ok(DeviceChoice::Auto),
            "cpu" => return Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => return Ok(DeviceChoice::Cuda(0)),
            _ => {}
        }
        if let Some(n) = s.strip_prefix("cuda:") {
            if let Ok(n) = n.parse::<usize>() {
                return Ok(DeviceChoice::Cuda(n));
            }
        }
        Err(Error::config(key, format!("`{spec}` is not a device; use auto, cpu, cuda or cuda:N (N = 0, 1, …)")))
    }

    /// Opens the device. `auto` never fails (it falls back to the CPU); a CUDA device fails
    /// with advice when this build has no CUDA support or the GPU does not answer (`key`, the
    /// setting it came from, is named as the one to change).
    pub fn open(self, key: &str) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto => Ok(open_cuda(0, key).unwrap_or(Device::Cpu)),
            DeviceChoice::Cuda(n) => open_cuda(n, key),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Parses and opens a device spec in one go (see [`DeviceChoice::parse`]).
pub fn open(spec: &str, key: &str) -> Result<Device> {
    DeviceChoice::parse(spec, key)?.open(key)
}

/// The device choices a form offers in this build: auto, cpu, and cuda:0 when built with CUDA.
pub fn choices() -> Vec<String> {
    let mut v = vec!["auto".to_string(), "cpu".to_string()];
    if CUDA_BUILD {
        v.push("cuda:0".into());
    }
    v
}

/// The device a run occupies in the run queue (one training run per device at a time):
/// `cpu` or `cuda:N`, with `auto` resolved as [`DeviceChoice::open`] would.
pub fn queue_key(spec: &str, key: &str) -> Result<String> {
    Ok(match DeviceChoice::parse(spec, key)? {
        DeviceChoice::Cpu => "cpu".into(),
        DeviceChoice::Cuda(n) => format!("cuda:{n}"),
        DeviceChoice::Auto => describe(&DeviceChoice::Auto.open(key)?),
    })
}

/// A short name for messages and reports (`cpu`, `cuda:0`).
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize, key: &str) -> Result<Device> {
    let device = Device::new_cuda(n).map_err(|e| {
        Error::Msg(format!(
            "cannot open CUDA device {n}: {e}. Check that the NVIDIA driver is loaded (nvidia-smi lists the GPU) and that cuda:{n} exists, or set {key} to cpu"
        ))
    })?;
    if std::env::var("TUNEBENCH_CUDA_TRIM_POOL").is_ok_and(|v| v == "1") {
        return Ok(device);
    }
    if let Err(e) = pool::keep_freed_memory(n) {
        tracing::warn!("cuda:{n}: the memory pool keeps its default (freed memory returned at each synchronization): {e}");
    }
    Ok(device)
}

/// The CUDA device's default memory pool, which every tensor allocation comes from: candle
/// allocates through cudarc, which uses the driver's stream-ordered allocator
/// (`cuMemAllocAsync` / `cuMemFreeAsync`) wherever the device supports memory pools.
#[cfg(feature = "cuda")]
mod pool {
    use candle_core::cuda_backend::cudarc::driver::{result, sys, DriverError};

    fn attribute(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute, value: Option<u64>) -> Result<u64, DriverError> {
        let mut v: u64 = value.unwrap_or(0);
        let p = (&mut v as *mut u64).cast::<core::ffi::c_void>();
        // SAFETY: `pool` comes from cuDeviceGetDefaultMemPool; the attributes used here (the
        // release threshold, the used high-water mark) are cuuint64_t, which `v` is.
        unsafe {
            match value {
                Some(_) => result::mem_pool::set_attribute(pool, attr, p)?,
                None => result::mem_pool::get_attribute(pool, attr, p)?,
            }
        }
        Ok(v)
    }

    /// Device `n`'s default pool, or None where the device has no memory pools (allocations
    /// then go through plain `cuMemAlloc`, which has no pool to tune or read).
    fn default_pool(n: usize) -> Result<Option<sys::CUmemoryPool>, DriverError> {
        let dev = result::device::get(n as i32)?;
        // SAFETY: `dev` was returned by cuDeviceGet for this ordinal.
        let pools = unsafe { result::device::get_attribute(dev, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)? };
        if pools <= 0 {
            return Ok(None);
        }
        // SAFETY: as above.
        Ok(Some(unsafe { result::device::get_default_mem_pool(dev)? }))
    }

    /// Keeps freed memory in the pool for the next allocation instead of returning it to the
    /// driver. The pool's default release threshold is 0: at every synchronization (each step
    /// reads its loss and gradient norm) it unmaps all free memory, so the next step maps its
    /// activations' gigabytes again, page by page (tens of ms per GiB). A trainer owns its
    /// GPU for the run, so it keeps what it has used (PyTorch's caching allocator does the
    /// same); the peak in use is unchanged, and what the pool maps stays near it.
    /// `TUNEBENCH_CUDA_TRIM_POOL=1` keeps the driver's default.
    pub(super) fn keep_freed_memory(n: usize) -> Result<(), DriverError> {
        if let Some(pool) = default_pool(n)? {
            attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, Some(u64::MAX))?;
        }
        Ok(())
    }

    /// The pool's high-water mark of bytes in use since the device was opened.
    pub(super) fn peak_used(n: usize) -> Result<Option<u64>, DriverError> {
        let Some(pool) = default_pool(n)? else { return Ok(None) };
        Ok(Some(attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None)?))
    }
}

/// The most device memory this process's tensors have held at once on `device` (the CUDA
/// memory pool's high-water mark of bytes in use, as PyTorch's `max_memory_allocated`), or
/// None on the CPU, without pools, or in a build without CUDA. cuBLAS's workspace and the
/// loaded kernels are outside the pool (NVML's device-wide figure includes them).
pub fn pool_peak_bytes(device: &Device) -> Option<u64> {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => cuda_pool_peak(gpu_id),
        _ => None,
    }
}

/// [`pool_peak_bytes`] for the device a run's `train.device` names (`auto`: cuda:0 in a CUDA
/// build), read in the process that trained on it; None where that is not a CUDA device.
pub fn pool_peak_bytes_for(spec: &str) -> Option<u64> {
    match DeviceChoice::parse(spec, "train.device").ok()? {
        DeviceChoice::Cuda(n) => cuda_pool_peak(n),
        DeviceChoice::Auto if CUDA_BUILD => cuda_pool_peak(0),
        _ => None,
    }
}

#[cfg(feature = "cuda")]
fn cuda_pool_peak(n: usize) -> Option<u64> {
    pool::peak_used(n).ok().flatten().filter(|&b| b > 0)
}

#[cfg(not(feature = "cuda"))]
fn cuda_pool_peak(_n: usize) -> Option<u64> {
    None
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize, key: &str) -> Result<Device> {
    Err(Error::Msg(format!(
        "cuda:{n} was asked for ({key}), but this tunebench was built without CUDA support. Build it with `bash scripts/build-cuda` (cargo build --release --features cuda), or set {key} to cpu"
    )))
}

/// Whether a failed operation ran out of device memory (CUDA's `CUDA_ERROR_OUT_OF_MEMORY`,
/// cuBLAS's allocation failure, or an allocator's "out of memory").
pub fn is_out_of_memory(err: &Error) -> bool {
    let text = err.to_string().to_ascii_lowercase();
    text.contains("out_of_memory") || text.contains("out of memory") || text.contains("cublas_status_alloc_failed")
}

/// Values one tensor may hold on a GPU: candle 0.11's CUDA kernels count a tensor's elements
/// in 32 bits, so one of 2^32 values launches an empty grid (CUDA_ERROR_INVALID_VALUE: a
/// (tokens, 2048) activation of 512×4096 tokens on the H200) and larger ones wrap around. Kept
/// a block of 1,024 below, which their grid arithmetic adds.
pub const GPU_TENSOR_VALUES_MAX: u64 = (1 << 32) - 1024;

/// On a GPU, an error naming the settings when a step's widest activation — `batch × seq`
/// token rows of the model's widest width (the MLP's intermediate size, or the hidden size) —
/// would hold more values than [`GPU_TENSOR_VALUES_MAX`]; `None` where it fits (and on the CPU).
pub fn activation_too_large(device: &Device, batch: usize, seq: usize, model: &crate::model::LlamaConfig) -> Option<String> {
    let width = model.intermediate_size.max(model.hidden_size);
    let values = values_past_gpu_limit(batch, seq, width).filter(|_| device.is_cuda())?;
    Some(format!(
        "{batch} × {seq} tokens × {width} values a token make tensors of {values} values, more than the {GPU_TENSOR_VALUES_MAX} one tensor may hold on {} (candle's kernels count in 32 bits); lower train.batch_size (and raise train.grad_accum) or data.max_len",
        describe(device)
    ))
}

/// `batch × seq × width` when it is more than [`GPU_TENSOR_VALUES_MAX`].
fn values_past_gpu_limit(batch: usize, seq: usize, width: usize) -> Option<u64> {
    let values = (batch as u64).saturating_mul(seq as u64).saturating_mul(width as u64);
    (values > GPU_TENSOR_VALUES_MAX).then_some(values)
}

/// `e` itself, or where it is running out of device memory, the error that says what to try
/// ([`out_of_memory_advice`]): the trainer's and bench-train's.
pub fn with_out_of_memory_advice(e: Error, device: &Device, batch_size: usize, max_len: usize, checkpointing: bool, qlora: bool) -> Error {
    match is_out_of_memory(&e) {
        true => Error::Training(out_of_memory_advice(device, batch_size, max_len, checkpointing, qlora)),
        false => e,
    }
}

/// What to try after running out of device memory, for a run with these settings.
pub fn out_of_memory_advice(device: &Device, batch_size: usize, max_len: usize, checkpointing: bool, qlora: bool) -> String {
    let mut tips = Vec::new();
    if batch_size > 1 {
        tips.push(format!(
            "halve train.batch_size (now {batch_size}) and double train.grad_accum to keep the same effective batch"
        ));
    }
    if !checkpointing {
        tips.push("set train.gradient_checkpointing = true (keeps one layer's activations instead of all, ~30% slower)".into());
    }
    if !qlora {
        tips.push("use method = \"qlora\" (the base model in 4-bit blocks)".into());
    }
    tips.push(format!("lower data.max_len (now {max_len})"));
    format!(
        "{} ran out of memory. Nothing from this step was saved; resume from the last checkpoint after one of: {}",
        describe(device),
        tips.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!(DeviceChoice::parse("auto", "k").unwrap(), DeviceChoice::Auto);
        assert_eq!(DeviceChoice::parse(" CPU ", "k").unwrap(), DeviceChoice::Cpu);
        assert_eq!(DeviceChoice::parse("cuda", "k").unwrap(), DeviceChoice::Cuda(0));
        assert_eq!(DeviceChoice::parse("cuda:3", "k").unwrap(), DeviceChoice::Cuda(3));
        for bad in ["cuda:", "cuda:x", "tpu", "cuda:-1"] {
            let e = DeviceChoice::parse(bad, "train.device").unwrap_err().to_string();
            assert!(e.contains("train.device") && e.contains(bad), "{e}");
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn a_gpu_tensor_past_32_bit_counts_is_refused_by_name() {
        // The H200's failure: 512×4096 tokens × 2048 = 2^32 values; the out-of-memory check's
        // 48×4096 × 8192 fits, as does the benchmark's 8×512.
        assert_eq!(values_past_gpu_limit(512, 4096, 2048), Some(1 << 32));
        assert_eq!(values_past_gpu_limit(48, 4096, 8192), None);
        assert_eq!(values_past_gpu_limit(8, 512, 8192), None);
        assert!(values_past_gpu_limit(usize::MAX, 2, 2).is_some(), "no overflow");
        // The CPU counts in 64 bits.
        let mut llama_1b = crate::model::LlamaConfig::tiny(128256);
        (llama_1b.hidden_size, llama_1b.intermediate_size) = (2048, 8192);
        assert_eq!(activation_too_large(&Device::Cpu, 512, 4096, &llama_1b), None);
    }

    #[test]
    fn cpu_and_auto_open_without_a_gpu() {
        assert!(DeviceChoice::Cpu.open("k").unwrap().is_cpu());
        // Only a CUDA device has a memory pool to report.
        assert_eq!(pool_peak_bytes(&Device::Cpu), None);
        assert_eq!(pool_peak_bytes_for("cpu"), None);
        let auto = DeviceChoice::Auto.open("k").unwrap();
        if !CUDA_BUILD {
            assert!(auto.is_cpu());
            let e = DeviceChoice::Cuda(1).open("--device").unwrap_err().to_string();
            assert!(e.contains("without CUDA support") && e.contains("scripts/build-cuda") && e.contains("set --device to cpu"), "{e}");
        }
    }

    #[test]
    fn queue_keys_name_one_device() {
        assert_eq!(queue_key("cuda:2", "k").unwrap(), "cuda:2");
        assert_eq!(queue_key("cuda", "k").unwrap(), "cuda:0");
        assert_eq!(queue_key("cpu", "k").unwrap(), "cpu");
        if !CUDA_BUILD {
            assert_eq!(queue_key("auto", "k").unwrap(), "cpu");
            assert_eq!(choices(), ["auto", "cpu"]);
        }
        assert!(queue_key("npu", "train.device").is_err());
    }

    #[test]
    fn recognises_out_of_memory_and_advises() {
        let oom = Error::Candle(candle_core::Error::Msg("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into()));
        assert!(is_out_of_memory(&oom));
        assert!(!is_out_of_memory(&Error::Msg("shape mismatch".into())));
        let a = out_of_memory_advice(&Device::Cpu, 8, 512, false, false);
        assert!(a.contains("batch_size (now 8)") && a.contains("gradient_checkpointing") && a.contains("qlora"), "{a}");
        let a = out_of_memory_advice(&Device::Cpu, 1, 512, true, true);
        assert!(!a.contains("batch_size") && !a.contains("gradient_checkpointing") && a.contains("max_len (now 512)"), "{a}");
    }
}
