#!/usr/bin/env python3
"""Regenerates reflex_client/_pb/ from ../proto/reflex/v1/reflex.proto with grpcio-tools.

The stubs are committed (so `pip wheel` needs neither protoc nor the .proto) and
tests/test_stubs.py checks that they are what this script makes of the current proto.

Why the rewriting: protoc names the modules after the proto's path, `reflex.v1.reflex_pb2`,
but the top-level name `reflex` belongs to the seed tool's PyPI package (reflex-vla), so
the modules live in `reflex_client._pb` and their imports and module names are rewritten.
The descriptor keeps its file name `reflex/v1/reflex.proto`, so a process that also loads
hand-generated stubs of the same proto gets the same file in the descriptor pool, not a
clash.

Usage: python3 tools/generate_stubs.py [OUT_DIR]   (default: reflex_client/_pb)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

#: The grpcio-tools release the committed stubs come from (deploy/ci-setup.sh installs it).
#: An older generator keeps the runtime floor low: its gencode asks for protobuf >= 5.29 and
#: grpcio >= 1.71, and newer runtimes accept older gencode.
GRPCIO_TOOLS_VERSION = "1.71.2"

HERE = Path(__file__).resolve().parent
PACKAGE_ROOT = HERE.parent
PROTO_ROOT = PACKAGE_ROOT.parent / "proto"
PROTO_FILE = "reflex/v1/reflex.proto"
DEFAULT_OUT = PACKAGE_ROOT / "reflex_client" / "_pb"
MODULES = ("reflex_pb2.py", "reflex_pb2.pyi", "reflex_pb2_grpc.py")

REWRITES = (
    (
        "from reflex.v1 import reflex_pb2 as reflex_dot_v1_dot_reflex__pb2",
        "from reflex_client._pb import reflex_pb2 as reflex_dot_v1_dot_reflex__pb2",
    ),
    ("'reflex.v1.reflex_pb2'", "'reflex_client._pb.reflex_pb2'"),
)


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc on the proto into `out_dir`; returns the written files."""
    from grpc_tools import protoc  # a dev dependency only

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO_FILE,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {PROTO_ROOT / PROTO_FILE}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in MODULES:
            text = (Path(tmp) / "reflex" / "v1" / name).read_text()
            for old, new in REWRITES:
                text = text.replace(old, new)
            if "from reflex." in text or "import reflex." in text:
                raise SystemExit(f"{name}: an import of the top-level `reflex` is left")
            dest = out_dir / name
            dest.write_text(text)
            written.append(dest)
        return written


def main() -> None:
    import grpc_tools

    version = getattr(grpc_tools, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("grpcio-tools")
    if version != GRPCIO_TOOLS_VERSION:
        print(
            f"warning: grpcio-tools {version}, the committed stubs come from "
            f"{GRPCIO_TOOLS_VERSION} (pip install grpcio-tools=={GRPCIO_TOOLS_VERSION})",
            file=sys.stderr,
        )
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(out):
        print(path)


if __name__ == "__main__":
    main()
