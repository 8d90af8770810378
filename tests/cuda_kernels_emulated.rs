//! Our CUDA kernels (kernels/fused.cu) run on the CPU under host emulation
//! (kernels/host_emulation.hpp: a thread per CUDA thread, barriers for `__syncthreads` and warp
//! shuffles), every kernel in f32, f16 and bf16 against a double-precision reference
//! (kernels/emulated_test.cpp). This checks what a GPU-less machine can of the kernels
//! themselves — their indexing, grid strides, causal masks and block reductions — beside the
//! CPU twins that `tests/gradients.rs` holds to the composed ops; `tunebench check-ops` checks
//! them on a GPU. Needs a C++20 compiler (`c++`, or $CXX).

use std::path::Path;
use std::process::Command;

#[test]
fn cuda_kernels_match_the_reference_under_host_emulation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("tunebench-kernels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("emulated_test");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-Wall", "-Werror", "-DTB_HOST_EMULATION"])
        .arg(root.join("kernels/emulated_test.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{cxx}` ({e}); set CXX"));
    assert!(built.status.success(), "compiling kernels/emulated_test.cpp failed:\n{}", String::from_utf8_lossy(&built.stderr));
    let run = Command::new(&exe).output().unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    println!("{out}");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(run.status.success(), "{out}\n{}", String::from_utf8_lossy(&run.stderr));
    // Every kernel ran in every dtype: 11 checks each for f32, f16 and bf16, and AdamW's two
    // (f32).
    let passed = out.lines().filter(|l| l.ends_with(" ok")).count();
    assert_eq!(passed, 35, "{out}");
    // The dropout kernel draws exactly the CPU's mask (model::fused::dropout_mask).
    let line = out.lines().find(|l| l.starts_with("dropout mask n=")).expect("the dropout mask's summary");
    let mask = tunebench::model::fused::dropout_mask(10_000, 0.3, 0x0123_4567_89ab_cdef);
    let kept = mask.iter().filter(|&&m| m > 0.0).count();
    let hash: u64 = mask.iter().enumerate().filter(|(_, &m)| m > 0.0).map(|(i, _)| ((i + 1) * (i + 1)) as u64).sum();
    assert!(line.ends_with(&format!("kept {kept} hash {hash}")), "{line}: the CPU keeps {kept}, hash {hash}");
    for kernel in ["swiglu_fwd", "swiglu_bwd", "rmsnorm_bwd", "causal_softmax", "ce_stats", "ce_grad", "attention_ds", "dropout"] {
        let dtypes = out.lines().filter(|l| l.starts_with(kernel) && l.ends_with(" ok")).filter_map(|l| l.split_whitespace().nth(1)).collect::<std::collections::BTreeSet<_>>();
        assert_eq!(dtypes.len(), 3, "{kernel} in f32, f16 and bf16: {out}");
    }
    assert!(out.contains("0 failed"), "{out}");
}
