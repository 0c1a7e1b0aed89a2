#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, from the repository root, after scripts/cuda-build-check.sh has
# staged .gpu-bin/ (built elsewhere is fine: the binaries need only the driver and the CUDA 13
# runtime libraries, which PyTorch's cu13 wheels also ship):
#
#   scripts/gpu-run.sh                      # the CUDA parity tests
#   scripts/gpu-run.sh --assets DIR         # and R1's step time against bench_peft.py on the GPU
#
# DIR holds what `cargo xtask assets` writes (models/smollm2-135m-instruct, data/dpo_en_demo.preference.parquet).
# Writes its log and figures to ${OUT:-gpu-results}/.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
results="${OUT:-gpu-results}"
mkdir -p "$results"
assets=""
[ "${1:-}" = "--assets" ] && assets="${2:?--assets needs a directory}"

for packed in .gpu-bin/*.xz; do
  [ -e "$packed" ] || continue
  xz -dc "$packed" >"${packed%.xz}" && chmod +x "${packed%.xz}"
done

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$results/gpu.txt"

# The CUDA 13 libraries the binaries link (cublas, cublasLt, curand, nvrtc, cudart), from wherever
# this machine has them: a CUDA install or the nvidia-* Python wheels.
for lib in libcublas.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
  dir=$(find /usr/local/cuda*/lib64 /usr/lib/x86_64-linux-gnu / -name "$lib" -not -path '*/proc/*' 2>/dev/null | head -n 1 | xargs -r dirname)
  [ -n "$dir" ] && export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
ldd .gpu-bin/slime-trainer | grep -E 'not found' && { echo "missing libraries (above)"; exit 1; }

# 1. Parity: objectives, models and a short run on CUDA against the CPU.
set -o pipefail
.gpu-bin/cuda_parity --test-threads 1 2>&1 | tee "$results/cuda_parity.txt"

# 2. R1 on the GPU: SmolLM2-135M-Instruct, LoRA r 64 / alpha 128, 4 pairs a step, lr 1e-4,
#    clipping 1.0, pairs over 512 tokens left out on both sides (the settings of
#    `cargo xtask bench --workload smollm2`), SimPO beta 2 / gamma 1 on our side.
if [ -n "$assets" ]; then
  model="$assets/models/smollm2-135m-instruct" data="$assets/data/dpo_en_demo.preference.parquet"
  for objective in simpo slime dpo-precomputed; do
    python3 -c "import runpy, sys, torch; torch.set_default_device('cuda'); sys.argv = sys.argv[1:]; \
runpy.run_path(sys.argv[0], run_name='__main__')" ../shared/bench/pytorch-anchor/bench_peft.py \
      --model "$model" --data "$data" --objective "$objective" | tee -a "$results/bench_peft_cuda.jsonl"
  done
  cat >"$results/r1.toml" <<EOF
[model]
path = "$model"
device = "cuda"
lora = { r = 64, alpha = 128.0 }
[data]
parquet = "$data"
max_length = 512
max_prompt_length = 511
overlong = "drop"
eval_pairs = 4
[sft]
steps = 0
[preference]
steps = 10
batch_size = 4
max_grad_norm = 1.0
weight_decay = 0.0
schedule = { lr = 1e-4, decay = "constant", warmup_ratio = 0.0 }
objective = { type = "simpo", beta = 2.0, gamma_beta_ratio = 0.5 }
[eval]
every = 10
generations = 0
batch_size = 4
[checkpoint]
every = 0
EOF
  .gpu-bin/slime-trainer train --config "$results/r1.toml" --run-dir "$results/r1-run" --progress off
  cp "$results/r1-run/metrics.jsonl" "$results/r1-metrics.jsonl"
  echo "ours: per-step tokens_per_second in $results/r1-metrics.jsonl; PyTorch + PEFT: $results/bench_peft_cuda.jsonl"
fi
