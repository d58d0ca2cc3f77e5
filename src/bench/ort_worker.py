#!/usr/bin/env python3
"""onnxruntime's side of `reflex bench engines --export DIR` (written next to the bench's
inputs at run time; reads no request from the network).

    ort_worker.py EXPORT_DIR INPUTS_JSON THREADS

Loads the export's graphs (names from its reflex_config.json, the seed tool's layout) with
onnxruntime's CPU provider, THREADS intra-op threads and its default optimisations, then
answers one line per line read on stdin:
    "act"  -> runs one Act on the inputs (prefix, then the expert: the baked loop, or the
              Euler loop here for a per-step expert; a monolithic graph in one run) and prints
              {"prefix_ms", "denoise_ms", "act_ms"}
    "actions" -> prints {"actions": [...]} of one Act (graph width, normalised)
    "quit" -> prints {"peak_rss_kib"} and exits.
The first line printed is {"load_s", "onnxruntime"} once the sessions are ready.
"""

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

DTYPES = {"float32": np.float32, "int64": np.int64, "bool": np.bool_}


def main() -> None:
    export, inputs_json, threads = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    spec = json.loads(inputs_json.read_text())
    values = {}
    for name, t in spec["tensors"].items():
        raw = np.fromfile(inputs_json.parent / t["file"], dtype=DTYPES[t["dtype"]])
        values[name] = raw.reshape(t["shape"])
    config = json.loads((export / "reflex_config.json").read_text())

    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1

    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(export / name), opts, providers=["CPUExecutionProvider"])

    monolithic = config["export_kind"] == "monolithic"
    if monolithic:
        model = session("model.onnx")
    else:
        dec = config["decomposed"]
        prefix = session(dec["vlm_prefix_onnx"])
        expert = session(dec["expert_denoise_onnx"])
        per_step = bool(dec.get("per_step_expert"))
        steps = int(config["num_denoising_steps"])
    print(json.dumps({"load_s": time.perf_counter() - t0, "onnxruntime": ort.__version__}), flush=True)

    def feed(sess: ort.InferenceSession, vals: dict) -> dict:
        return {i.name: vals[i.name] for i in sess.get_inputs()}

    def act() -> tuple[np.ndarray, float, float]:
        t0 = time.perf_counter()
        if monolithic:
            out = model.run(["actions"], feed(model, values))[0]
            return out, 0.0, (time.perf_counter() - t0) * 1e3
        names = [o.name for o in prefix.get_outputs()]
        kv = dict(zip(names, prefix.run(names, feed(prefix, values))))
        t1 = time.perf_counter()
        ctx = {k: v for k, v in kv.items() if k in {i.name for i in expert.get_inputs()}}
        if per_step:
            x, dt = values["noise"], -1.0 / steps
            for step in range(steps):
                t = np.full((1,), 1.0 + step * dt, dtype=np.float32)
                v = expert.run(["v_t"], dict(ctx, x_t=x, t=t))[0]
                x = x + dt * v
            out = x
        else:
            out = expert.run(["actions"], dict(ctx, noise=values["noise"]))[0]
        t2 = time.perf_counter()
        return out, (t1 - t0) * 1e3, (t2 - t1) * 1e3

    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "act":
            t0 = time.perf_counter()
            _, p, d = act()
            print(json.dumps({"prefix_ms": p, "denoise_ms": d,
                              "act_ms": (time.perf_counter() - t0) * 1e3}), flush=True)
        elif cmd == "actions":
            out, _, _ = act()
            print(json.dumps({"actions": [float(v) for v in out.reshape(-1)]}), flush=True)
        elif cmd == "quit":
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(json.dumps({"peak_rss_kib": kib}), flush=True)
            return


if __name__ == "__main__":
    main()
