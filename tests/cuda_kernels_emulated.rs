//! Our CUDA kernels (kernels/fused.cu) run on the CPU under host emulation
//! (kernels/host_emulation.hpp: a thread per CUDA thread, barriers for `__syncthreads` and warp
//! shuffles, `nvcuda::wmma` tiles for the flash-attention kernels), every kernel in f32, f16
//! and bf16 (flash attention in f16 and bf16) against a double-precision reference
//! (kernels/emulated_test.cpp). This checks what a GPU-less machine can of the kernels
//! themselves — their indexing, grid strides, causal masks and block reductions — beside the
//! CPU twins that `tests/gradients.rs` holds to the composed ops; `tunebench check-ops` checks
//! them on a GPU. The dequantization kernels (QLoRA's base held as blocks) are held to candle's
//! CPU dequantizer on blocks candle quantized. Needs a C++20 compiler (`c++`, or $CXX).

use std::path::Path;
use std::process::Command;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// Writes `<name>.blocks` (candle's quantized blocks of a random weight) and `<name>.f32`
/// (candle's CPU dequantization of them) for every block format the kernels read.
fn write_quantized_weights(dir: &Path) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    // 3 rows of 512: 48 blocks of 32, 6 super-blocks of 256; a spread of magnitudes per row.
    let v: Vec<f32> = (0..1536).map(|i| (rng.random::<f32>() * 2.0 - 1.0) * [0.02f32, 1.0, 7.0][i / 512]).collect();
    let w = Tensor::from_vec(v, (3, 512), &Device::Cpu).unwrap();
    for (name, ty) in [("q4_0", GgmlDType::Q4_0), ("q4_1", GgmlDType::Q4_1), ("q8_0", GgmlDType::Q8_0), ("q4k", GgmlDType::Q4K)] {
        let q = QTensor::quantize(&w, ty).unwrap();
        std::fs::write(dir.join(format!("{name}.blocks")), q.data().unwrap()).unwrap();
        let values: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(values.len(), 1536);
        std::fs::write(dir.join(format!("{name}.f32")), values.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    }
}

/// Builds kernels/emulated_test.cpp with `flags` (beside the emulation's own) and runs it on
/// fresh quantized weights: its report (stdout), after asserting that it built and exited 0.
fn build_and_run(name: &str, flags: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("tunebench-kernels-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("emulated_test");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-Wall", "-Werror", "-DTB_HOST_EMULATION"])
        .args(flags)
        .arg(root.join("kernels/emulated_test.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{cxx}` ({e}); set CXX"));
    assert!(built.status.success(), "compiling kernels/emulated_test.cpp {flags:?} failed:\n{}", String::from_utf8_lossy(&built.stderr));
    write_quantized_weights(&dir);
    let run = Command::new(&exe).arg(&dir).output().unwrap();
    let out = String::from_utf8_lossy(&run.stdout).into_owned();
    println!("{out}");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(run.status.success(), "{out}\n{}", String::from_utf8_lossy(&run.stderr));
    out
}

/// Every kernel's checks passed: 11 each for f32, f16 and bf16, the head moves' four each,
/// AdamW's two (f32), its in-place twins' two and the every-variable launch, four block formats to f32, f16 and bf16, and flash attention's six
/// results (o, lse, dot, dq, dk, dv) for two shapes at head_dim 64 and 128 in f16 and bf16.
fn assert_all_passed(out: &str) {
    let passed = out.lines().filter(|l| l.ends_with(" ok")).count();
    assert_eq!(passed, 62 + 48, "{out}");
    assert!(out.contains("0 failed"), "{out}");
}

#[test]
fn cuda_kernels_match_the_reference_under_host_emulation() {
    let out = build_and_run("plain", &[]);
    assert_all_passed(&out);
    // The dropout kernel draws exactly the CPU's mask (model::fused::dropout_mask).
    let line = out.lines().find(|l| l.starts_with("dropout mask n=")).expect("the dropout mask's summary");
    let mask = tunebench::model::fused::dropout_mask(10_000, 0.3, 0x0123_4567_89ab_cdef);
    let kept = mask.iter().filter(|&&m| m > 0.0).count();
    let hash: u64 = mask.iter().enumerate().filter(|(_, &m)| m > 0.0).map(|(i, _)| ((i + 1) * (i + 1)) as u64).sum();
    assert!(line.ends_with(&format!("kept {kept} hash {hash}")), "{line}: the CPU keeps {kept}, hash {hash}");
    for kernel in ["swiglu_fwd", "swiglu_bwd", "rmsnorm_bwd", "causal_softmax", "ce_stats", "ce_grad", "attention_ds", "dropout", "dequant_q4_0", "dequant_q4_1", "dequant_q8_0", "dequant_q4k"] {
        let dtypes = out.lines().filter(|l| l.starts_with(kernel) && l.ends_with(" ok")).filter_map(|l| l.split_whitespace().nth(1)).collect::<std::collections::BTreeSet<_>>();
        assert_eq!(dtypes.len(), 3, "{kernel} in f32, f16 and bf16: {out}");
    }
}

/// The same run under AddressSanitizer and UBSan. The NaN tails after every output catch a
/// kernel writing past its end; this catches reads past an input (a key tile's rows beyond the
/// keys, say, whose scores a mask would then hide: harmless in the numbers, a fault on a GPU
/// when the row lies past the allocation) and shared-memory overruns. The emulation also
/// stops on the GPU's alignment rules (16-byte vector accesses, 32-byte `wmma` tiles).
#[test]
fn cuda_kernels_stay_in_bounds_under_address_sanitizer() {
    let out = build_and_run("asan", &["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]);
    assert_all_passed(&out);
}
