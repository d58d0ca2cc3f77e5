"""Drives a running `reflex serve --record DIR --record-images full` with a robot-like stream
of Act calls until the trace reaches a size, for measuring `reflex trace export` on a large
trace (README, "Trace tools"). The trace is written by the real server and recorder.

usage: PYTHONPATH=proto/python python3 replayer/tools/bench/big_trace.py unix:///tmp/r.sock TRACE_DIR 1000

Frames: 64 distinct JPEGs per camera (textured, ~30 KB each at 224x224), cycled, so the
prefix cache hits like a robot standing still and the calls are fast; state moves every
call; the episode changes every 500 calls and the instruction every other episode.
"""

import io
import os
import sys

import numpy as np
from PIL import Image

from reflex_client import Client

target, trace_dir, mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(7)


def frame(i):
    y, x = np.mgrid[0:224, 0:224]
    base = (np.sin(x / (7 + i % 5)) * 60 + np.cos(y / (5 + i % 7)) * 60 + 128)[..., None]
    img = np.clip(base + rng.normal(0, 18, (224, 224, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


frames = {cam: [frame(i + k * 64) for i in range(64)] for k, cam in enumerate(["base", "wrist"])}
client = Client(target, timeout_s=30)


def size():
    return sum(e.stat().st_size for e in os.scandir(trace_dir) if e.is_file())


n = 0
while True:
    if n % 1000 == 0 and size() >= mb * 1_000_000:
        break
    k = (n // 16) % 64
    state = [float(np.sin(n * 0.01 + j)) for j in range(8)]
    episode = n // 500
    instruction = "pick up the red cup" if episode % 2 == 0 else "put the cup on the plate"
    client.act({c: frames[c][k] for c in frames}, instruction, state, episode_id=f"ep-{episode}")
    n += 1
print(f"{n} calls, trace folder {size() / 1e6:.1f} MB")
