"""Fixtures that run the real `reflex` binary: one reference export per session, and per
test a temp dir with servers on a Unix socket (and TCP with TLS + token when asked),
waited on through gRPC health, killed at the end. Every wait is bounded.

The binary is `$REFLEX_BIN` (tests/python_client.rs sets it), else the workspace's
target/release/reflex or target/debug/reflex; a missing binary fails the tests.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
PACKAGE_ROOT = HERE.parent
REPO_ROOT = PACKAGE_ROOT.parent.parent
TLS_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "tls"

# Make the package importable from the source tree without installing it.
sys.path.insert(0, str(PACKAGE_ROOT))

from reflex_client import Client  # noqa: E402

#: Every wait on a process or a socket is bounded by this.
WAIT_S = 30.0
#: A test that runs longer than this dumps every thread's stack and exits (no CI hang).
TEST_LIMIT_S = 180

TOKEN = "reflex-python-test-token-0123456789abcdef"


def reflex_bin() -> Path:
    env = os.environ.get("REFLEX_BIN")
    if env:
        return Path(env)
    for profile in ("release", "debug"):
        p = REPO_ROOT / "target" / profile / "reflex"
        if p.exists():
            return p
    pytest.fail("no reflex binary: set REFLEX_BIN or run `cargo build --release` first")


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(TEST_LIMIT_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def control_priority() -> Iterator[None]:
    """Runs the test (and the servers it starts) at nice -10 where allowed, as a robot's
    control process runs above its neighbours: on a shared two-core machine a loop at the
    default priority can wait a whole 20 ms tick for a core, which says nothing about the
    broker. Without the privilege the test runs as it is."""
    try:
        os.nice(-10)
        raised = True
    except PermissionError:
        raised = False
    yield
    if raised:
        os.nice(10)


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("export") / "reference"
    out = subprocess.run(
        [str(reflex_bin()), "export-demo", str(d)], capture_output=True, text=True, timeout=WAIT_S
    )
    assert out.returncode == 0, f"export-demo failed:\n{out.stderr}"
    return d


def write_secret(path: Path, data: bytes) -> Path:
    """A 0600 file: reflex refuses secrets that other users can read."""
    path.write_bytes(data)
    path.chmod(0o600)
    return path


class Server:
    """A `reflex serve` child; stderr collected in the background."""

    def __init__(self, args: list[str], name: str) -> None:
        self.args = args
        self.name = name
        self.log = ""
        self._log_lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self._orphans: list[subprocess.Popen[bytes]] = []
        self.start()

    def start(self, prelude: str = "") -> None:
        """Starts the server, after the shell commands `prelude` when given."""
        env = dict(os.environ, RUST_LOG="info")
        cmd = [str(reflex_bin()), *self.args]
        if prelude:
            cmd = ["sh", "-c", f'{prelude}; exec "$0" "$@"', *cmd]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for line in iter(proc.stderr.readline, b""):
            with self._log_lock:
                self.log += line.decode(errors="replace")

    def wait_for_log(self, needle: str, after: int = 0) -> str:
        """The first log line (from offset `after`) containing `needle`."""
        deadline = time.monotonic() + WAIT_S
        while True:
            with self._log_lock:
                text = self.log[after:]
            for line in text.splitlines():
                if needle in line:
                    return line
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no log line with {needle!r}:\n{self.log}")
            time.sleep(0.02)

    def tcp_addr(self, after: int = 0) -> str:
        line = self.wait_for_log("listen=tcp://", after)
        return line.split("listen=tcp://", 1)[1].split()[0]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill_and_restart_later(self, kill_after_s: float, restart_after_s: float) -> None:
        """Returns at once; a shell kills -9 this server after `kill_after_s` and starts
        it again `restart_after_s` later. For tests that restart a server under a running
        control loop: forking from the loop's own process while it runs would stall the
        loop (the fork holds the GIL), a cost of the test, not of the client."""
        assert self.proc is not None
        old = self.proc
        self._orphans.append(old)
        self.start(f"sleep {kill_after_s}; kill -9 {old.pid}; sleep {restart_after_s}")

    def kill(self) -> None:
        """kill -9 and reap (a SIGSTOPped child is killed too)."""
        for p in [*self._orphans, self.proc]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=WAIT_S)
        self._orphans.clear()


def wait_healthy(target: str, server: Server) -> None:
    """Polls grpc.health.v1 until SERVING (never a sleep on a guess)."""
    deadline = time.monotonic() + WAIT_S
    with Client(target) as c:
        while not c.health(timeout_s=1.0):
            if server.proc is not None and server.proc.poll() is not None:
                raise AssertionError(f"{server.name} exited:\n{server.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{server.name} never became healthy:\n{server.log}")
            time.sleep(0.025)


@dataclass
class Served:
    """A running server and how to reach it."""

    server: Server
    unix: str
    #: "https://127.0.0.1:PORT" when started with tls=True, else None.
    https: str | None
    token_file: Path | None
    ca_file: Path | None
    dir: Path

    def client(self, **kw: object) -> Client:
        return Client(self.unix, **kw)  # type: ignore[arg-type]

    def tls_client(self, **kw: object) -> Client:
        assert self.https is not None
        return Client(self.https, token_file=self.token_file, ca_file=self.ca_file, **kw)  # type: ignore[arg-type]

    def wait_healthy(self) -> None:
        wait_healthy(self.unix, self.server)


@pytest.fixture
def serve(tmp_path: Path, export_dir: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    """`serve(tls=False, extra=[])` starts `reflex serve` on a Unix socket in the test's temp
    dir (and, with tls=True, on 127.0.0.1:0 with TLS and a bearer token) and waits for
    health."""
    started: list[Server] = []

    def start(tls: bool = False, extra: list[str] | None = None, name: str = "serve") -> Served:
        d = tmp_path / name
        d.mkdir()
        sock = d / "reflex.sock"
        args = ["serve", str(export_dir), "--listen", f"unix://{sock}"]
        token_file = ca_file = None
        if tls:
            token_file = write_secret(d / "token", f"{TOKEN}\n".encode())
            key = write_secret(d / "server.key", (TLS_FIXTURES / "server.key").read_bytes())
            cert = d / "server.crt"
            shutil.copy(TLS_FIXTURES / "server.crt", cert)
            ca_file = TLS_FIXTURES / "ca.crt"
            args += [
                "--listen", "127.0.0.1:0",
                "--auth-token-file", str(token_file),
                "--tls-cert", str(cert),
                "--tls-key", str(key),
            ]  # fmt: skip
        args += extra or []
        s = Server(args, f"reflex {name}")
        started.append(s)
        served = Served(s, f"unix://{sock}", None, token_file, ca_file, d)
        served.wait_healthy()
        if tls:
            served.https = f"https://{s.tcp_addr()}"
        return served

    yield start
    for s in started:
        if s.proc is not None and s.proc.poll() is None:
            s.signal(signal.SIGCONT)  # a test that failed mid-SIGSTOP
        s.kill()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for s in started:
            print(f"----- {s.name} stderr -----\n{s.log}", file=sys.stderr)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def frame(shade: int = 0, h: int = 480, w: int = 640) -> np.ndarray:
    """An HWC uint8 test frame whose content depends on `shade`."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [(x + shade) % 256, (3 * y) % 256, np.full_like(x, (7 * shade) % 256)], axis=-1
    ).astype(np.uint8)


STATE = np.array([0.0, 0.2, 0.0, -1.8, 0.0, 2.0, 0.8, 0.04], dtype=np.float32)
