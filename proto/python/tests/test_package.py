"""The package itself: stubs fresh from the proto, no top-level `reflex`, and a wheel built
with `pip wheel` that installs beside the seed tool's reflex-vla and talks to a server."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import PACKAGE_ROOT, STATE, WAIT_S

sys.path.insert(0, str(PACKAGE_ROOT / "tools"))
import generate_stubs  # noqa: E402

REFLEX_VLA = "reflex-vla==0.11.2"


def test_committed_stubs_are_what_the_proto_generates(tmp_path: Path) -> None:
    from importlib.metadata import version

    installed = version("grpcio-tools")
    assert installed == generate_stubs.GRPCIO_TOOLS_VERSION, (
        f"grpcio-tools {installed} is installed; the stubs are checked against "
        f"{generate_stubs.GRPCIO_TOOLS_VERSION} (deploy/ci-setup.sh installs it)"
    )
    generate_stubs.generate(tmp_path)
    for name in generate_stubs.MODULES:
        fresh = (tmp_path / name).read_text()
        committed = (generate_stubs.DEFAULT_OUT / name).read_text()
        assert fresh == committed, (
            f"reflex_client/_pb/{name} is stale: run python3 proto/python/tools/generate_stubs.py"
        )


def test_the_descriptor_matches_the_proto(tmp_path: Path) -> None:
    """Independent of the generator's version: the committed descriptor is the proto's."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "reflex.pb"
    rc = protoc.main(
        ["protoc", f"-I{generate_stubs.PROTO_ROOT}", f"--descriptor_set_out={out}", generate_stubs.PROTO_FILE]
    )
    assert rc == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    from reflex_client._pb import reflex_pb2

    committed = descriptor_pb2.FileDescriptorProto.FromString(reflex_pb2.DESCRIPTOR.serialized_pb)
    assert committed.name == "reflex/v1/reflex.proto"
    fresh = fds.file[0]
    fresh.ClearField("source_code_info")
    # A descriptor set spells out every json_name; the gencode keeps the explicit ones.
    assert _with_json_names(committed) == _with_json_names(fresh)


def _with_json_names(fdp):  # type: ignore[no-untyped-def]
    def camel(name: str) -> str:
        head, *rest = name.split("_")
        return head + "".join(p[:1].upper() + p[1:] for p in rest)

    def fill(messages) -> None:  # type: ignore[no-untyped-def]
        for m in messages:
            for f in m.field:
                if not f.HasField("json_name"):
                    f.json_name = camel(f.name)
            fill(m.nested_type)

    fill(fdp.message_type)
    return fdp


def test_no_top_level_reflex_module() -> None:
    code = "import sys, reflex_client, reflex_client._pb.reflex_pb2_grpc; print('reflex' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=WAIT_S
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    for f in (PACKAGE_ROOT / "reflex_client").rglob("*.py"):
        text = f.read_text()
        assert "from reflex." not in text and "import reflex\n" not in text, f


def test_wheel_installs_beside_reflex_vla_and_both_import(tmp_path: Path, serve) -> None:
    s = serve()
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    r = subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(wheels), str(PACKAGE_ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (wheel,) = wheels.glob("reflex_client-*.whl")
    # A venv that sees grpcio/numpy/pillow from the test's interpreter but installs both
    # packages itself, reflex-vla without its (torch-sized) dependencies.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    py = env_dir / "bin" / "python"
    r = subprocess.run(
        [*pip, "--python", str(py), "install", "--no-deps", str(wheel), REFLEX_VLA],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if r.returncode != 0 and "no such option: --python" in r.stderr:  # pip < 22.3
        pytest.fail(f"pip too old for --python: {r.stderr}")
    assert r.returncode == 0, r.stderr
    code = f"""
import sys, importlib.metadata as md
import reflex, reflex_client
from reflex_client._pb import reflex_pb2, reflex_pb2_grpc
assert reflex.__version__ == "0.11.2", reflex.__version__
assert md.version("reflex-vla") == "0.11.2" and md.version("reflex-client") == reflex_client.__version__
assert reflex_client.__file__.startswith(sys.prefix), reflex_client.__file__
assert reflex.__file__.startswith(sys.prefix), reflex.__file__
import numpy as np
with reflex_client.Client({s.unix!r}) as c:
    ch = c.act({{"base": np.zeros((100, 100, 3), np.uint8)}}, "pick", {STATE.tolist()!r})
    assert ch.actions.shape == (50, 7)
print("ok", reflex.__file__, reflex_client.__file__)
"""
    r = subprocess.run(
        [str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_S
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok "), r.stdout


def test_the_package_type_checks_strictly() -> None:
    """py.typed promises types: mypy --strict (pyproject's [tool.mypy]) finds nothing."""
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir=/dev/null", "reflex_client"],
        cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
