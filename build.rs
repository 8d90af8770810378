//! Under the `cuda` feature, compiles our fused training kernels (kernels/fused.cu) to PTX with
//! nvcc, for src/model/fused.rs to load at run time. The PTX targets CUDA_COMPUTE_CAP (as
//! candle's kernels do; default 80, which every GPU since the A100 JIT-compiles). Without the
//! feature it does nothing. The flash-attention kernels need compute capability 8.0 (bf16 on the
//! tensor cores): with a lower CUDA_COMPUTE_CAP they are left out, and `cfg(tb_flash)` (set here
//! otherwise) tells src/model/fused.rs not to look for them.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/fused.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo::rustc-check-cfg=cfg(tb_flash)");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("fused.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    if cap.trim().parse::<u32>().map_or(true, |c| c >= 80) {
        println!("cargo::rustc-cfg=tb_flash");
    }
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "kernels/fused.cu", "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("kernels/fused.cu: {nvcc} failed ({s}); see its messages above"),
        Err(e) => panic!("kernels/fused.cu: cannot run {nvcc} ({e}); the cuda feature needs the CUDA compiler (scripts/build-cuda installs one)"),
    }
}
