#!/usr/bin/env bash
# Fetches the Python wheels the PyTorch baseline (deploy/torch_baseline.py) needs on the GPU
# machine, which has PyTorch (/opt/torch/.venv) but no package registry: onnx2torch and onnx
# with onnx's own dependencies (protobuf, ml_dtypes, numpy), for CPython 3.12 on x86-64
# Linux. They go to target/baseline-wheels/ (ignored by git), to be carried with the run:
#
#   bash deploy/baseline-wheels.sh          # here, with PyPI
#   run(carry=[..., "target/baseline-wheels"], "bash deploy/gpu-check.sh")
#
# gpu-check.sh unpacks only the ones the device's Python lacks. Idempotent: a wheel already
# in the folder is not fetched again (nothing is fetched when all are there).
#   NO_NUMPY=1   leave numpy out (15 MB; most PyTorch venvs have it)
#   WITH_ORT=1   add onnxruntime's CPU wheel (28 MB) for the parity check against onnxruntime
#                on the device (without it the device checks cuda against the cpu in torch)
#   PY_VERSION   the device's Python (default 3.12; onnx's wheel is abi3 from 3.12 on)
# Not carried: onnxruntime-gpu (255 MB on PyPI, over the 64 MiB carry limit, and built
# against CUDA 12 libraries the CUDA 13 machine does not have).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${WHEELS_DIR:-target/baseline-wheels}
PY=${PY_VERSION:-3.12}
# Pinned: the versions deploy/torch_baseline.py was tested with (CPU, PyTorch 2.15.0).
PKGS="onnx==1.23.2 onnx2torch==1.5.15 protobuf==7.36.2 ml_dtypes==0.7.0"
[ "${NO_NUMPY:-0}" = 1 ] || PKGS="$PKGS numpy==2.5.5"
[ "${WITH_ORT:-0}" = 1 ] && PKGS="$PKGS onnxruntime==1.32.0"
mkdir -p "$DIR"
want=()
for spec in $PKGS; do
  name=${spec%%==*} version=${spec##*==}
  if ls "$DIR/$name-$version-"*.whl >/dev/null 2>&1; then
    echo "have  $(basename "$(ls "$DIR/$name-$version-"*.whl | head -1)")"
  else
    want+=("$spec")
  fi
done
if [ "${#want[@]}" -gt 0 ]; then
  # Each wheel alone (--no-deps): the dependencies are the list above, and torchvision
  # (onnx2torch's declared dependency, for two detection operators) is stood in for by the
  # script instead of carried.
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" "${want[@]}"
  for spec in "${want[@]}"; do echo "got   $(basename "$(ls "$DIR/${spec%%==*}-${spec##*==}-"*.whl | head -1)")"; done
fi
echo "carry: $DIR ($(du -sh "$DIR" | cut -f1), $(ls "$DIR"/*.whl | wc -l) wheels)"
