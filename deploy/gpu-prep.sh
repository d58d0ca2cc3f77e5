#!/usr/bin/env bash
# Prepares what a GPU machine needs for `deploy/gpu-check.sh`, here (with cargo and PyPI):
# the release binary, stripped and xz-compressed (the stripped binary is ~170 MB, over the
# 64 MiB a device run may carry; compressed it is ~35 MB), and the PyTorch baseline's wheels.
#
#   bash deploy/gpu-prep.sh
#   run(carry=["target/gpu-carry", "target/baseline-wheels"], "bash deploy/gpu-check.sh")
#
# gpu-check.sh unpacks target/gpu-carry/reflex.xz (Python's lzma: nothing to install) when
# target/release/reflex is not there. NO_NUMPY=1 (passed on to baseline-wheels.sh) keeps the
# carry smaller when the device's PyTorch venv has numpy.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin reflex
mkdir -p target/gpu-carry
strip -o target/gpu-carry/reflex target/release/reflex
rm -f target/gpu-carry/reflex.xz
xz -T0 -6 target/gpu-carry/reflex
bash deploy/baseline-wheels.sh
du -b target/gpu-carry/reflex.xz target/baseline-wheels | awk '{s += $1; print} END {printf "carry total: %.1f MiB (limit 64)\n", s / 1048576}'
