#!/usr/bin/env python3
"""Benchmark of reflex_client against a real `reflex serve`, side by side in one run:

1. Client overhead: the same Act calls (one pre-encoded 224×224 JPEG, instruction, state,
   fixed noise seed: every call a prefix-cache hit, the cheapest call there is, so the
   client's share is as large as it gets) through a raw grpcio `PolicyStub` with the
   request built once, the same stub with the request built per call (what hand-written
   code does), and `Client.act`, in shuffled order call by call so all see the same
   server and machine state; p50/p90/p99 and the p50 ratio to the prebuilt raw stub
   (goal ≤ 1.05×), over the Unix socket and over TCP with TLS + token. Then `Client.act`
   with a 640×480 array (resize + JPEG on the client) for reference.
2. A control loop: `ChunkBroker.run` at --hz for --loop-s seconds, a fresh 640×480 frame
   every tick (so every request misses the prefix cache, as a moving camera does); ticks,
   missed ticks, stalled ticks, lateness and time in `step()`.

Starts its own server on the reference export (`reflex export-demo`) in a temp dir:

    python3 proto/python/bench/bench_client.py [--reflex target/release/reflex]
        [--calls 500] [--loop-s 60] [--hz 50] [--engine cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
PACKAGE_ROOT = HERE.parent
REPO_ROOT = PACKAGE_ROOT.parent.parent
sys.path.insert(0, str(PACKAGE_ROOT))

from PIL import Image  # noqa: E402

from reflex_client import ChunkBroker, Client, Observation  # noqa: E402
from reflex_client._pb import reflex_pb2 as pb  # noqa: E402
from reflex_client._pb import reflex_pb2_grpc as pb_grpc  # noqa: E402

import grpc  # noqa: E402

STATE = [0.0, 0.2, 0.0, -1.8, 0.0, 2.0, 0.8, 0.04]
INSTRUCTION = "pick up the red cup"
TOKEN = "reflex-bench-token-0123456789abcdef"


def frame(h: int, w: int, shade: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [(x + shade) % 256, (3 * y) % 256, np.full_like(x, (7 * shade) % 256)], axis=-1
    ).astype(np.uint8)


def jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def secret(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


class Server:
    def __init__(self, binary: str, export: Path, d: Path, engine: str) -> None:
        tls = REPO_ROOT / "tests" / "fixtures" / "tls"
        self.sock = d / "reflex.sock"
        self.token = secret(d / "token", TOKEN.encode())
        key = secret(d / "server.key", (tls / "server.key").read_bytes())
        shutil.copy(tls / "server.crt", d / "server.crt")
        self.ca = tls / "ca.crt"
        self.log = d / "serve.log"
        self.proc = subprocess.Popen(
            [binary, "serve", str(export), "--engine", engine,
             "--listen", f"unix://{self.sock}", "--listen", "127.0.0.1:0",
             "--auth-token-file", str(self.token),
             "--tls-cert", str(d / "server.crt"), "--tls-key", str(key)],
            stderr=self.log.open("wb"), stdout=subprocess.DEVNULL,
            env=dict(os.environ, RUST_LOG="info"),
        )  # fmt: skip
        self.unix = f"unix://{self.sock}"
        with Client(self.unix) as c:
            self.info = c.wait_ready(60)
        deadline = time.monotonic() + 30
        while "listen=tcp://" not in self.log.read_text():
            if time.monotonic() > deadline:
                raise SystemExit(f"no TCP listener in the log:\n{self.log.read_text()}")
            time.sleep(0.02)
        line = next(x for x in self.log.read_text().splitlines() if "listen=tcp://" in x)
        self.https = "https://" + line.split("listen=tcp://", 1)[1].split()[0]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def overhead(name: str, client: Client, calls: int, ca: Path) -> dict[str, Any]:
    """Interleaved raw stub / Client.act on identical requests; ms per call."""
    img = jpeg(frame(224, 224, 1))
    req = pb.ActRequest(
        images=[pb.Image(camera="base", data=img)],
        instruction=INSTRUCTION,
        state=STATE,
        episode_id="bench",
        noise_seed=42,
    )
    # The raw stub shares nothing with the client but the server: its own channel, with
    # the options a user would have to know (authority on Unix, credentials on TLS).
    target = client.target
    if target.startswith("unix:"):
        ch = grpc.insecure_channel(target, options=[("grpc.default_authority", "localhost")])
        md: tuple[tuple[str, str], ...] = ()
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        ch = grpc.secure_channel(target[len("https://") :], creds)
        md = (("authorization", f"Bearer {TOKEN}"),)
    stub = pb_grpc.PolicyStub(ch)  # type: ignore[no-untyped-call]
    arr = frame(480, 640, 1)

    def raw() -> None:
        stub.Act(req, timeout=5.0, metadata=md)

    def raw_by_hand() -> None:
        # What hand-written grpcio code does per call: build the request, convert actions.
        r = stub.Act(
            pb.ActRequest(
                images=[pb.Image(camera="base", data=img)],
                instruction=INSTRUCTION,
                state=STATE,
                episode_id="bench",
                noise_seed=42,
            ),
            timeout=5.0,
            metadata=md,
        )
        np.array(r.actions, dtype=np.float32).reshape(r.num_actions, r.action_dim)

    def ours() -> None:
        client.act({"base": img}, INSTRUCTION, STATE, episode_id="bench", noise_seed=42)

    def ours_array() -> None:
        client.act({"base": arr}, INSTRUCTION, STATE, episode_id="bench", noise_seed=42)

    fns = {
        "raw grpcio stub, request prebuilt": raw,
        "raw grpcio stub, request built per call": raw_by_hand,
        "reflex_client Client.act (JPEG bytes)": ours,
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(20, calls // 10)):  # warm-up: connections, caches, allocator
        for f in fns.values():
            f()
    rng = random.Random(0)
    order = list(fns.items())
    for _ in range(calls):
        rng.shuffle(order)  # no caller always follows the same one
        for k, f in order:
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    # Arrays in (resize + JPEG on the client): apart, so its encoding does not disturb the
    # comparison above.
    key = "Client.act, 640×480 array (resized + encoded)"
    times[key] = []
    for _ in range(max(10, calls // 5)):
        t0 = time.perf_counter()
        ours_array()
        times[key].append((time.perf_counter() - t0) * 1e3)
    ch.close()
    rows = {
        k: {"p50": pct(v, 50), "p90": pct(v, 90), "p99": pct(v, 99), "calls": len(v)}
        for k, v in times.items()
    }
    base = rows["raw grpcio stub, request prebuilt"]["p50"]
    for r in rows.values():
        r["ratio_p50"] = r["p50"] / base
    return {"transport": name, "rows": rows}


def loop(client: Client, hz: float, seconds: float) -> dict[str, Any]:
    base = frame(480, 640, 3)
    counter = [0]

    def observe() -> Observation:
        # A fresh array per tick, as a camera gives, and unique content: every request
        # misses the prefix cache.
        counter[0] += 1
        f = base.copy()
        f[0, :8, 0] = np.frombuffer(counter[0].to_bytes(8, "little"), np.uint8)
        return Observation({"base": f}, INSTRUCTION, STATE, episode_id="bench-loop")

    rtts: list[float] = []
    with ChunkBroker(client, hz) as b:
        b.prime(observe())
        seen = [b.stats().chunks]

        def actuate(a: np.ndarray) -> None:
            s = b.stats()
            if s.chunks != seen[0]:
                seen[0] = s.chunks
                rtts.append(s.last_round_trip_ms)

        rep = b.run(observe, actuate, duration_s=seconds)
        st = b.stats()
    return {
        "hz": hz,
        "seconds": seconds,
        "ticks": rep.ticks,
        "missed_ticks": rep.missed_ticks,
        "stalled_ticks": rep.stalled_ticks,
        "fresh_ticks": rep.fresh_ticks,
        "rate_hz": rep.rate_hz,
        "lateness_p50_ms": rep.lateness_p50_ms,
        "lateness_p99_ms": rep.lateness_p99_ms,
        "lateness_max_ms": rep.lateness_max_ms,
        "step_p50_ms": rep.step_p50_ms,
        "step_p99_ms": rep.step_p99_ms,
        "step_max_ms": rep.step_max_ms,
        "requests": st.requests,
        "chunks": st.chunks,
        "errors": st.errors,
        "stale_chunks": st.stale_chunks,
        "round_trip_p50_ms": pct(rtts, 50) if rtts else float("nan"),
        "round_trip_p99_ms": pct(rtts, 99) if rtts else float("nan"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_bin = os.environ.get("REFLEX_BIN", str(REPO_ROOT / "target" / "release" / "reflex"))
    ap.add_argument("--reflex", default=default_bin, help="the reflex binary")
    ap.add_argument("--calls", type=int, default=500, help="Act calls per client kind and transport")
    ap.add_argument("--loop-s", type=float, default=60.0, help="seconds of the broker loop")
    ap.add_argument("--hz", type=float, default=50.0, help="the broker loop's rate")
    ap.add_argument("--engine", default="cpu", help="reflex serve --engine")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reflex-bench-") as tmp:
        d = Path(tmp)
        export = d / "export"
        subprocess.run([args.reflex, "export-demo", str(export)], check=True, capture_output=True)
        srv = Server(args.reflex, export, d, args.engine)
        try:
            results = {
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, grpcio {grpc.__version__}",
                "engine": args.engine,
                "overhead": [],
            }
            with Client(srv.unix) as c:
                results["overhead"].append(overhead("unix socket", c, args.calls, srv.ca))
            with Client(srv.https, token_file=srv.token, ca_file=srv.ca) as c:
                results["overhead"].append(overhead("tcp + tls + token", c, args.calls, srv.ca))
            with Client(srv.unix) as c:
                results["loop"] = loop(c, args.hz, args.loop_s)
        finally:
            srv.stop()
    print(f"machine: {results['machine']}; engine {results['engine']}\n")
    print("| transport | caller | p50 ms | p90 ms | p99 ms | p50 vs raw |")
    print("|---|---|---|---|---|---|")
    for o in results["overhead"]:
        for k, r in o["rows"].items():
            print(f"| {o['transport']} | {k} | {r['p50']:.3f} | {r['p90']:.3f} | {r['p99']:.3f} | {r['ratio_p50']:.3f}× |")
    lp = results["loop"]
    print(
        f"\nbroker loop: {lp['hz']:.0f} Hz for {lp['seconds']:.0f} s: {lp['ticks']} ticks, "
        f"{lp['missed_ticks']} missed, {lp['stalled_ticks']} stalled, {lp['fresh_ticks']} fresh; "
        f"rate {lp['rate_hz']:.3f} Hz; tick lateness p50/p99/max {lp['lateness_p50_ms']:.3f}/"
        f"{lp['lateness_p99_ms']:.3f}/{lp['lateness_max_ms']:.3f} ms; step() p50/p99/max "
        f"{lp['step_p50_ms']:.3f}/{lp['step_p99_ms']:.3f}/{lp['step_max_ms']:.3f} ms; "
        f"{lp['requests']} requests, {lp['errors']} errors, {lp['stale_chunks']} stale chunks, "
        f"chunk round trip p50/p99 {lp['round_trip_p50_ms']:.2f}/{lp['round_trip_p99_ms']:.2f} ms"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    ok = lp["missed_ticks"] == 0 and lp["stalled_ticks"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
