#!/usr/bin/env bash
# Installs the system tools the tests need, once (tests/deploy.rs: the list below; tests/replay.rs: jq): systemd's tools (systemd-analyze verify,
# systemd-sysusers, systemd-tmpfiles, deb-systemd-helper for the package's scripts), dpkg
# and objcopy (building and installing the .deb), and cargo-deb. Idempotent: a tool that is
# already there is not fetched again. Also NVRTC from PyPI (the kernel-compile test). Debian/Ubuntu, as root (CI) or with sudo.
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

# NVRTC (CUDA 13) from PyPI: server/src/engine/cuda.rs compiles every kernel of the reference
# export with it, no GPU needed. ~90 MB; pinned to the CUDA version the engine targets.
NVRTC_VERSION=13.0.88
if ! python3 -c "import nvidia.cu13, os, sys; sys.exit(0 if os.path.exists(os.path.join(list(nvidia.cu13.__path__)[0], 'lib', 'libnvrtc.so.13')) else 1)" 2>/dev/null; then
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check "nvidia-cuda-nvrtc==$NVRTC_VERSION"
fi

systemd-analyze --version | head -n1
cargo deb --version
