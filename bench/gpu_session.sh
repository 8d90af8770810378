#!/usr/bin/env bash
# Issue 7's GPU checks as one prepared call, so a short device lease is spent measuring, not
# setting up. Two halves:
#
#   bash bench/gpu_session.sh --prepare        # here, on the build machine
#       builds the CUDA binary (scripts/build-cuda) and puts what the GPU machine needs into
#       .gpu/ (git-ignored): the compressed binary and the driver-finding env script
#       (../shared/cuda/device-env.sh). Carry `.gpu` to the GPU machine.
#
#   bash bench/gpu_session.sh                   # there (DEVICE=cuda:0 by default; DTYPES=bf16,f32
#                                               # adds the f32 comparison, SHAPES=... narrows)
#       1. unpacks the binary, finds the driver and CUDA libraries, prints the GPU;
#       2. every training op's value and gradients on the GPU against the f64 CPU reference
#          (tunebench check-ops: f32, bf16, f16); kernels that fail are turned off for the rest;
#       3. bench/gpu_bench.py on the issue's shapes (--write-results), both sides;
#       4. correctness: the same tiny random-init LoRA run on the GPU and on the CPU, f32, bf16 and
#          f16 (loss-scaled), with and without checkpointing — the GPU's losses must follow the CPU's;
#          inference: the same tiny model's logits on both, full-sequence and token by token
#          through the KV cache (tunebench logits --decode), dense and held as Q4_1/Q8_0 blocks
#          (the quantized kernels a GGUF chat runs);
#       5. QLoRA on the 1B shape against LoRA (tokens/s, memory); running out of device memory
#          (a batch far too big must end with advice, exit status 1, not a crash);
#       6. a profile of the 1B shape's training step (bench-train --profile: each op's forward
#          and backward, the optimizer) into $OUT/profile-llama-1b.txt;
#       7. our kernels against candle's ops, flash attention off, the memory pool trimmed;
#       writes everything (log, RESULTS section) to $OUT (or ./gpu-out).
#       A device lease is short, so the steps run in that order of importance within BUDGET_S
#       seconds (default 480): a step that would not fit in what is left is skipped and says
#       so, and each command has its own time limit. ONLY=bench,profile (say) runs the op checks
#       and those steps alone.
#
# DEVICE=cpu runs the same steps on the CPU with the tiny shape and writes no results (a smoke
# test of this script; needs torch + transformers + peft: PY=$(bash scripts/pyenv | tail -n1)).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  bash scripts/build-cuda
  target="${CARGO_TARGET_DIR:-$HOME/.cache/tunebench-cuda-target}"
  mkdir -p .gpu
  cp "$target/release/tunebench-cuda.xz" .gpu/
  cp "${TUNEBENCH_DEVICE_ENV:-../shared/cuda/device-env.sh}" .gpu/device-env.sh
  # The commit the binary was built from (with -dirty for uncommitted changes), for the results.
  git describe --always --dirty > .gpu/revision
  du -sh .gpu
  echo "prepared .gpu/ — on the GPU machine: carry [\".gpu\"] and run: bash bench/gpu_session.sh"
  exit 0
fi

DEVICE="${DEVICE:-cuda:0}"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_session.log") 2>&1
py="${PY:-python3}"

if [ "$DEVICE" = cpu ]; then
  bin="${TUNEBENCH_BIN:-target/debug/tunebench}"
  shapes="tiny,tiny+ckpt"; batch=2; seq=32; steps=2; write=()
else
  [ -f .gpu/tunebench-cuda.xz ] || { echo "error: .gpu/tunebench-cuda.xz missing: run --prepare here and carry .gpu" >&2; exit 2; }
  xz -dc .gpu/tunebench-cuda.xz > /tmp/tunebench && chmod +x /tmp/tunebench
  bin=/tmp/tunebench
  # shellcheck disable=SC1091
  source .gpu/device-env.sh
  TUNEBENCH_GIT_REV="$(cat .gpu/revision 2>/dev/null || true)"
  export TUNEBENCH_GIT_REV
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  shapes="${SHAPES:-smollm2-135m,llama-1b,qwen1.5b-like,qwen1.5b-like+ckpt}"; batch=8; seq=512; steps=10
  write=(--write-results)
fi
"$bin" --version

