"""The seed tool's own HTTP client (reflex-vla 0.11.2's `reflex.client`, on PYTHONPATH,
with httpx) against `reflex serve --http-listen`, for tests/frontends.rs. Prints one JSON
summary on stdout.

    seed_client.py drive BASE_URL TOKEN FRAME
        sync and async clients with the token: health, config, 3 + 2 calls, a call the
        model refuses (422, not retried), and refusals without / with a wrong token.
    seed_client.py flood BASE_URL FRAME N
        N concurrent async calls against a tiny queue: the client's 503 retry gets every
        one answered.
"""

import asyncio
import json
import sys

import httpx
from reflex.client import (
    ReflexAsyncClient,
    ReflexAuthError,
    ReflexClient,
    ReflexValidationError,
)

STATE = [0.0, 0.2, 0.0, -1.8, 0.0, 2.0, 0.8, 0.04]


def summary(resp):
    return {
        "seq": resp["seq"],
        "sum": sum(sum(row) for row in resp["actions"]),
        "shape": [len(resp["actions"]), len(resp["actions"][0])],
        "num_actions": resp["num_actions"],
        "action_dim": resp["action_dim"],
        "latency_ms": resp["latency_ms"],
        "inference_mode": resp["inference_mode"],
        "recorded": resp["recorded"],
        "cache": resp["cache"],
    }


def drive(base, token, frame):
    out = {"sync": [], "async": []}
    with open(frame, "rb") as f:
        image = f.read()
    with ReflexClient(base, api_key=token, max_retries=0) as c:
        out["health"] = c.health()
        out["config"] = c.config()
        for i in range(3):
            out["sync"].append(summary(c.act(image=image, instruction="pick up the red cup", state=STATE, episode_id="ep-1")))
        try:
            c.act(image=image, instruction="pick", state=STATE[:3])
            out["short_state"] = "answered"
        except ReflexValidationError as e:
            out["short_state"] = {"status": e.status_code, "body": e.body}

    async def run_async():
        async with ReflexAsyncClient(base, api_key=token, max_retries=0) as c:
            for i in range(2):
                out["async"].append(summary(await c.act(image=image, instruction="", state=STATE, episode_id="ep-2")))

    asyncio.run(run_async())
    # Our header form too, by hand with httpx.
    import base64

    r = httpx.post(
        f"{base}/act",
        json={"image": base64.b64encode(image).decode(), "instruction": "pick up the red cup", "state": STATE},
        headers={"Authorization": f"Bearer {token}"},
    )
    out["bearer"] = {"status": r.status_code, "seq": r.json().get("seq")}
    for name, key in [("no_token", None), ("wrong_token", "wrong")]:
        with ReflexClient(base, api_key=key, max_retries=0) as c:
            try:
                c.act(image=image, instruction="x", state=STATE)
                out[name] = "answered"
            except ReflexAuthError as e:
                out[name] = {"status": e.status_code, "body": e.body}
    print(json.dumps(out))


def flood(base, frame, n):
    with open(frame, "rb") as f:
        image = f.read()

    async def run():
        async with ReflexAsyncClient(base, max_retries=20, initial_backoff_s=0.05) as c:
            return await asyncio.gather(
                *[c.act(image=image, instruction="pick up the red cup", state=STATE) for _ in range(n)]
            )

    got = asyncio.run(run())
    print(json.dumps({"answered": len(got), "seqs": sorted(r["seq"] for r in got)}))


def tls(base, token, frame):
    """Over https (the CA from SSL_CERT_FILE, which httpx reads); plain http is refused."""
    with open(frame, "rb") as f:
        image = f.read()
    out = {}
    with ReflexClient(base, api_key=token, max_retries=0) as c:
        out["health"] = c.health()
        out["act"] = summary(c.act(image=image, instruction="pick up the red cup", state=STATE))
    try:
        httpx.get(base.replace("https://", "http://") + "/health", timeout=5)
        out["plain"] = "answered"
    except httpx.HTTPError as e:
        out["plain"] = type(e).__name__
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "drive":
        drive(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "tls":
        tls(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "flood":
        flood(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(f"unknown command {sys.argv[1]!r}")
