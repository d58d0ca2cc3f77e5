"""Fleet regression replay on Ray: the records of reflex traces spread over several
`reflex serve` targets, one Ray actor per target, merged into the report shape of
`reflex replay --output` (README, "Replay report").

    python3 -m reflex_client.ray_replay --targets unix:///a.sock,host:50051 \\
        traces/ more.jsonl.gz --output report.json

What it does, in order: list the trace files (a folder means every *.jsonl / *.jsonl.gz
under it, sorted by path, as `reflex replay` does); read them here (plain or gzip JSON
lines; schema v1 in the repository's SPEC.md); start a local Ray (loopback only, no
dashboard) unless one is running; one `TargetActor` per target; hand each live actor
batches of records; merge the answers.

**A target dies** when a call to it fails with UNAVAILABLE (connection refused or reset,
the process killed) where the recorded call did not, or when its actor process dies: the
actor stops at that record and hands back the rest of its batch, and every unfinished
record of that target goes to the live ones (`failed_over`). Every record is answered
once. A run where every target died exits 2 with `error` naming each target.

**What is compared.** Actions (cos and max_abs of the flattened chunks, computed in the
same order and precision as `reflex replay`, so the numbers are equal), and for a record
whose call failed when recorded, whether the target fails too (any code: looser than
`reflex replay`'s same-class rule). Latency and cache diffs, `--image-dir` (hash_only
traces) and the seed tool's traces are `reflex replay`'s alone: this module needs traces
recorded with `--record-images full`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format

from reflex_client._pb import reflex_pb2 as pb

# The thresholds of `reflex replay` (replayer/src/diff.rs).
MIN_COS = 0.999
MAX_ABS = 1e-3
CALL_TIMEOUT_S = 60.0


def trace_files(paths: list[str]) -> list[str]:
    """The trace files named by `paths`, sorted by path (component by component, as
    `reflex replay` sorts), without duplicates. A folder gives every *.jsonl /
    *.jsonl.gz under it, recursively; one with none is an error."""
    out: set[str] = set()
    for p in paths:
        if os.path.isdir(p):
            found = [
                os.path.join(root, n)
                for root, _, names in os.walk(p, followlinks=True)
                for n in names
                if n.endswith(".jsonl") or n.endswith(".jsonl.gz")
            ]
            if not found:
                raise ValueError(f"{p}: no *.jsonl or *.jsonl.gz trace files in this folder")
            out.update(found)
        else:
            out.add(p)
    return sorted(out, key=lambda s: s.split(os.sep))


def read_trace(path: str) -> tuple[dict[str, Any], list[tuple[int, dict[str, Any]]]]:
    """(header, [(1-based line, request record)]). A last line cut by a crash is skipped,
    as the recorder's reader does; any other bad line is an error."""
    with open(path, "rb") as f:
        magic = f.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    header: dict[str, Any] | None = None
    records: list[tuple[int, dict[str, Any]]] = []
    with opener(path, "rt", encoding="utf-8") as f:
        try:
            lines = f.read().split("\n")
        except EOFError:  # a gzip stream cut by a crash: nothing here reads it part-way
            raise ValueError(f"{path}: the gzip stream is cut; use `reflex replay` for crash-cut traces")
    for i, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            if i == len(lines) or (i == len(lines) - 1 and not lines[-1]):
                break  # the tail a crash cut
            raise ValueError(f"{path}:{i}: not a JSON line: {e}") from None
        if rec.get("schema_version") != 1:
            raise ValueError(f"{path}:{i}: schema_version {rec.get('schema_version')!r} is not 1")
        kind = rec.get("kind")
        if kind == "header" and header is None:
            header = rec
        elif kind == "request":
            records.append((i, rec))
    if header is None:
        raise ValueError(f"{path}: no header line")
    return header, records


def build_request(record: dict[str, Any]) -> bytes:
    """The ActRequest a record was (its `request` is the protobuf JSON of it), with the
    noise seed the call drew, serialized."""
    req = json_format.ParseDict(record["request"], pb.ActRequest(), ignore_unknown_fields=True)
    seed = record.get("noise_seed", record["request"].get("noise_seed"))
    if seed is not None:
        req.noise_seed = int(seed)
    if not req.images and not req.image_b64:
        raise ValueError(
            f"seq {record.get('seq')}: the trace holds no image bytes (record with --record-images full)"
        )
    out: bytes = req.SerializeToString()
    return out