fail=0
budget="${BUDGET_S:-480}"
left() { echo $((budget - SECONDS)); }
# fits STEP SECONDS NAME: whether step STEP (ops, bench, training, inference, qlora, oom, profile, ab),
# which takes about SECONDS, fits in what is left of the budget and, with ONLY set (a
# comma-separated list of steps), is one it names; the op checks always run. NAME is what the
# log calls it.
fits() {
  if [ -n "${ONLY:-}" ] && [ "$1" != ops ] && [[ ",$ONLY," != *",$1,"* ]]; then
    echo "== not asked for: $3 (ONLY=$ONLY)"
    return 1
  fi
  if [ "$(left)" -lt "$2" ]; then
    echo "== SKIPPED: $3 (needs about $2 s; $(left) s left of the ${budget} s budget)"
    return 1
  fi
}
# tb LIMIT ARGS...: the binary, killed past LIMIT seconds.
tb() { local limit=$1; shift; timeout -k 5 "$limit" "$bin" "$@"; }

echo "== op gradients on $DEVICE against the f64 reference (tunebench check-ops)"
if ! tb 150 check-ops --device "$DEVICE"; then
  fail=1
  # Which side is off: the flash-attention kernels, the other fused kernels (kernels/fused.cu)
  # or the rest? Without the flash kernels attention takes the blocked tensor ops; without any
  # fused kernel the ops take candle's kernels with our backward. Measure the way that passes.
  if fits ops 120 "op checks with the flash kernels off"; then
    echo "== op checks again with the flash kernels off (TUNEBENCH_FLASH_ATTENTION=0)"
    if TUNEBENCH_FLASH_ATTENTION=0 tb 150 check-ops --device "$DEVICE"; then
      echo "the flash kernels fail their checks: the rest of this session runs without them"
      export TUNEBENCH_FLASH_ATTENTION=0
    elif fits ops 120 "op checks with the fused kernels off"; then
      echo "== op checks again with the fused kernels off (TUNEBENCH_FUSED_KERNELS=0)"
      if TUNEBENCH_FUSED_KERNELS=0 tb 150 check-ops --device "$DEVICE"; then
        echo "the fused kernels fail their checks: the rest of this session runs without them"
        export TUNEBENCH_FUSED_KERNELS=0
      fi
    fi
  fi
fi

if fits bench 120 "bench/gpu_bench.py"; then
  echo "== bench/gpu_bench.py ($shapes, ${batch}x${seq})"
  cp bench/RESULTS.md "$OUT/RESULTS.before.md" 2>/dev/null || true
  # Each side of each shape gets at most a quarter of what is left, so one that hangs leaves
  # time for the others.
  "$py" bench/gpu_bench.py --tunebench "$bin" --device "$DEVICE" --shapes "$shapes" --batch "$batch" --seq "$seq" \
    --dtypes "${DTYPES:-bf16}" --warmup 2 --steps "$steps" --side-timeout $(( $(left) / 4 )) "${write[@]}" || fail=1
  diff "$OUT/RESULTS.before.md" bench/RESULTS.md | sed -n 's/^> //p' > "$OUT/RESULTS.new-section.md" || true
  echo "results section: $OUT/RESULTS.new-section.md"
fi

if fits training 90 "training correctness against the CPU"; then
  echo "== correctness: $DEVICE against the CPU (tiny shapes, random weights, same batches; tiny-hd64's 16-bit runs take the flash kernels)"
  for shape in tiny tiny-hd64; do
  for dtype in f32 bf16 f16; do
    for ckpt in "" --gradient-checkpointing; do
      args=(bench-train --shape "$shape" --batch 4 --seq 64 --warmup-steps 0 --steps 6 --lr 1e-2 --dtype "$dtype" $ckpt)
      ref=$(tb 60 "${args[@]}" --device cpu | tail -n1) || { echo "$shape $dtype $ckpt: the CPU run failed"; fail=1; continue; }
      got=$(tb 60 "${args[@]}" --device "$DEVICE" | tail -n1) || { echo "$shape $dtype $ckpt: the $DEVICE run failed"; fail=1; continue; }
      "$py" - "$shape" "$dtype" "$ckpt" "$ref" "$got" <<'PY' || fail=1
import json, sys
shape, dtype, ckpt, ref, got = sys.argv[1], sys.argv[2], sys.argv[3] or "plain", json.loads(sys.argv[4]), json.loads(sys.argv[5])
# The first step's loss is one forward on the same weights: it must agree closely. The later
# ones follow five updates at lr 1e-2 (the loss falls ~8x), which carry each side's rounding
# on: in 16 bits the limit is looser (bf16 keeps 8 bits of mantissa, and the flash kernels
# round the probabilities to it for the tensor-core product, as FlashAttention does).
first_tol, tol = (1e-5, 1e-3) if dtype == "f32" else (5e-3, 6e-2)
rel = [abs(a - b) / max(abs(a), 1e-9) for a, b in zip(ref["losses"], got["losses"])]
ok = rel[0] <= first_tol and max(rel) <= tol and got["losses"][-1] < got["losses"][0]
print(f"{shape:9} {dtype:5} {ckpt:26} device {got['device']}: relative loss difference first step {rel[0]:.2e} "
      f"(limit {first_tol:g}), worst {max(rel):.2e} (limit {tol:g}) {'ok' if ok else 'FAILED'}; "
      f"losses {['%.4f' % x for x in got['losses']]}")
