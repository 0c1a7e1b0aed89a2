#!/usr/bin/env bash
# GPU check recipe for the `cuda` feature (NOT run by CI; manual use only).
# STATUS: UNTESTED DRAFT - see docs/gpu.md. Written 2026-11-22; the session that
# wrote it had no GPU machine and ran out of time before building.
#
# Steps: (1) install a CUDA 12 toolkit (nvcc + headers) from PyPI wheels into a cache dir,
# (2) build slime-objectives' tests with --features cuda into a target dir OUTSIDE the repo,
# NOTE: link needs a libcuda.so stub (no PyPI wheel ships one) - see docs/gpu.md.
# (3) stage stripped test binaries into ./.gpu-bin (git-ignored via .git/info/exclude)
#     so they can be carried to a GPU machine and run there.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SDK="${CUDA_SDK_DIR:-$HOME/.cache/slime-cuda-sdk}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/cuda-target}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"   # H100 = sm_90; no GPU needed at build time

if [ ! -x "$SDK/nvidia/cuda_nvcc/bin/nvcc" ]; then
  python3 -m pip install --target "$SDK" \
    'nvidia-cuda-nvcc-cu12==12.*' 'nvidia-cuda-runtime-cu12==12.*' 'nvidia-cuda-cccl-cu12==12.*' \
    'nvidia-cublas-cu12==12.*' 'nvidia-curand-cu12==12.*' 'nvidia-cuda-nvrtc-cu12==12.*'
fi
# Merge the wheel layouts into one CUDA_ROOT-like tree (bin/, include/, lib64/).
CR="$SDK/cuda-root"; mkdir -p "$CR"/{bin,include,lib64}
for d in "$SDK"/nvidia/*/; do
  [ -d "$d/bin" ] && cp -rsf "$d"/bin/. "$CR/bin/"
  [ -d "$d/include" ] && cp -rsf "$d"/include/. "$CR/include/"
  [ -d "$d/lib" ] && cp -rsf "$d"/lib/. "$CR/lib64/"
done
export CUDA_ROOT="$CR" CUDA_PATH="$CR" CUDA_HOME="$CR" NVCC="$CR/bin/nvcc" PATH="$CR/bin:$PATH"

cd "$ROOT"
cargo test -p slime-objectives --features cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["profile"]["test"]: print(m["executable"])' \
  > "$CARGO_TARGET_DIR/gpu-test-bins.txt"
grep -qx '/.gpu-bin/' .git/info/exclude || echo '/.gpu-bin/' >> .git/info/exclude
rm -rf .gpu-bin && mkdir -p .gpu-bin
while read -r b; do cp "$b" .gpu-bin/ && strip ".gpu-bin/$(basename "$b")"; done < "$CARGO_TARGET_DIR/gpu-test-bins.txt"
du -sh .gpu-bin
echo "Now on the GPU machine (carry .gpu-bin): nvidia-smi; for t in .gpu-bin/*; do \$t; done"
