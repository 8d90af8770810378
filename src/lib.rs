//! Tunebench engine: model loading, PEFT methods, data, training and inference for
//! fine-tuning Llama-family language models on a workstation.
//!
//! The engine has no GUI dependencies; the CLI (`src/bin/`) and later the desktop shell and
//! HTTP server are thin layers over it. See ARCHITECTURE.md for the map.
#![deny(missing_docs)]

pub mod api;
pub mod chart;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod export;
pub mod hub;
pub mod infer;
pub mod model;
pub mod paths;
pub mod schema;
pub mod serve;
pub mod peft;
pub mod store;
pub mod train;

pub use error::{Error, Result};

/// Process-wide CPU settings, called once at start-up by the binaries before any tensor work.
///
/// candle 0.11 runs element-wise ops on its own spinning "barrier pool" next to the rayon
/// pool its matmuls use. On small machines the spinning workers steal the cores the matmuls
/// need (measured on 2 cores: LoRA training 87 → 124 tok/s with the pool off), so unless the
/// user set `CANDLE_NUM_THREADS` we turn the pool off on ≤ 4 cores and shorten its spinning
/// elsewhere. Must run before the first tensor op (the pool is created lazily, once).
pub fn init_cpu_runtime() {
    init_cpu_runtime_for(Workload::Training)
}

/// What a process will mostly do, for [`init_cpu_runtime_for`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Training (and everything else): element-wise ops dominate after the matmuls.
    Training,
    /// Generation from quantized weights: candle's own quantized matmuls (block types other
    /// than the Q4_1/Q8_0 of `model::qmatmul`) run on the barrier pool, so it keeps every core
    /// (measured with candle's Q8_0 LM head on 2 cores: 38 vs 30 tok/s with the pool off).
    Inference,
}

/// [`init_cpu_runtime`] for a given workload.
pub fn init_cpu_runtime_for(workload: Workload) {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() && cores <= 4 && workload == Workload::Training {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // candle asks `get_num_threads()` on every f32 matmul; unless RAYON_NUM_THREADS is set, that
    // reads /proc/cpuinfo (num_cpus::get_physical) each time: ~60 reads per decoded token of
    // the default model, ~4% of decode time. Same value, read once.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200");
    }
    keep_freed_memory();
}

/// Every tensor op allocates its output; with glibc's defaults, buffers of a few MB are
/// mmapped and unmapped each time, and every reuse pays page faults and zeroing (~10% of a
/// training step on 2 cores). Serving them from the heap, and not returning freed heap to
/// the OS, made LoRA training ~18% faster at the same peak RSS (bench/RESULTS.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    // SAFETY: mallopt only changes allocator tuning parameters; it is called at start-up.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