sys.exit(0 if ok else 1)
PY
    done
  done
  done
fi

if fits inference 40 "inference logits against the CPU"; then
  echo "== inference on $DEVICE against the CPU (tiny shape, random weights; full-sequence and token-by-token logits)"
  echo '[[1, 5, 9, 200, 31, 7, 7, 300, 12, 0, 45, 99, 4, 4, 17, 256]]' > "$OUT/ids.json"
  for mode in "" --decode; do
    tb 60 logits --shape tiny --tokens "$OUT/ids.json" --out "$OUT/logits-cpu.safetensors" --device cpu $mode || fail=1
    tb 60 logits --shape tiny --tokens "$OUT/ids.json" --out "$OUT/logits-dev.safetensors" --device "$DEVICE" $mode || fail=1
    "$py" - "$OUT" "${mode:-full}" <<'PY' || fail=1
import sys
from safetensors.numpy import load_file
out, mode = sys.argv[1], sys.argv[2]
a, b = load_file(f"{out}/logits-cpu.safetensors")["logits.0"], load_file(f"{out}/logits-dev.safetensors")["logits.0"]
err = float(abs(a - b).max() / abs(a).max())
ok = err <= 1e-4 and a.shape == b.shape
print(f"logits {mode:8} relative difference {err:.2e} (limit 1e-4) {'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PY
  done
  # The same with the projections held as quantized blocks, as a GGUF model is held for chat: the
  # device's quantized inference (candle's kernels for a decoding step's row, the dequantized
  # product for a prompt's rows) against the CPU's (model::qmatmul). Both sides round the
  # activations to 8 bits, each its own way, so they need not agree with each other better than
  # with the unquantized weights; the device must be no further from those than twice the CPU.
  for blocks in q4_1 q8_0; do
    for mode in "" --decode; do
      tb 60 logits --shape tiny --tokens "$OUT/ids.json" --out "$OUT/logits-dense.safetensors" --device cpu $mode || fail=1
      tb 60 logits --shape tiny --blocks "$blocks" --tokens "$OUT/ids.json" --out "$OUT/logits-cpu.safetensors" --device cpu $mode || fail=1
      tb 60 logits --shape tiny --blocks "$blocks" --tokens "$OUT/ids.json" --out "$OUT/logits-dev.safetensors" --device "$DEVICE" $mode || fail=1
      "$py" - "$OUT" "$blocks ${mode:-full}" <<'PY' || fail=1
import sys
from safetensors.numpy import load_file
out, what = sys.argv[1], sys.argv[2]
d, a, b = (load_file(f"{out}/logits-{n}.safetensors")["logits.0"] for n in ("dense", "cpu", "dev"))
quant, err = float(abs(a - d).max() / abs(d).max()), float(abs(b - d).max() / abs(d).max())
ok = err <= 2 * quant and a.shape == b.shape
print(f"logits {what:14} device vs unquantized {err:.2e} (limit 2 × the cpu's {quant:.2e}; device vs cpu "
      f"{float(abs(a - b).max() / abs(a).max()):.2e}) {'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PY
    done
  done
  rm -f "$OUT"/logits-*.safetensors
fi

# QLoRA on the device: the Llama-1B shape's projections held as 4-bit blocks (Q4_K), which the
# LoRA products dequantize on the GPU; against LoRA over the bf16 base (no PyTorch side: the
# reference's 4-bit path needs bitsandbytes, which the device machine lacks).
qshape=llama-1b; [ "$DEVICE" = cpu ] && qshape=tiny
if fits qlora 90 "QLoRA on the device"; then
  echo "== QLoRA against LoRA: $qshape bf16 ${batch}x${seq} on $DEVICE (tokens/s, pool peak, estimate)"
  for method in lora qlora; do
    tb 120 bench-train --shape "$qshape" --batch "$batch" --seq "$seq" --warmup-steps 2 --steps "$steps" --dtype bf16 \
      --device "$DEVICE" --peft "$(printf 'method = "%s"\nr = 16\nlora_alpha = 32\ntarget_modules = "all-linear"' "$method")" \
      | tail -n1 | "$py" -c "import json,sys; r=json.loads(sys.stdin.read()); g=lambda k: (r.get(k) or 0)/2**30
print(f\"$method: {r['tokens_per_s']:.0f} tok/s, pool peak {g('device_peak_bytes'):.2f} GiB, estimate {g('estimated_peak_bytes'):.2f} GiB, losses {[round(x, 3) for x in r['losses']]}\")" || fail=1
  done
fi

# Running out of device memory: a batch far past what the GPU holds must end the run with the
# advice (exit status 1, "ran out of memory" and what to change), not a panic or an abort.
# 48×4096 tokens need ~210 GiB of activations on the Llama-1B shape (~1.1 MiB a token), while
# its largest tensor (tokens × 8192) stays under 2^31 values: at 2^32 candle's own kernels
# launch an empty grid (512×4096 tokens × 2048 = 2^32 failed with CUDA_ERROR_INVALID_VALUE),
# which training and bench-train now refuse by name before the step
# (device::activation_too_large): checked too.
# refused NAME BATCH PATTERN WHAT: the Llama-1B shape at BATCH×4096 tokens on the device must
# exit with status 1, its error saying PATTERN, without a panic (output in $OUT/NAME.out/.err).
refused() {
  local name=$1 batch=$2 pattern=$3 what=$4 rc=0
  tb 90 bench-train --shape llama-1b --batch "$batch" --seq 4096 --warmup-steps 0 --steps 1 --dtype bf16 --device "$DEVICE" \
    > "$OUT/$name.out" 2> "$OUT/$name.err" || rc=$?
  tail -n 3 "$OUT/$name.err"
  if [ "$rc" = 1 ] && grep -q "$pattern" "$OUT/$name.err" && ! grep -q "panicked" "$OUT/$name.err"; then
    echo "$what: ok (exit 1, \"$pattern\")"
  else
    echo "$what: FAILED (exit $rc)"; fail=1
  fi
}
if [ "$DEVICE" != cpu ] && fits oom 40 "running out of device memory"; then
  echo "== out of device memory: llama-1b bf16 48x4096 on $DEVICE"
  refused oom 48 "ran out of memory" "out of memory"
  # 512×4096 tokens: a (tokens, 2048) tensor of 2^32 values, refused by name before the step.
  refused too-large 512 "count in 32 bits" "tensor past 2^32 values"
fi

# Where a step's time goes on the device (the fused kernels to write next follow from it):
# profiled steps time each op's forward and backward between device synchronizations.
pshape=llama-1b; [ "$DEVICE" = cpu ] && pshape=tiny
if fits profile 45 "the profile"; then
  echo "== profile: $pshape bf16 ${batch}x${seq} on $DEVICE (bench-train --profile)"
  tb 90 bench-train --shape "$pshape" --batch "$batch" --seq "$seq" --warmup-steps 1 --steps 1 --profile 3 --dtype bf16 \
    --device "$DEVICE" 2> "$OUT/profile-$pshape.txt" | tail -n1 > "$OUT/profile-$pshape.json" || fail=1
  cat "$OUT/profile-$pshape.txt"
fi

# A/B runs of what the defaults choose: summary JSON without the losses.
summary() { "$py" -c "import json,sys; r=json.loads(sys.stdin.read()); print('$1:', {k: r[k] for k in r if k != 'losses'})"; }
ab() { # ab LABEL [ENV=VALUE...]: the SmolLM2 shape in bf16 with the given environment
  local label=$1; shift
  env "$@" timeout -k 5 60 "$bin" bench-train --shape smollm2-135m --batch "$batch" --seq "$seq" --warmup-steps 2 \
    --steps "$steps" --dtype bf16 --device "$DEVICE" | tail -n1 | summary "$label" || fail=1
}
if [ "$DEVICE" != cpu ] && [ "${TUNEBENCH_FUSED_KERNELS:-1}" != 0 ] && fits ab 60 "the A/B runs"; then
  echo "== our fused kernels against candle's ops (SmolLM2-135M shape, bf16, ${batch}x${seq}, tokens/s)"
  ab "fused kernels 1" TUNEBENCH_FUSED_KERNELS=1
  ab "fused kernels 0" TUNEBENCH_FUSED_KERNELS=0
  # Attention by the flash kernels (the runs above) against the blocked tensor-op attention.
  echo "== flash attention off (TUNEBENCH_FLASH_ATTENTION=0), same run"
  ab "flash off" TUNEBENCH_FLASH_ATTENTION=0
  # The runs above keep freed memory in the CUDA pool (src/device.rs); the driver's default
  # unmaps it at every synchronization, so each step maps its activations again.
  echo "== the memory pool trimmed at each synchronization (the driver's default), same run"
  ab "pool trimmed" TUNEBENCH_CUDA_TRIM_POOL=1
fi
echo "== done in $SECONDS s (budget ${budget} s); failures: $fail"
exit "$fail"
