"""`python3 -m reflex_client.ray_replay` against real `reflex serve` targets on a local
Ray, compared with `reflex replay`'s report of the same traces; a target SIGKILLed mid-run
is taken over by the others.

Ray 2.60's gcs_server, raylet and workers listen on every interface (`*:PORT`) even with
`_node_ip_address="127.0.0.1"`, and its runtime-env agent on the host's address. So the
module runs in a network namespace of its own with loopback only (`unshare -n`, root, as
CI runs): nothing it starts can listen off loopback. The targets are Unix sockets, which a
network namespace does not hide."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

from conftest import STATE, frame, reflex_bin


def _ray_replay(args: list[str], on_batch=None) -> tuple[int, str, str]:
    """`python3 -m reflex_client.ray_replay ARGS` in a loopback-only network namespace;
    `on_batch(n)` is called after its n-th `batch:` progress line. (code, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = "exec " + shlex.join([sys.executable, "-m", "reflex_client.ray_replay", *args])
    p = subprocess.Popen(
        ["unshare", "-n", "sh", "-c", f"ip link set lo up && {cmd}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    err: list[str] = []
    t = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    t.start()
    out, n = [], 0
    for line in p.stdout:
        out.append(line)
        if line.startswith("batch:"):
            n += 1
            if on_batch:
                on_batch(n)
    code = p.wait(timeout=300)
    t.join(timeout=10)
    return code, "".join(out), "".join(err)

SESSIONS = 2
CALLS = 30


def _record(serve, traces: Path) -> list[Path]:
    for s in range(SESSIONS):
        srv = serve(extra=["--record", str(traces), "--record-images", "full"], name=f"rec{s}")
        with srv.client() as c:
            for i in range(CALLS):
                c.act({"base": frame((i + s) % 5 * 30)}, "pick up the red cup", STATE)
        srv.server.signal(signal.SIGTERM)
        assert srv.server.proc.wait(timeout=20) == 0
    files = sorted(traces.glob("*.jsonl.gz"))
    assert len(files) == SESSIONS
    return files


def _essentials(r: dict) -> tuple:
    a = r.get("actions") or {}
    return (r.get("trace"), r["seq"], r["line"], r["status"], a.get("cos"), a.get("max_abs"), a.get("pass"))


def test_ray_replay_matches_reflex_replay_and_fails_over(serve, tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    _record(serve, traces)
    targets = [serve(name=f"target{i}") for i in range(3)]
    uris = [t.unix for t in targets]

    # The reference: reflex replay's fleet run over the same folder.
    ref_out = tmp_path / "reflex.json"
    p = subprocess.run(
        [str(reflex_bin()), "replay", str(traces), "--targets", ",".join(uris), "--output", str(ref_out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    ref = json.loads(ref_out.read_text())

    # Target 1 is SIGKILLed once the first batch is answered (every actor has batches in
    # flight then): what it had not answered goes to the others.
    def kill_target_1(n: int) -> None:
        if n == 1:
            targets[1].server.signal(signal.SIGKILL)

    out = tmp_path / "ray.json"
    code, stdout, stderr = _ray_replay(
        ["--targets", ",".join(uris), str(traces), "--output", str(out), "--batch", "4"], kill_target_1
    )
    assert code == 0, stdout + stderr
    assert targets[1].server.proc.wait(timeout=10) is not None
    got = json.loads(out.read_text())

    assert got["report_version"] == 1
    for k in ("records", "replayed", "diffed"):
        assert got["summary"][k] == ref["summary"][k] == SESSIONS * CALLS, k
    assert got["summary"]["target_errors"] == ref["summary"]["target_errors"] == 0
    assert got["summary"]["actions"] == ref["summary"]["actions"]
    assert got["summary"]["actions"]["pass"] == SESSIONS * CALLS
    assert [_essentials(r) for r in got["requests"]] == [_essentials(r) for r in ref["requests"]]
    assert [t["path"] for t in got["traces"]] == [t["path"] for t in ref["traces"]]

    assert got["summary"]["dead_targets"] == 1
    assert got["summary"]["failed_over"] > 0
    dead = got["targets"][1]
    assert dead["dead"] and dead["error"], dead
    assert dead["failed_over_from"] == got["summary"]["failed_over"]
    assert sum(t["replayed"] for t in got["targets"]) == SESSIONS * CALLS


def test_ray_replay_with_every_target_dead_exits_2(serve, tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    _record(serve, traces)
    t = serve(name="target")
    t.server.signal(signal.SIGKILL)
    t.server.proc.wait(timeout=10)
    out = tmp_path / "ray.json"
    code, stdout, stderr = _ray_replay(["--target", t.unix, str(traces), "--output", str(out)])
    assert code == 2, stdout + stderr
    got = json.loads(out.read_text())
    assert got["exit_code"] == 2
    assert got["summary"]["stopped"] == "all_targets_dead"
    assert t.unix in got["error"] and "every target died" in got["error"]
