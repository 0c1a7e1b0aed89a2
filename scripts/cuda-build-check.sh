#!/usr/bin/env bash
# Builds the workspace with `--features cuda` on a machine without a GPU or a CUDA install, and
# stages the test binaries and `slime-trainer` in .gpu-bin/ for scripts/gpu-run.sh on a GPU machine.
#
#   scripts/cuda-build-check.sh            # CUDA 13.0 toolkit from PyPI, sm_90 (H100/H200)
#   CUDA_COMPUTE_CAP=80 scripts/cuda-build-check.sh
#
# What it needs and does:
# - nvcc, the CUDA headers and the runtime libraries come from NVIDIA's PyPI wheels (pinned below),
#   installed into $CUDA_SDK_DIR (default ~/.cache/slime-cuda-sdk/13.0); nothing else is downloaded.
# - No wheel ships the driver library libcuda.so: a link stub with the driver API's symbols (the ones
#   cudarc declares) is compiled into lib64/stubs. The real driver replaces it at run time.
# - CUDA_COMPUTE_CAP picks the GPU architecture, so no GPU is needed to build.
# - Builds into target/cuda (the default target/ is left alone). Not part of CI.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
start=$(date +%s)

CUDA_VERSION=13.0
SDK="${CUDA_SDK_DIR:-$HOME/.cache/slime-cuda-sdk/$CUDA_VERSION}"
CR="$SDK/nvidia/cu13"
if [ ! -x "$CR/bin/nvcc" ]; then
  python3 -m pip install --quiet --no-deps --target "$SDK" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    'nvidia-cublas==13.0.*' nvidia-curand==10.4.0.35
fi

# lib64/: the unversioned names the linker looks for, and the driver stub.
mkdir -p "$CR/lib64/stubs"
for lib in "$CR"/lib/lib*.so.*; do
  name=$(basename "$lib")
  ln -sf "../lib/$name" "$CR/lib64/$name"
  ln -sf "../lib/$name" "$CR/lib64/${name%%.so.*}.so"
done
if [ ! -f "$CR/lib64/stubs/libcuda.so" ]; then
  cudarc=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -mindepth 2 -maxdepth 2 -name "cudarc-0.19.*" | sort | tail -n 1)
  if [ -z "$cudarc" ]; then
    cargo fetch --locked
    cudarc=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -mindepth 2 -maxdepth 2 -name "cudarc-0.19.*" | sort | tail -n 1)
  fi
  stub_c=$(mktemp --suffix=.c)
  grep -oE '^\s+fn cu[A-Za-z0-9_]+\(' "$cudarc/src/driver/sys/mod.rs" | sed -E 's/^\s+fn //; s/\($//' | sort -u \
    | sed 's/.*/int &(void) { return 999; }/' > "$stub_c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CR/lib64/stubs/libcuda.so" "$stub_c"
  rm -f "$stub_c"
fi

export CUDA_ROOT="$CR" CUDA_PATH="$CR" CUDA_HOME="$CR" NVCC="$CR/bin/nvcc" PATH="$CR/bin:$PATH"
export LIBRARY_PATH="$CR/lib64:$CR/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$CR/lib64/stubs"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="$ROOT/target/cuda"
nvcc --version | tail -n 2

features=slime-objectives/cuda,slime-models/cuda,slime-trainer/cuda
cargo build --release -p slime-trainer --features "$features" --bin slime-trainer
cargo test --release -p slime-objectives -p slime-models -p slime-trainer --features "$features" --no-run \
  --message-format=json-render-diagnostics >"$CARGO_TARGET_DIR/test-artifacts.json"

grep -qx '/.gpu-bin/' .git/info/exclude 2>/dev/null || echo '/.gpu-bin/' >>.git/info/exclude
# Every test target compiled above (release, so it shares the build above); the ones that touch a GPU travel (the rest use the CPU only).
rm -rf .gpu-bin && mkdir -p .gpu-bin
python3 - "$CARGO_TARGET_DIR/test-artifacts.json" <<'PY' | while read -r exe; do cp "$exe" .gpu-bin/cuda_parity; done
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_parity":
        print(m["executable"])
PY
cp "$CARGO_TARGET_DIR/release/slime-trainer" .gpu-bin/
strip .gpu-bin/slime-trainer .gpu-bin/cuda_parity
echo "linked against:"; ldd .gpu-bin/slime-trainer | grep -E 'cuda|cublas|curand|nvrtc' || true
# xz: ~160 MB of binaries (mostly candle's embedded PTX) travel as ~23 MB; gpu-run.sh unpacks them.
xz -T0 -6 .gpu-bin/slime-trainer .gpu-bin/cuda_parity
du -sh .gpu-bin
echo "built in $(( $(date +%s) - start )) s; on a GPU machine: scripts/gpu-run.sh (carry .gpu-bin)"
