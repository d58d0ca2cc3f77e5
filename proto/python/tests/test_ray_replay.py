"""`python3 -m reflex_client.ray_replay` against real `reflex serve` targets on a local
Ray, compared with `reflex replay`'s report of the same traces; a target SIGKILLed before
the run is taken over by the others.

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
from pathlib import Path

from conftest import STATE, frame, reflex_bin


def _ray_replay(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`python3 -m reflex_client.ray_replay ARGS` in a loopback-only network namespace."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = "exec " + shlex.join([sys.executable, "-m", "reflex_client.ray_replay", *args])
    return subprocess.run(
        ["unshare", "-n", "sh", "-c", f"ip link set lo up && {cmd}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )

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

    # One target is gone before Ray starts: its actor's first call finds it dead and its
    # records go to the others.
    targets[1].server.signal(signal.SIGKILL)
    targets[1].server.proc.wait(timeout=10)
    out = tmp_path / "ray.json"
    p = _ray_replay(["--targets", ",".join(uris), str(traces), "--output", str(out), "--batch", "4"])
    assert p.returncode == 0, p.stdout + p.stderr
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
    assert dead["dead"] and dead["error"] and dead["replayed"] == 0, dead
    assert dead["failed_over_from"] == got["summary"]["failed_over"]
    assert sum(t["replayed"] for t in got["targets"]) == SESSIONS * CALLS


def test_ray_replay_with_every_target_dead_exits_2(serve, tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    _record(serve, traces)
    t = serve(name="target")
    t.server.signal(signal.SIGKILL)
    t.server.proc.wait(timeout=10)
    out = tmp_path / "ray.json"
    p = _ray_replay(["--target", t.unix, str(traces), "--output", str(out)])
    assert p.returncode == 2, p.stdout + p.stderr
    got = json.loads(out.read_text())
    assert got["exit_code"] == 2
    assert got["summary"]["stopped"] == "all_targets_dead"
    assert t.unix in got["error"] and "every target died" in got["error"]