def _f32(x: float | None) -> float:
    """A JSON number as the f32 the recorder wrote (null is NaN)."""
    import struct

    if x is None:
        return math.nan
    value: float = struct.unpack("<f", struct.pack("<f", float(x)))[0]
    return value


def actions_diff(
    recorded: list[float], rec_shape: tuple[int, int], replayed: list[float], rep_shape: tuple[int, int]
) -> dict[str, Any]:
    """`reflex replay`'s actions diff: the same sums in the same order in f64."""
    if len(recorded) != len(replayed) or rec_shape != rep_shape:
        return {
            "cos": None,
            "max_abs": None,
            "pass": False,
            "note": f"shape {rec_shape[0]}x{rec_shape[1]} ({len(recorded)} values) → "
            f"{rep_shape[0]}x{rep_shape[1]} ({len(replayed)} values)",
        }
    dot = na = nb = max_abs = 0.0
    identical = True
    for a, b in zip(recorded, replayed):
        same = a == b or (math.isnan(a) and math.isnan(b))
        identical &= same and (math.copysign(1, a) == math.copysign(1, b))
        if math.isnan(a) and math.isnan(b):
            continue
        d = abs(a - b)
        max_abs = math.inf if math.isnan(d) else max(max_abs, d)
        if math.isfinite(a) and math.isfinite(b):
            dot += a * b
            na += a * a
            nb += b * b
    if identical or (na == 0.0 and nb == 0.0):
        cos = 1.0
    elif na == 0.0 or nb == 0.0:
        cos = 0.0
    else:
        cos = min(1.0, max(-1.0, dot / (math.sqrt(na) * math.sqrt(nb))))
    return {"cos": cos, "max_abs": max_abs, "pass": cos >= MIN_COS and max_abs < MAX_ABS}


def compare(record: dict[str, Any], line: int, answer: tuple[bool, Any]) -> dict[str, Any]:
    """One entry of `requests`: the record against the target's answer, which is
    (True, ActResponse bytes) or (False, (code name, message))."""
    ok, value = answer
    out: dict[str, Any] = {"seq": record["seq"], "line": line, "status": "replayed"}
    recorded_error = record.get("error")
    if recorded_error:
        replayed = None if ok else {"code": value[0], "message": value[1]}
        out["error"] = {"recorded": recorded_error, "replayed": replayed, "pass": not ok}
        return out
    resp_rec = record.get("response") or {}
    rec_actions = [_f32(v) for row in resp_rec.get("actions", []) for v in row]
    rec_shape = (int(resp_rec.get("num_actions", 0)), int(resp_rec.get("action_dim", 0)))
    if ok:
        resp = pb.ActResponse.FromString(value)
        out["actions"] = actions_diff(
            rec_actions, rec_shape, list(resp.actions), (resp.num_actions, resp.action_dim)
        )
    else:
        out["status"] = "target_error"
        out["actions"] = {"cos": None, "max_abs": None, "pass": False, "note": f"target error {value[0]}"}
        out["error"] = {"recorded": None, "replayed": {"code": value[0], "message": value[1]}, "pass": False}
    return out


def _dead_status(code: grpc.StatusCode, record: dict[str, Any]) -> bool:
    """A failure that says the target is gone, not that the call failed."""
    recorded = (record.get("error") or {}).get("slug", "")
    return code == grpc.StatusCode.UNAVAILABLE and "unavailable" not in recorded


