#!/usr/bin/env bash
# Installs the system tools the tests need, once (tests/deploy.rs: the list below; tests/replay.rs: jq): systemd's tools (systemd-analyze verify,
# systemd-sysusers, systemd-tmpfiles, deb-systemd-helper for the package's scripts), dpkg
# and objcopy (building and installing the .deb), and cargo-deb. Idempotent: a tool that is
# already there is not fetched again. Also NVRTC from PyPI (the kernel-compile test) and the
# Python client's test dependencies (tests/python_client.rs), the readers the trace-export
# tests check with (tests/trace.rs), onnxruntime for the export fixtures, and the seed tool
# (reflex-vla, tests/seed_traces.rs), and s3s-fs (tests/ship.rs). Debian/Ubuntu, as root (CI) or with sudo.
set -euo pipefail

CARGO_DEB_VERSION=3.8.0

SUDO=()
if [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi

missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v systemd-sysusers >/dev/null || missing+=(systemd)
command -v deb-systemd-helper >/dev/null || missing+=(init-system-helpers)
command -v dpkg-deb >/dev/null || missing+=(dpkg)
command -v objcopy >/dev/null || missing+=(binutils)
# jq: the README's grpcurl replay recipe, run by tests/replay.rs.
command -v jq >/dev/null || missing+=(jq)
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    # --no-install-recommends: the tools, not a booting init system.
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Built from source (about two minutes on two cores); pinned so CI is reproducible.
if [ "$(cargo deb --version 2>/dev/null || true)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
fi

# The S3-compatible server tests/ship.rs ships traces to: s3s-fs, a maintained S3 server
# over a folder (the s3s project, Apache-2.0), from crates.io. Chosen because it keeps its
# objects on disk (a test kills it mid-multipart and restarts it on the same folder),
# supports multipart uploads and SigV4, and installs from a registry CI reaches (MinIO is
# in none; moto's server keeps objects in memory, so a restart loses the bucket). 0.14.1 is
# the newest that builds on our Rust 1.95 (0.17 needs 1.96); about 3.5 minutes on two cores.
S3S_FS_VERSION=0.14.1
if [ "$(s3s-fs --version 2>/dev/null || "$HOME/.cargo/bin/s3s-fs" --version 2>/dev/null || true)" != "s3s-fs $S3S_FS_VERSION" ]; then
    cargo install s3s-fs --version "$S3S_FS_VERSION" --features binary --locked --quiet
fi

# NVRTC (CUDA 13) from PyPI: server/engine/src/engine/cuda.rs compiles every kernel of the reference
# export with it, no GPU needed. ~90 MB; pinned to the CUDA version the engine targets.
NVRTC_VERSION=13.0.88
if ! python3 -c "import nvidia.cu13, os, sys; sys.exit(0 if os.path.exists(os.path.join(list(nvidia.cu13.__path__)[0], 'lib', 'libnvrtc.so.13')) else 1)" 2>/dev/null; then
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check "nvidia-cuda-nvrtc==$NVRTC_VERSION"
fi

# pip_satisfied SPEC...: true when every requirement is installed at a version it allows.
pip_satisfied() {
    python3 - "$@" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
for spec in sys.argv[1:]:
    r = Requirement(spec)
    if not r.specifier.contains(version(r.name), prereleases=True):
        sys.exit(1)
PY
}

systemd-analyze --version | head -n1
cargo deb --version

# The Python client's tests (tests/python_client.rs runs proto/python/tests with pytest):
# grpcio-tools pinned to the version the committed stubs come from (checked byte for byte),
# mypy pinned (the package is checked --strict), openpi-client without its numpy<2 pin (its
# BasePolicy and broker are all the adapter test uses; dm-tree is what that broker imports),
# and what the package itself needs.
PY_TEST_DEPS=(grpcio grpcio-tools==1.71.2 "numpy>=2" pillow pytest mypy==2.4.1 dm-tree typing_extensions)
if ! pip_satisfied "${PY_TEST_DEPS[@]}" openpi-client==0.1.2; then
    PIP=(python3 -m pip install --quiet --disable-pip-version-check)
    PIP_ROOT_USER_ACTION=ignore "${PIP[@]}" "${PY_TEST_DEPS[@]}"
    PIP_ROOT_USER_ACTION=ignore "${PIP[@]}" --no-deps openpi-client==0.1.2
fi

# Ray for reflex_client.ray_replay and its test (proto/python/tests/test_ray_replay.py): an
# exact pin with a CPython 3.11 x86_64 wheel (240 MB installed; pip install took 9.4 s on the 2-core development machine).
if ! pip_satisfied ray==2.60.0; then
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check ray==2.60.0
fi
# What openpi-client's WebsocketClientPolicy imports and its --no-deps install above leaves
# out: msgpack and websockets (tests/openpi.rs drives `reflex serve --openpi-listen` with the
# real client; proto/python/bench/bench_frontends.py measures it).
OPENPI_CLIENT_DEPS=(msgpack==1.2.4 websockets==17.4)
if ! pip_satisfied "${OPENPI_CLIENT_DEPS[@]}"; then
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check "${OPENPI_CLIENT_DEPS[@]}"
fi

# The reference runtime the export fixtures are checked against (server/engine/tests/fixtures_ort.rs
# runs tests/fixtures/run_ort.py): onnxruntime runs the graphs, HuggingFace tokenizers and
# safetensors read the fixture's tokenizer.json and normaliser stats. Not the `onnx` package:
# it needs protobuf >= 6, and the pinned grpcio-tools above needs protobuf < 6 (kept below 6
# here too, so that no install step moves it).
FIXTURE_REFERENCE=(onnxruntime==1.32.0 tokenizers==0.22.1 safetensors==0.6.2 "protobuf<6")
# transformers: the seed tool's runtime loads its tokenizer with AutoTokenizer
# (tests/real_exports.rs runs that runtime, installed below, on our fixtures; no torch).
FIXTURE_REFERENCE+=(transformers==4.57.1)
if ! pip_satisfied "${FIXTURE_REFERENCE[@]}"; then
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check "${FIXTURE_REFERENCE[@]}"
fi

# The readers tests/trace.rs checks `reflex trace export` with (tests/trace/readers.py): the
# Python mcap package, DuckDB, and LeRobot's dataset reader. lerobot itself (0.5+) needs
# Python 3.12; lerobot-dataset is its dataset code packaged alone (import `ledataset`), and it
# imports torch and torchvision without declaring them, so they are pinned here (the CPU
# suffices; ~3 GB with the CUDA wheels PyPI serves, fetched once).
TRACE_READERS=(mcap==1.6.0 duckdb==2.0.1 lerobot-dataset==0.4.4 torch==2.5.1 torchvision==0.20.1)
if ! pip_satisfied "${TRACE_READERS[@]}"; then
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check "${TRACE_READERS[@]}"
fi

# The seed tool (reflex-vla, the project reflex replaces) for tests/seed_traces.rs: its own
# RecordWriter, trace reader and A2C2 batch builder run on both sides of a trace. --no-deps
# into a folder of its own (its top-level package `reflex` then shadows nothing, and none of
# its heavy dependencies come along); what those modules import (numpy, torch) is above,
# and httpx for its HTTP client (tests/frontends.rs).
# The test finds it at the same path ($REFLEX_SEED_TOOL_DIR overrides both).
SEED_TOOL_VERSION=0.11.2
SEED_TOOL_DIR="${REFLEX_SEED_TOOL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/reflex-ci/reflex-vla-$SEED_TOOL_VERSION}"
if [ ! -d "$SEED_TOOL_DIR/reflex_vla-$SEED_TOOL_VERSION.dist-info" ]; then
    rm -rf "$SEED_TOOL_DIR"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
        --no-deps --target "$SEED_TOOL_DIR" "reflex-vla==$SEED_TOOL_VERSION"
fi
if ! pip_satisfied httpx==0.28.1; then
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check httpx==0.28.1
fi
