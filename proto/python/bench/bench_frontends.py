#!/usr/bin/env python3
"""p50 overhead of the seed tool's HTTP API (`reflex serve --http-listen`) and of openpi's
websocket protocol (`--openpi-listen`) against the gRPC path, on the same calls, side by side
in one run.

One `reflex serve` on the reference export with a TCP gRPC listener, `--http-listen` and
`--openpi-listen` (all loopback, plain, no token), run twice: prefix cache on (every call a
cache hit, the cheapest call there is, so a front-end's share is as large as it gets) and
off (`--cache-entries 0`: every call runs the whole model). Callers, in shuffled order call by
call so all see the same server and machine state:

- a raw grpcio `PolicyStub.Act` with the request built once (the baseline);
- the seed tool's own client, `reflex.client.ReflexClient.act` (reflex-vla 0.11.2, httpx);
- the same HTTP request by hand (`http.client`, one kept-alive connection, body built once):
  what the server side of the front-end costs, without the seed client's Python;
- openpi's own client, `openpi_client.websocket_client_policy.WebsocketClientPolicy.infer`
  (openpi-client 0.1.2), with the frame as the uint8 array the JPEG was made from (openpi
  sends raw pixels; the server makes a PNG of it);
- the same openpi message by hand (packed once, sent on the client's websocket): the
  server's side of that front-end, without the client's packing.

    python3 proto/python/bench/bench_frontends.py [--reflex target/release/reflex]
        [--seed-tool DIR] [--calls 300] [--json out.json]

The seed tool is found at --seed-tool (default: where deploy/ci-setup.sh installs it).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
PACKAGE_ROOT = HERE.parent
REPO_ROOT = PACKAGE_ROOT.parent.parent
sys.path.insert(0, str(PACKAGE_ROOT))

from PIL import Image  # noqa: E402

from reflex_client._pb import reflex_pb2 as pb  # noqa: E402
from reflex_client._pb import reflex_pb2_grpc as pb_grpc  # noqa: E402

import grpc  # noqa: E402

STATE = [0.0, 0.2, 0.0, -1.8, 0.0, 2.0, 0.8, 0.04]
INSTRUCTION = "pick up the red cup"


def default_seed_tool() -> str:
    if os.environ.get("REFLEX_SEED_TOOL_DIR"):
        return os.environ["REFLEX_SEED_TOOL_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.environ["HOME"], ".cache")
    return os.path.join(cache, "reflex-ci", "reflex-vla-0.11.2")


def frame() -> np.ndarray:
    y, x = np.mgrid[0:224, 0:224]
    return np.stack([(x + 1) % 256, (3 * y) % 256, np.full_like(x, 7)], axis=-1).astype(np.uint8)


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def logged(log: Path, needle: str) -> str:
    deadline = time.monotonic() + 60
    while True:
        text = log.read_text()
        for line in text.splitlines():
            if needle in line:
                return line.split(needle, 1)[1].split()[0]
        if time.monotonic() > deadline:
            raise SystemExit(f"no {needle} in the log:\n{text}")
        time.sleep(0.02)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def run(binary: str, export: Path, d: Path, cache: bool, calls: int) -> dict[str, Any]:
    from openpi_client import msgpack_numpy
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    from reflex.client import ReflexClient

    log = d / f"serve-{cache}.log"
    args = [binary, "serve", str(export), "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--openpi-listen", "127.0.0.1:0"]
    if not cache:
        args += ["--cache-entries", "0"]
    proc = subprocess.Popen(args, stderr=log.open("wb"), stdout=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="info"))
    try:
        grpc_addr = logged(log, "listen=tcp://")
        http_addr = logged(log, "listen=http://")
        openpi_host, openpi_port = logged(log, "listen=ws://").rsplit(":", 1)
        img = jpeg()
        req = pb.ActRequest(images=[pb.Image(data=img)], instruction=INSTRUCTION, state=STATE, episode_id="bench")
        ch = grpc.insecure_channel(grpc_addr)
        grpc.channel_ready_future(ch).result(timeout=30)
        stub = pb_grpc.PolicyStub(ch)  # type: ignore[no-untyped-call]
        seed = ReflexClient(f"http://{http_addr}", max_retries=0)
        host, port = http_addr.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port))
        body = json.dumps({"image": base64.b64encode(img).decode(), "instruction": INSTRUCTION, "state": STATE, "episode_id": "bench"}).encode()
        headers = {"Content-Type": "application/json"}
        policy = WebsocketClientPolicy(openpi_host, int(openpi_port))
        obs = {"observation/image": frame(), "observation/state": np.asarray(STATE), "prompt": INSTRUCTION}
        packed = msgpack_numpy.packb(obs)

        def raw_grpc() -> None:
            stub.Act(req, timeout=10.0)

        def seed_client() -> None:
            r = seed.act(image=img, instruction=INSTRUCTION, state=STATE, episode_id="bench")
            assert len(r["actions"]) == 50

        def by_hand() -> None:
            conn.request("POST", "/act", body, headers)
            r = conn.getresponse()
            data = r.read()
            assert r.status == 200, data

        def openpi() -> None:
            r = policy.infer(obs)
            assert r["actions"].shape == (50, 7)

        def openpi_by_hand() -> None:
            policy._ws.send(packed)
            r = policy._ws.recv()
            assert isinstance(r, bytes), r

        fns: dict[str, Callable[[], None]] = {
            "gRPC, raw grpcio stub (baseline)": raw_grpc,
            "HTTP, the seed's ReflexClient.act": seed_client,
            "HTTP, the same call by hand (http.client, kept alive)": by_hand,
            "openpi, WebsocketClientPolicy.infer (raw frame)": openpi,
            "openpi, the same message by hand (packed once)": openpi_by_hand,
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(max(20, calls // 10)):
            for f in fns.values():
                f()
        rng = random.Random(0)
        order = list(fns.items())
        for _ in range(calls):
            rng.shuffle(order)
            for k, f in order:
                t0 = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t0) * 1e3)
        seed.close()
        conn.close()
        policy._ws.close()
        ch.close()
        rows = {k: {"p50": pct(v, 50), "p90": pct(v, 90), "p99": pct(v, 99), "calls": len(v)} for k, v in times.items()}
        base = rows["gRPC, raw grpcio stub (baseline)"]["p50"]
        for r in rows.values():
            r["ratio_p50"] = r["p50"] / base
        return {"cache": "on" if cache else "off", "rows": rows}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reflex", default=os.environ.get("REFLEX_BIN", str(REPO_ROOT / "target" / "release" / "reflex")))
    ap.add_argument("--seed-tool", default=default_seed_tool(), help="folder holding reflex-vla's `reflex` package")
    ap.add_argument("--calls", type=int, default=300, help="calls per caller and cache setting")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.seed_tool, "reflex", "client", "client.py")):
        raise SystemExit(f"the seed tool is not in {args.seed_tool}: run deploy/ci-setup.sh")
    sys.path.insert(0, args.seed_tool)
    with tempfile.TemporaryDirectory(prefix="reflex-bench-fe-") as tmp:
        d = Path(tmp)
        export = d / "export"
        subprocess.run([args.reflex, "export-demo", str(export)], check=True, capture_output=True)
        results = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, grpcio {grpc.__version__}, load {os.getloadavg()[0]:.1f}",
            "runs": [run(args.reflex, export, d, cache, args.calls) for cache in (True, False)],
        }
    print(f"machine: {results['machine']}\n")
    print("| cache | path | p50 ms | p90 ms | p99 ms | p50 vs gRPC |")
    print("|---|---|---|---|---|---|")
    for r in results["runs"]:
        for k, row in r["rows"].items():
            print(f"| {r['cache']} | {k} | {row['p50']:.3f} | {row['p90']:.3f} | {row['p99']:.3f} | {row['ratio_p50']:.2f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
