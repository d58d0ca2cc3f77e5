"""Checks reflex's trace exports with readers no one here wrote (run by tests/trace.rs).

usage: python3 readers.py EXPECTED.json

EXPECTED.json is what the Rust test computed from the traces through the recorder's
reader: per trace kind ("full", "hash_only") the Acts (seq, state and action bits,
camera SHA-256s, ...) and the paths of the exports to check. Every check compares the
export as its reader sees it with those values; a mismatch raises with what differed.
"""

import base64
import calendar
import datetime
import hashlib
import json
import sys

import numpy as np

INSTALL = "install the test readers with `bash deploy/ci-setup.sh` (pip: mcap, duckdb, lerobot-dataset, torch)"

try:
    import duckdb
    from mcap.reader import make_reader
    from ledataset.datasets.lerobot_dataset import LeRobotDataset
except ImportError as e:  # the test must fail, naming the install step
    sys.exit(f"missing Python reader: {e}; {INSTALL}")


def ns(timestamp):
    """Unix nanoseconds of an RFC 3339 timestamp, by Python's own parser."""
    dt = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return calendar.timegm(dt.utctimetuple()) * 10**9 + dt.microsecond * 1000


def f32(bits):
    return np.array(bits, dtype=np.uint32).view(np.float32)


def check_mcap(exp, path):
    acts, images = [], {}
    with open(path, "rb") as f:
        reader = make_reader(f)
        summary = reader.get_summary()
        assert summary is not None, "no summary section"
        assert summary.chunk_indexes, "no chunk indexes"
        assert {c.compression for c in summary.chunk_indexes} == {"zstd"}, summary.chunk_indexes[0].compression
        schemas = {s.id: s for s in summary.schemas.values()}
        for ch in summary.channels.values():
            s = schemas[ch.schema_id]
            assert s.encoding == "jsonschema" and ch.message_encoding == "json", (s.encoding, ch.message_encoding)
            json.loads(s.data)  # the schema itself is JSON Schema text
            if ch.topic == "/reflex/act":
                assert s.name == "reflex.v1.Act", s.name
            else:
                assert ch.topic.startswith("/camera/"), ch.topic
                assert s.name == "foxglove.CompressedImage", s.name
        metas = list(reader.iter_metadata())
        assert [m.name for m in metas] == ["reflex.header"], [m.name for m in metas]
        assert metas[0].metadata["model_hash"] == exp["model_hash"], metas[0].metadata
        assert summary.statistics.message_count == exp["acts"] + sum(len(v) for v in exp["cameras"].values())
        for schema, channel, message in reader.iter_messages(log_time_order=False):
            body = json.loads(message.data)
            if channel.topic == "/reflex/act":
                acts.append((message.log_time, body))
            else:
                assert set(body) == {"timestamp", "frame_id", "data", "format"}, body.keys()
                assert body["format"] == "jpeg", body["format"]
                ts = body["timestamp"]["sec"] * 10**9 + body["timestamp"]["nsec"]
                assert ts == message.log_time, (ts, message.log_time)
                images.setdefault(channel.topic[len("/camera/"):], []).append(
                    hashlib.sha256(base64.b64decode(body["data"])).hexdigest()
                )
    assert len(acts) == exp["acts"], (len(acts), exp["acts"])
    for (log_time, body), want in zip(acts, exp["rows"]):
        assert log_time == ns(want["timestamp"]), (log_time, want["timestamp"])
        assert body["seq"] == want["seq"]
        assert np.array_equal(np.array(body["state"], dtype=np.float32), f32(want["state"]))
        chunk = np.array(body["actions"], dtype=np.float32)
        assert chunk.shape == (exp["num_actions"], exp["action_dim"]), chunk.shape
        assert np.array_equal(chunk.reshape(-1), f32(want["actions"]))
        assert body["noise_seed"] == str(want["noise_seed"])
    assert images == exp["cameras"], (list(images), list(exp["cameras"]))
    print(f"mcap: {len(acts)} acts, {sum(len(v) for v in images.values())} images, schemas ok")


def check_lerobot(exp, root):
    ds = LeRobotDataset("reflex/trace-export", root=root)
    rows = [r for r in exp["rows"] if not r["failed"]]
    assert len(ds) == len(rows), (len(ds), len(rows))
    assert ds.meta.total_episodes == len(set(r["episode_id"] for r in rows))
    want_cams = sorted(f"observation.images.{c}" for c in exp["cameras"])
    assert sorted(ds.meta.camera_keys) == want_cams, (ds.meta.camera_keys, want_cams)
    assert ds.fps >= 1
    for i, want in enumerate(rows):
        item = ds[i]
        assert item["index"].item() == i
        assert np.array_equal(item["observation.state"].numpy(), f32(want["state"])), i
        actions = f32(want["actions"]).reshape(exp["num_actions"], exp["action_dim"])
        assert np.array_equal(item["action"].numpy(), actions[0]), i
        assert np.array_equal(item["action_chunk"].numpy(), actions), i
        assert item["task"] == want["instruction"], (item["task"], want["instruction"])
        for key in want_cams:
            img = item[key]
            assert tuple(img.shape) == (3, exp["image_hw"][0], exp["image_hw"][1]), img.shape
            assert float(img.max()) <= 1.0 and float(img.max()) > 0.0
    print(f"lerobot: {len(ds)} frames, {ds.meta.total_episodes} episodes, cameras {want_cams}, fps {ds.fps}")


def check_parquet(exp, path):
    con = duckdb.connect()
    t = f"read_parquet('{path}')"
    n, seqs, first, last = con.execute(f"select count(*), sum(seq), min(seq), max(seq) from {t}").fetchone()
    assert n == exp["acts"] and seqs == sum(r["seq"] for r in exp["rows"]), (n, seqs)
    assert (first, last) == (exp["rows"][0]["seq"], exp["rows"][-1]["seq"])
    (state_sum,) = con.execute(f"select sum(v::DOUBLE) from (select unnest(state) v from {t})").fetchone()
    (action_sum, action_n) = con.execute(f"select sum(v::DOUBLE), count(*) from (select unnest(actions) v from {t})").fetchone()
    assert np.isclose(state_sum, exp["state_sum"], rtol=1e-12, atol=1e-9), (state_sum, exp["state_sum"])
    assert np.isclose(action_sum, exp["action_sum"], rtol=1e-12, atol=1e-9), (action_sum, exp["action_sum"])
    assert action_n == exp["action_values"], (action_n, exp["action_values"])
    hits, errors, lat = con.execute(
        f"select count(*) filter (cache_status = 'hit'), count(error_slug), sum(latency_total_ms) from {t}"
    ).fetchone()
    assert hits == exp["cache_hits"] and errors == exp["errors"], (hits, errors)
    assert np.isclose(lat, exp["latency_total_sum"], rtol=1e-12), (lat, exp["latency_total_sum"])
    (bad,) = con.execute(f"select count(*) from {t} where len(actions) != num_actions * action_dim").fetchone()
    assert bad == 0
    (us,) = con.execute(f"select min(epoch_us(timestamp)) from {t}").fetchone()
    assert us * 1000 == min(ns(r["timestamp"]) for r in exp["rows"]), us
    print(f"parquet: {n} rows, sums equal")


def main():
    exp = json.load(open(sys.argv[1]))
    for kind, e in exp.items():
        print(f"== {kind}")
        if "mcap" in e:
            check_mcap(e, e["mcap"])
        if "lerobot" in e:
            check_lerobot(e, e["lerobot"])
        if "parquet" in e:
            check_parquet(e, e["parquet"])
    print("all readers agree")


if __name__ == "__main__":
    main()
