"""The seed tool's own code (reflex-vla 0.11.2 from PyPI) on both sides of a trace, for
tests/seed_traces.rs. Its package is found on PYTHONPATH (deploy/ci-setup.sh installs it
with --no-deps into its own folder, so its top-level `reflex` shadows nothing else).

    seed_tool.py write OUT_DIR MODE MODEL_HASH STATE_LEN FRAME...
        one trace written by `reflex.runtime.record.RecordWriter`, one request per frame,
        exactly as the seed's server calls it; prints the file's path.
    seed_tool.py read TRACE ACTION_DIM STATE_LEN CHUNK
        our trace read by `reflex.replay.readers.load_reader`, the fields its A2C2 trainer
        takes checked on every record, and `build_a2c2_input_batch` run on the OK ones;
        prints a JSON summary.
"""

import base64
import json
import sys

import numpy as np


def write(out_dir, mode, model_hash, state_len, frames):
    from reflex.runtime.record import RecordWriter

    rec = RecordWriter(
        out_dir,
        model_hash=model_hash,
        config_hash="",
        export_dir=out_dir,
        model_type="reference",
        export_kind="decomposed",
        providers=["CPUExecutionProvider"],
        ort_version="1.20.1",
        embodiment="franka",
        image_redaction=mode,
        reflex_version="0.11.2",
    )
    state = [0.0, 0.2, 0.0, -1.8, 0.0, 2.0, 0.8, 0.04][:state_len]
    state += [0.1] * (state_len - len(state))
    for i, frame in enumerate(frames):
        with open(frame, "rb") as f:
            image_b64 = base64.b64encode(f.read()).decode("ascii")
        # As the seed's server calls it (runtime/server.py, the /act record hook).
        rec.write_request(
            chunk_id=rec.seq,
            image_b64=image_b64,
            instruction="pick up the red cup",
            state=state,
            actions=[[0.01 * (i + r + c) for c in range(7)] for r in range(50)],
            action_dim=7,
            latency_total_ms=120.0 + i,
            latency_stages={"vlm_prefix_ms": 80.0, "expert_ms": 40.0 + i},
            mode="onnx_cpu",
        )
    rec.write_footer({"total_requests": rec.seq})
    rec.close()
    print(rec.filepath)


def read(trace, action_dim, state_len, chunk):
    from reflex.correction.a2c2_training import build_a2c2_input_batch
    from reflex.kernels.a2c2_correction import A2C2Config
    from reflex.replay.readers import load_reader

    reader = load_reader(trace)
    header = reader.read_header()
    records, footers = [], []
    for kind, rec in reader.read_records():
        if kind == "request":
            records.append(rec)
        elif kind == "footer":
            footers.append(rec)
    for rec in records:
        # What the seed's A2C2 trainer indexes on every record (KeyError otherwise).
        rec["request"]["instruction"], rec["request"]["state"]
        rec["response"]["actions"], rec["latency"]["total_ms"], rec["latency"]["stages"]
    ok = [r for r in records if "error" not in r]
    base, obs, pos, lat = [], [], [], []
    for r in ok:
        for p, row in enumerate(r["response"]["actions"]):
            base.append(row)
            obs.append(r["request"]["state"])
            pos.append(p)
            lat.append(r["latency"]["total_ms"] / chunk)
    cfg = A2C2Config(action_dim=action_dim, obs_dim=state_len, chunk_size=chunk)
    batch = build_a2c2_input_batch(
        np.asarray(base, dtype=np.float32),
        np.asarray(obs, dtype=np.float32),
        np.asarray(pos),
        np.asarray(lat, dtype=np.float32),
        cfg,
    )
    print(
        json.dumps(
            {
                "providers": header.get("providers"),
                "records": len(records),
                "errors": [r["error"]["slug"] for r in records if "error" in r],
                "instructions": [r["request"]["instruction"] for r in records],
                "states": [len(r["request"]["state"]) for r in records],
                "stage_names": sorted(records[0]["latency"]["stages"]),
                "action_sum": float(sum(np.sum(r["response"]["actions"], dtype=np.float64) for r in ok)),
                "footer": footers[-1] if footers else None,
                "batch_shape": list(batch.shape),
                "batch_finite": bool(np.isfinite(batch).all()),
            }
        )
    )


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "write":
        write(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6:])
    elif cmd == "read":
        read(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(f"unknown command {cmd!r}")