class TargetActor:
    """Drives one server: calls a batch of records one after another and answers for
    each (key, ok, payload); on a dead-target failure it stops and returns the keys it
    did not finish. Made a Ray actor by `ray.remote` in `run`."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        opts: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 << 20)]
        if uri.startswith("unix:"):
            opts.append(("grpc.default_authority", "localhost"))
        address = uri[len("http://") :] if uri.startswith("http://") else uri
        self.channel = grpc.insecure_channel(address, options=opts)
        self.act = self.channel.unary_unary(
            "/reflex.v1.Policy/Act", request_serializer=None, response_deserializer=None
        )

    def replay(self, batch: list[tuple[Any, bytes, bool]]) -> dict[str, Any]:
        """`batch`: (key, ActRequest bytes, whether the record failed with UNAVAILABLE
        when recorded). Returns {"done": [(key, ok, payload, seconds)], "left": [keys],
        "dead": None or the reason}."""
        done: list[tuple[Any, bool, Any, float]] = []
        for i, (key, req, recorded_unavailable) in enumerate(batch):
            t0 = time.monotonic()
            try:
                resp = self.act(req, timeout=CALL_TIMEOUT_S)
                done.append((key, True, resp, time.monotonic() - t0))
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE and not recorded_unavailable:
                    return {
                        "done": done,
                        "left": [k for k, _, _ in batch[i:]],
                        "dead": f"{e.details()} (UNAVAILABLE) at {key}",
                    }
                done.append((key, False, (code.name, e.details() or ""), time.monotonic() - t0))
        return {"done": done, "left": [], "dead": None}


@dataclass
class _Target:
    uri: str
    actor: Any
    replayed: int = 0
    failed_over_from: int = 0
    dead: bool = False
    error: str | None = None
    in_flight: int = 0
    latencies_ms: list[float] = field(default_factory=list)


def _quantile(v: list[float], q: float) -> float | None:
    if not v:
        return None
    s = sorted(v)
    rank = min(max(math.ceil(q * len(s)), 1), len(s))
    return s[rank - 1]


def run(
    paths: list[str],
    targets: list[str],
    batch: int = 8,
    batches_in_flight: int = 2,
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Replays `paths` over `targets` on Ray; returns the report (with `exit_code`)."""
    import ray

    files = trace_files(paths)
    traces = [read_trace(p) for p in files]
    several = len(files) > 1
    records: dict[tuple[int, int], tuple[dict[str, Any], int]] = {}
    queue: deque[tuple[int, int]] = deque()
    requests: dict[tuple[int, int], bytes] = {}
    for ti, (_, recs) in enumerate(traces):
        for j, (line, rec) in enumerate(recs):
            key = (ti, j)
            records[key] = (rec, line)
            requests[key] = build_request(rec)
            queue.append(key)

    started_ray = False
    if not ray.is_initialized():
        # Loopback only, no dashboard: a replay opens no port to the network.
        ray.init(
            address="local",
            include_dashboard=False,
            num_cpus=num_cpus or max(2, len(targets)),
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
        )
        started_ray = True
    try:
        actor_cls = ray.remote(num_cpus=0, max_restarts=0)(TargetActor)
        slots = [_Target(uri, actor_cls.remote(uri)) for uri in targets]
        pending: dict[Any, tuple[int, list[tuple[int, int]]]] = {}
        results: dict[tuple[int, int], dict[str, Any]] = {}
        failed_over = 0

        def recorded_unavailable(key: tuple[int, int]) -> bool:
            return "unavailable" in ((records[key][0].get("error") or {}).get("slug", ""))

        def kill(t: _Target, reason: str) -> None:
            if not t.dead:
                t.dead, t.error = True, reason
                print(f"warning: target {t.uri} died: {reason}", file=sys.stderr)

        while True:
            for ti, t in enumerate(slots):
                while not t.dead and t.in_flight < batches_in_flight and queue:
                    keys = [queue.popleft() for _ in range(min(batch, len(queue)))]
                    ref = t.actor.replay.remote([(k, requests[k], recorded_unavailable(k)) for k in keys])
                    pending[ref] = (ti, keys)
                    t.in_flight += 1
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            ti, keys = pending.pop(ref)
            t = slots[ti]
            t.in_flight -= 1
            try:
                out = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # the actor process is gone
                kill(t, f"its Ray actor died: {e}")
                out = {"done": [], "left": keys, "dead": t.error}
            for key, ok, payload, seconds in out["done"]:
                rec, line = records[key]
                r = compare(rec, line, (ok, payload))
                if several:
                    r = {"trace": files[key[0]], **r}
                results[key] = r
                t.replayed += 1
                t.latencies_ms.append(seconds * 1000.0)
            # One progress line per batch (stdout; the summary line follows at the end).
            print(
                f"batch: target={ti} answered={len(out['done'])} handed_back={len(out['left'])}",
                flush=True,
            )
            if out["dead"]:
                kill(t, out["dead"])
            if out["left"]:
                t.failed_over_from += len(out["left"])
                failed_over += len(out["left"])
                # Back to the front: the next live target takes them first.
                queue.extendleft(reversed([tuple(k) for k in out["left"]]))
            if queue and all(s.dead for s in slots):
                break
    finally:
        if started_ray:
            ray.shutdown()

    ordered = [results[k] for k in sorted(results)]
    summary: dict[str, Any] = {
        "records": len(ordered),
        "replayed": len(ordered),
        "diffed": sum(1 for r in ordered if "actions" in r and not (r.get("error") or {}).get("recorded")),
        "not_replayed": 0,
        "target_errors": sum(1 for r in ordered if r["status"] == "target_error"),
        "actions": {"pass": 0, "fail": 0, "total": 0},
        "errors": {"pass": 0, "fail": 0, "total": 0},
        "failed_over": failed_over,
        "dead_targets": sum(1 for s in slots if s.dead),
        "stopped": None,
    }
    for r in ordered:
        diff = r.get("error")
        if diff and diff.get("recorded"):
            tally = summary["errors"]
            ok = diff["pass"]
        else:
            tally = summary["actions"]
            ok = r["actions"]["pass"]
        tally["total"] += 1
        tally["pass" if ok else "fail"] += 1
    left = len(queue)
    error = None
    exit_code = 0
    if left:
        summary["stopped"] = "all_targets_dead"
        why = "; ".join(f"{s.uri}: {s.error}" for s in slots)
        error = f"every target died ({why}); {left} records were not replayed"
        exit_code = 2
    elif summary["target_errors"]:
        error = f"{summary['target_errors']} calls that succeeded when recorded failed on a target"
        exit_code = 2
    return {
        "report_version": 1,
        "trace": paths[0],
        "header": traces[0][0],
        "summary": summary,
        "requests": ordered,
        "traces": [
            {
                "path": p,
                "model_hash": h.get("model_hash", ""),
                "session_id": h.get("session_id", ""),
                "records": len(recs),
            }
            for p, (h, recs) in zip(files, traces)
        ],
        "targets": [
            {
                "uri": s.uri,
                "replayed": s.replayed,
                "failed_over_from": s.failed_over_from,
                "dead": s.dead,
                "error": s.error,
                "latency_p50_ms": _quantile(s.latencies_ms, 0.50),
                "latency_p99_ms": _quantile(s.latencies_ms, 0.99),
            }
            for s in slots
        ],
        "warnings": [],
        "error": error,
        "exit_code": exit_code,
        "runner": "ray",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python3 -m reflex_client.ray_replay",
        description="Replay reflex traces (full image mode) over several reflex serve targets, "
        "one Ray actor per target, into reflex replay's report shape. Exit codes: 0 passed, "
        "1 trace error, 2 every target died or a target failed calls that succeeded when recorded.",
    )
    ap.add_argument("traces", nargs="+", metavar="TRACE", help="trace files or folders (recursive)")
    ap.add_argument("--target", action="append", default=[], metavar="URI", help="a server (repeatable)")
    ap.add_argument("--targets", default="", metavar="URI,URI,...", help="comma-separated servers")
    ap.add_argument("--output", metavar="PATH", help="write the JSON report here")
    ap.add_argument("--batch", type=int, default=8, help="records per actor call (default 8)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: max(2, targets))")
    a = ap.parse_args(argv)
    targets = a.target + [t for t in a.targets.split(",") if t]
    if not targets:
        ap.error("give --target URI (repeatable) or --targets URI,URI")
    try:
        report = run(a.traces, targets, batch=max(1, a.batch), num_cpus=a.num_cpus)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    s = report["summary"]
    print(
        f"replayed: {s['replayed']} actions: {s['actions']['pass']}/{s['actions']['total']} pass "
        f"failed_over: {s['failed_over']} dead_targets: {s['dead_targets']}"
    )
    if report["error"]:
        print(f"error: {report['error']}", file=sys.stderr)
    if a.output:
        tmp = a.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, a.output)
    return int(report["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
