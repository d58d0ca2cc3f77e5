"""openpi's own client (openpi-client 0.1.2: `WebsocketClientPolicy`, `ActionChunkBroker`)
against `reflex serve --openpi-listen`, for tests/openpi.rs. Prints one JSON summary on
stdout.

    drive_openpi.py drive HOST PORT TOKEN FRAME_OUT
        with the token: the metadata, LIBERO observations (HWC, then the same pixels CHW, with
        a noise_seed), an ActionChunkBroker stepping through a chunk and into the next; then
        refusals without / with a wrong token. Writes the frame's raw HWC bytes to FRAME_OUT
        (for the gRPC call the test compares with).
    drive_openpi.py errors HOST PORT
        one bad call per connection: each answered with a text frame (the client raises)
        and close 1011; then a good call on a new connection.
    drive_openpi.py preset HOST PORT droid|aloha
        one call with that example robot's observation keys.
    drive_openpi.py tls URI
        one call over wss:// (the CA from SSL_CERT_FILE).
"""

import json
import sys

import numpy as np
import websockets
from openpi_client import action_chunk_broker, msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy

STATE = np.array([0.0, 0.2, 0.0, -1.8, 0.0, 2.0, 0.8, 0.04])  # float64, as numpy makes it
PROMPT = "pick up the black bowl"


def frame(shade: int) -> np.ndarray:
    y, x = np.mgrid[0:224, 0:224]
    return np.stack([(x * 7 + shade) % 256, (y * 3) % 256, (x * y + shade) % 256], axis=-1).astype(np.uint8)


def obs(image: np.ndarray, **extra) -> dict:
    o = {
        "observation/image": image,
        "observation/wrist_image": frame(99),
        "observation/state": STATE,
        "prompt": PROMPT,
    }
    o.update(extra)
    return o


def summary(r: dict) -> dict:
    a = r["actions"]
    return {
        "type": type(a).__name__,
        "dtype": str(a.dtype),
        "shape": list(a.shape),
        "actions": a.astype(np.float64).ravel().tolist(),
        "policy_timing": r["policy_timing"],
        "server_timing": r["server_timing"],
        "reflex": r["reflex"],
    }


def refused(host, port, key):
    try:
        WebsocketClientPolicy(host, port, api_key=key)
        return "connected"
    except websockets.exceptions.InvalidStatus as e:
        return {"status": e.response.status_code, "body": e.response.body.decode()}


def drive(host, port, token, frame_out):
    out = {}
    img = frame(30)
    with open(frame_out, "wb") as f:
        f.write(img.tobytes())
    policy = WebsocketClientPolicy(host, port, api_key=token)
    out["metadata"] = policy.get_server_metadata()
    out["hwc"] = summary(policy.infer(obs(img, noise_seed=7)))
    out["chw"] = summary(policy.infer(obs(np.ascontiguousarray(img.transpose(2, 0, 1)), noise_seed=np.uint64(7))))
    # Without a prompt and without a wrist camera: both optional.
    o = obs(img)
    del o["prompt"], o["observation/wrist_image"]
    out["minimal"] = summary(policy.infer(o))
    broker = action_chunk_broker.ActionChunkBroker(policy, action_horizon=10)
    steps = [broker.infer(obs(img, noise_seed=11)) for _ in range(12)]
    out["broker"] = {
        "shapes": [list(s["actions"].shape) for s in steps],
        "seqs": [s["reflex"]["seq"] for s in steps],
        "first": steps[0]["actions"].astype(np.float64).tolist(),
    }
    out["no_token"] = refused(host, port, None)
    out["wrong_token"] = refused(host, port, "wrong")
    print(json.dumps(out))


def error_of(host, port, send):
    """Runs `send(policy)` on a new connection; the text the server answered with and the
    close frame that followed."""
    policy = WebsocketClientPolicy(host, port)
    try:
        send(policy)
        return {"error": None}
    except RuntimeError as e:
        message = str(e).removeprefix("Error in inference server:\n")
    try:
        policy._ws.recv(timeout=10)
        code = reason = None
    except websockets.ConnectionClosed as e:
        code, reason = (e.rcvd.code, e.rcvd.reason) if e.rcvd else (None, None)
    return {"error": message, "close_code": code, "close_reason": reason}


def raw(data):
    def send(policy):
        policy._ws.send(data)
        r = policy._ws.recv()
        if isinstance(r, str):
            raise RuntimeError(f"Error in inference server:\n{r}")

    return send


def errors(host, port):
    img = frame(1)
    cases = {
        "not_msgpack": raw(b"\xc1 this is not msgpack"),
        "text_frame": raw("hello"),
        "not_a_dict": raw(msgpack_numpy.packb([1, 2, 3])),
        "unknown_key": lambda p: p.infer(obs(img, **{"observation/imgae": img})),
        "missing_key": lambda p: p.infer({"observation/image": img, "prompt": PROMPT}),
        "bad_shape": lambda p: p.infer(obs(np.zeros((224, 224, 4), np.uint8))),
        "bad_dtype": lambda p: p.infer(obs(img.astype(np.float32))),
        "short_state": lambda p: p.infer(obs(img, **{"observation/state": STATE[:3]})),
        "oversized": lambda p: p.infer(obs(np.zeros((1024, 1024, 3), np.uint8))),
    }
    out = {name: error_of(host, port, send) for name, send in cases.items()}
    policy = WebsocketClientPolicy(host, port)
    out["after"] = summary(policy.infer(obs(img)))
    print(json.dumps(out))


def preset(host, port, name):
    """One call with the observation keys of openpi's DROID or ALOHA example (ALOHA's nested
    `images` dict, CHW frames, its prompt under `task`: the test maps it with --openpi-map)."""
    if name == "droid":
        o = {
            "observation/exterior_image_1_left": frame(3),
            "observation/wrist_image_left": frame(4),
            "observation/joint_position": STATE[:7],
            "observation/gripper_position": STATE[7:],
            "prompt": PROMPT,
        }
    else:
        chw = lambda a: np.ascontiguousarray(a.transpose(2, 0, 1))  # noqa: E731
        cams = ["cam_high", "cam_left_wrist", "cam_right_wrist", "cam_low"]
        o = {"images": {c: chw(frame(3 + i)) for i, c in enumerate(cams)}, "state": STATE, "task": PROMPT}
    print(json.dumps(summary(WebsocketClientPolicy(host, port).infer(o))))


def tls(uri):
    policy = WebsocketClientPolicy(uri)
    print(json.dumps({"after": summary(policy.infer(obs(frame(5))))}))


if __name__ == "__main__":
    if sys.argv[1] == "drive":
        drive(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    elif sys.argv[1] == "errors":
        errors(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "preset":
        preset(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif sys.argv[1] == "tls":
        tls(sys.argv[2])
    else:
        sys.exit(f"unknown command {sys.argv[1]!r}")
