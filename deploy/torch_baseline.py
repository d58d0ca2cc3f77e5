#!/usr/bin/env python3
"""The PyTorch baseline of `reflex bench engines` (issue 14): an export's ONNX graphs,
converted with onnx2torch and run by PyTorch, eager and under CUDA graphs, timed per Act.

    python3 deploy/torch_baseline.py --export DIR [--device cuda|cpu] [--calls N]
        [--warmup N] [--modes eager,graphs] --json OUT.json

One Act is what the reflex runtime does (server/engine/src/vla.rs): the prefix graph (for
the SmolVLA four-graph layout: the image graph per camera, the text graph, the state
projection and the prefill graph), its outputs handed to the expert *by name*, then the
denoise: a baked loop is one expert call; a per-step expert is called `steps` times at
t = t0 + k*dt (computed in float64, fed as float32) with x <- x + dt*v in float32 here in
torch; a monolithic export is one call (its prefix time is 0). Inputs are synthetic, of the
graphs' declared shapes and dtypes, made once and kept on the device: the figures are
graph execution only (no image decode, no tokenizer, no host copies of the prefix), which
is the part both engines share.

Conversion: onnx2torch 1.5.15 registers operators up to opset 17. Before converting, the
graphs are prepared: symbolic axes pinned (batch 1, seq the assembled length), Constant
nodes made initializers, Shape of a static tensor and small constant subgraphs folded
(onnx's reference evaluator), and every graph output given an Identity of its own. The
operators the fixture exports use that onnx2torch lacks are registered below (opset 19's
Cast/Reshape/Identity/Shape and 16's LessOrEqual are their earlier versions with new types
only; ReduceMean 18 takes its axes as an input; SplitToSequence/SequenceAt; CumSum with its
axis read once). Shape-like constants (Reshape's shape, Slice's starts, ...) stay in host
memory, so a forward makes no device-to-host copy and CUDA graphs can capture it. An
operator still missing stops the run with its name, version, node and file (exit 2).

Parity: one Act on the same inputs through onnxruntime's CPU provider when it imports,
else through these converted graphs on the CPU (then it checks the device's numerics, not
the conversion); every prefix tensor and the actions, cosine and max |d| / max |ref|.

Exit codes: 0 done (parity failing is reported, not fatal unless --strict), 1 a bad
argument or export, 2 an operator onnx2torch cannot convert, 3 parity failed under --strict.
"""

import argparse
import json
import math
import os
import sys
import time
import types


def die(code, message):
    print(f"torch_baseline: error: {message}", file=sys.stderr)
    sys.exit(code)


try:
    import numpy as np
    import onnx
    import torch
    from onnx import helper, numpy_helper, shape_inference
except ImportError as e:  # the device's venv must have torch; onnx comes as a carried wheel
    die(1, f"{e}: needs torch, numpy and onnx (deploy/baseline-wheels.sh fetches onnx and onnx2torch)")

# onnx2torch imports torchvision at import time for two converters (NonMaxSuppression,
# RoiAlign) no VLA export uses; a venv with torch alone gets a stand-in that fails only if
# one of those is ever called.
try:
    import torchvision  # noqa: F401
except ImportError:
    _tv = types.ModuleType("torchvision")
    _ops = types.ModuleType("torchvision.ops")

    def _absent(*_a, **_k):
        raise NotImplementedError("torchvision is not installed (NonMaxSuppression/RoiAlign)")

    _ops.nms = _ops.roi_align = _ops.batched_nms = _absent
    _tv.ops = _ops
    _tv.__version__ = "absent"
    sys.modules["torchvision"] = _tv
    sys.modules["torchvision.ops"] = _ops

try:
    import onnx2torch
    import onnx2torch.converter as o2t_converter
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, OnnxToTorchModule
except ImportError as e:
    die(1, f"{e}: needs onnx2torch (deploy/baseline-wheels.sh fetches it)")

from torch import nn

O2T_VERSION = getattr(onnx2torch, "__version__", None)
if O2T_VERSION is None:
    try:
        from importlib.metadata import version as _pkg_version

        O2T_VERSION = _pkg_version("onnx2torch")
    except Exception:  # noqa: BLE001 - a version string only
        O2T_VERSION = "?"

# ---------------------------------------------------------------------------------------
# Converters onnx2torch 1.5.15 lacks for what the exports use.

ONNX_TO_TORCH_DTYPE = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def _register(op, version, fn):
    key = OperationDescription(domain="", operation_type=op, version=version)
    _CONVERTER_REGISTRY[key] = fn


def _alias(op, new, old, why):
    old_fn = _CONVERTER_REGISTRY.get(OperationDescription(domain="", operation_type=op, version=old))
    if old_fn is not None and OperationDescription(domain="", operation_type=op, version=new) not in _CONVERTER_REGISTRY:
        _register(op, new, old_fn)
        ALIASES.append(f"{op}-{new} as {op}-{old} ({why})")


ALIASES = []


def _const(graph, name, what):
    """A converter's constant input, read once at conversion (never a device read per call)."""
    if name in graph.initializers:
        return graph.initializers[name].to_torch()
    raise NotImplementedError(f"{what} ({name}) is not a constant")


class SplitToSequence(nn.Module, OnnxToTorchModule):
    def __init__(self, axis, sizes, keepdims):
        super().__init__()
        self.axis, self.sizes, self.keepdims = axis, sizes, keepdims

    def forward(self, x):
        if self.sizes is None:  # no split: pieces of 1, squeezed unless keepdims
            parts = torch.split(x, 1, dim=self.axis)
            return tuple(p.squeeze(self.axis) for p in parts) if not self.keepdims else parts
        return torch.split(x, self.sizes, dim=self.axis)


class SequenceAt(nn.Module, OnnxToTorchModule):
    def __init__(self, position):
        super().__init__()
        self.position = position

    def forward(self, seq):
        return seq[self.position]


class CumSum(nn.Module, OnnxToTorchModule):
    def __init__(self, axis, exclusive, reverse):
        super().__init__()
        self.axis, self.exclusive, self.reverse = axis, exclusive, reverse

    def forward(self, x):
        if self.reverse:
            x = torch.flip(x, dims=(self.axis,))
        y = torch.cumsum(x, dim=self.axis)
        if self.exclusive:
            y = y - x
        if self.reverse:
            y = torch.flip(y, dims=(self.axis,))
        return y


class Reduce(nn.Module, OnnxToTorchModule):
    def __init__(self, kind, axes, keepdims):
        super().__init__()
        self.kind, self.axes, self.keepdims = kind, axes, keepdims

    def forward(self, x):
        axes = self.axes if self.axes is not None else list(range(x.dim()))
        if not axes:
            return x
        if self.kind == "ReduceMean":
            return torch.mean(x, dim=axes, keepdim=self.keepdims)
        if self.kind == "ReduceMax":
            return torch.amax(x, dim=axes, keepdim=self.keepdims)
        if self.kind == "ReduceMin":
            return torch.amin(x, dim=axes, keepdim=self.keepdims)
        if self.kind == "ReduceSum":
            return torch.sum(x, dim=axes, keepdim=self.keepdims)
        raise NotImplementedError(self.kind)


class StaticSlice(nn.Module, OnnxToTorchModule):
    """Slice with constant starts/ends/axes/steps (positive): a tuple of slices, read once."""

    def __init__(self, slices):
        super().__init__()
        self.slices = slices  # [(axis, start, end, step)], axes normalised when rank is known

    def forward(self, x):
        idx = [slice(None)] * x.dim()
        for axis, start, end, step in self.slices:
            idx[axis] = slice(start, end, step)
        return x[tuple(idx)]


def _slice(fallback):
    def conv(node, graph):
        names = list(node.input_values) + [""] * (5 - len(node.input_values))
        try:
            starts = _const(graph, names[1], "starts").reshape(-1).tolist()
            ends = _const(graph, names[2], "ends").reshape(-1).tolist()
            axes = _const(graph, names[3], "axes").reshape(-1).tolist() if names[3] else list(range(len(starts)))
            steps = _const(graph, names[4], "steps").reshape(-1).tolist() if names[4] else [1] * len(starts)
        except NotImplementedError:
            return fallback(node, graph)
        if any(st <= 0 for st in steps):
            return fallback(node, graph)
        # ONNX clamps out-of-range bounds (INT64_MAX for "to the end"); Python slices clamp too.
        return OperationConverterResult(
            StaticSlice([(int(a), int(b), int(e), int(st)) for a, b, e, st in zip(axes, starts, ends, steps)]),
            _mapping(node, node.input_values[:1]),
        )

    return conv


class ConstGather(nn.Module, OnnxToTorchModule):
    """Gather with constant indices: a scalar is a select (a 0-dim index tensor would be
    read on the host every call), an array an index_select over a device buffer."""

    def __init__(self, axis, index):
        super().__init__()
        self.axis = axis
        if isinstance(index, int):
            self.scalar = index
        else:
            self.scalar = None
            self.shape = list(index.shape)
            self.register_buffer("index", index.reshape(-1).to(torch.int64))

    def forward(self, x):
        axis = self.axis if self.axis >= 0 else self.axis + x.dim()
        if self.scalar is not None:
            return x.select(axis, self.scalar)
        y = torch.index_select(x, axis, self.index)
        return y.reshape(list(x.shape[:axis]) + self.shape + list(x.shape[axis + 1 :]))


def _gather(fallback):
    def conv(node, graph):
        if node.input_values[1] not in graph.initializers:
            return fallback(node, graph)
        idx = graph.initializers[node.input_values[1]].to_torch()
        axis = node.attributes.get("axis", 0)
        if idx.dim() == 0:
            return OperationConverterResult(ConstGather(axis, int(idx.item())), _mapping(node, node.input_values[:1]))
        if bool((idx < 0).any()):
            return fallback(node, graph)
        return OperationConverterResult(ConstGather(axis, idx.clone()), _mapping(node, node.input_values[:1]))

    return conv


def _mapping(node, inputs):
    return OnnxMapping(inputs=tuple(inputs), outputs=node.output_values)


def _split_to_sequence(node, graph):
    axis = node.attributes.get("axis", 0)
    keepdims = node.attributes.get("keepdims", 1)
    sizes = None
    if len(node.input_values) > 1 and node.input_values[1]:
        s = _const(graph, node.input_values[1], "SplitToSequence's split")
        sizes = int(s.item()) if s.dim() == 0 else [int(v) for v in s.tolist()]
    return OperationConverterResult(SplitToSequence(axis, sizes, keepdims), _mapping(node, node.input_values[:1]))


def _sequence_at(node, graph):
    pos = int(_const(graph, node.input_values[1], "SequenceAt's position").item())
    return OperationConverterResult(SequenceAt(pos), _mapping(node, node.input_values[:1]))


def _cumsum(node, graph):
    axis = int(_const(graph, node.input_values[1], "CumSum's axis").reshape(-1)[0].item())
    mod = CumSum(axis, node.attributes.get("exclusive", 0), node.attributes.get("reverse", 0))
    return OperationConverterResult(mod, _mapping(node, node.input_values[:1]))


def _reduce18(kind):
    def conv(node, graph):
        keep = bool(node.attributes.get("keepdims", 1))
        axes = None
        if len(node.input_values) > 1 and node.input_values[1]:
            axes = [int(a) for a in _const(graph, node.input_values[1], f"{kind}'s axes").reshape(-1).tolist()]
        if axes is None and node.attributes.get("noop_with_empty_axes", 0):
            axes = []
        return OperationConverterResult(Reduce(kind, axes, keep), _mapping(node, node.input_values[:1]))

    return conv


def register_converters():
    # Slice: onnx2torch's indexes with a list of slices (deprecated by PyTorch, to mean a
    # tensor index in later versions) and reads its bounds from tensors every call.
    for v in (10, 11, 13):
        fallback = _CONVERTER_REGISTRY.get(OperationDescription(domain="", operation_type="Slice", version=v))
        if fallback is not None:
            _register("Slice", v, _slice(fallback))
    for v in (1, 11, 13):
        fallback = _CONVERTER_REGISTRY.get(OperationDescription(domain="", operation_type="Gather", version=v))
        if fallback is not None:
            _register("Gather", v, _gather(fallback))
    _register("SplitToSequence", 11, _split_to_sequence)
    _register("SequenceAt", 11, _sequence_at)
    # CumSum: onnx2torch's reads the axis with .item() every call (a device read).
    _register("CumSum", 11, _cumsum)
    _register("CumSum", 14, _cumsum)
    for kind in ("ReduceMean", "ReduceMax", "ReduceMin"):
        _register(kind, 18, _reduce18(kind))
    # The same operator with more element types (bfloat16/float8/int4) or a float8-only
    # attribute (Cast's saturate): the earlier converter covers what these graphs feed it.
    _alias("Cast", 19, 13, "saturate is for float8 only")
    _alias("CastLike", 19, 15, "float8 types only")
    _alias("Reshape", 19, 14, "new types only")
    _alias("Identity", 19, 16, "new types only")
    _alias("Shape", 19, 15, "new types only")
    _alias("Pad", 19, 18, "wrap mode added")
    _alias("LessOrEqual", 16, 12, "bfloat16 added")
    _alias("GreaterOrEqual", 16, 12, "bfloat16 added")
    _alias("Equal", 19, 13, "new types only")
    _alias("Where", 16, 9, "bfloat16 added")


# ---------------------------------------------------------------------------------------
# Graph preparation: pin, fold, check, convert.

FOLD_MAX = 1 << 16  # elements: small shape/index/mask constants, never a weight


def _dims(vi):
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]


def _elem_count(t):
    n = 1
    for d in t.dims:
        n *= d
    return n


def prepare(path, pins):
    """The graph at `path`, ready for onnx2torch: (ModelProto with its weights, notes)."""
    base = os.path.dirname(os.path.abspath(path))
    m = onnx.load(path, load_external_data=False)
    g = m.graph
    notes = []
    # Symbolic axes pinned, as the reflex runtime pins them at load.
    for vi in list(g.input) + list(g.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param:
                if d.dim_param not in pins:
                    die(1, f"{path}: input/output {vi.name} has symbolic axis {d.dim_param!r} with no length to pin")
                d.dim_value = pins[d.dim_param]
    # An attribute whose value is its type's zero may be written without it (a proto2
    # optional left unset: reflex's writer does so for `axis: 0`); onnx2torch reads it by
    # presence, so set it.
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.INT and not a.HasField("i"):
                a.i = 0
            elif a.type == onnx.AttributeProto.FLOAT and not a.HasField("f"):
                a.f = 0.0
            elif a.type == onnx.AttributeProto.STRING and not a.HasField("s"):
                a.s = b""
    # Constant nodes -> initializers.
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            attr = n.attribute[0]
            if attr.name == "value":
                t = onnx.TensorProto()
                t.CopyFrom(attr.t)
            else:
                arr = {
                    "value_float": lambda a: np.array(a.f, np.float32),
                    "value_floats": lambda a: np.array(list(a.floats), np.float32),
                    "value_int": lambda a: np.array(a.i, np.int64),
                    "value_ints": lambda a: np.array(list(a.ints), np.int64),
                }.get(attr.name)
                if arr is None:
                    keep.append(n)
                    continue
                t = numpy_helper.from_array(arr(attr))
            t.name = n.output[0]
            g.initializer.append(t)
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    inferred = shape_inference.infer_shapes(m, strict_mode=False)
    shapes = {vi.name: _dims(vi) for vi in list(inferred.graph.value_info) + list(g.input) + list(g.output)}
    # Fold Shape of static tensors and small constant subgraphs.
    const = {}
    init_by_name = {t.name: t for t in g.initializer}
    for t in g.initializer:
        if _elem_count(t) <= FOLD_MAX:
            const[t.name] = t
    folded, keep = 0, []
    from onnx.reference import ReferenceEvaluator

    for n in g.node:
        out = None
        if n.op_type == "Shape" and n.domain in ("", "ai.onnx"):
            s = shapes.get(n.input[0])
            if s is not None and all(isinstance(d, int) and d > 0 for d in s):
                start = next((a.i for a in n.attribute if a.name == "start"), 0)
                end = next((a.i for a in n.attribute if a.name == "end"), len(s))
                out = [np.array(s[start:end] if end != 0 else s[start:], np.int64)]
        elif (
            n.domain in ("", "ai.onnx")
            and len(n.output) == 1
            and n.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "If", "Loop", "Scan", "SplitToSequence", "SequenceAt")
            and all(i == "" or i in const for i in n.input)
            and any(i for i in n.input)
        ):
            try:
                feeds = {i: numpy_helper.to_array(const[i], base_dir=base) for i in n.input if i}
                out = ReferenceEvaluator(n).run(None, feeds)
            except Exception:  # noqa: BLE001 - left to run as a node
                out = None
        if out is not None and len(out) == len(n.output) and all(np.asarray(o).size <= FOLD_MAX for o in out):
            for name, v in zip(n.output, out):
                t = numpy_helper.from_array(np.asarray(v), name)
                const[name] = t
                g.initializer.append(t)
                init_by_name[name] = t
            folded += 1
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    if folded:
        notes.append(f"{os.path.basename(path)}: {folded} constant nodes folded")
    # Every graph output from an Identity of its own: the converted module then returns one
    # tensor per output, in the graph's order.
    for i, o in enumerate(g.output):
        inner = f"{o.name}__baseline_out"
        for n in g.node:
            for k, name in enumerate(n.output):
                if name == o.name:
                    n.output[k] = inner
            for k, name in enumerate(n.input):
                if name == o.name:
                    n.input[k] = inner
        g.node.append(helper.make_node("Identity", [inner], [o.name], name=f"baseline_out_{i}"))
    # Drop initializers nothing reads any more, then read the weights.
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    # onnx2torch reads value_info (LayerNormalization's rank, ...): inferred here, on the
    # graph without its weights.
    m = shape_inference.infer_shapes(m, strict_mode=False)
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(m, base)
    return m, notes


def check_ops(m, path):
    opset = {o.domain or "": o.version for o in m.opset_import}
    missing = []
    for n in m.graph.node:
        dom = n.domain or ""
        try:
            since = onnx.defs.get_schema(n.op_type, opset.get(dom, 1), dom).since_version
        except Exception:  # noqa: BLE001 - unknown operator or domain
            since = opset.get(dom, 1)
        if OperationDescription(domain=dom, operation_type=n.op_type, version=since) not in _CONVERTER_REGISTRY:
            missing.append((n.op_type, since, n.name or n.output[0]))
    if missing:
        kinds = sorted({(op, v) for op, v, _ in missing})
        lines = [f"{op} (opset version {v}) at node {next(nm for o, vv, nm in missing if (o, vv) == (op, v))!r}" for op, v in kinds]
        die(2, f"{path}: onnx2torch {O2T_VERSION} cannot convert: " + "; ".join(lines) + " (register a converter in deploy/torch_baseline.py)")


# Modules whose non-data inputs are shapes, axes or indices the op reads on the host: their
# constants stay in host memory (a device copy would be read back, a sync, every call).
HOST_ARGS = {
    "OnnxReshape": {1},
    "OnnxExpand": {1},
    "OnnxSlice": {1, 2, 3, 4},
    "OnnxUnsqueezeDynamicAxes": {1},
    "OnnxSqueezeDynamicAxes": {1},
    "OnnxReduceSumDynamicAxes": {1},
    "OnnxTile": {1},
    "OnnxPadDynamic": {1, 2},
    "OnnxConstantOfShape": {0},
    "OnnxRange": {0, 1, 2},
    "OnnxSplit": {1},
    "OnnxResize": {1, 2, 3},
    "OnnxTopK": {1},
}


class Graph:
    """One converted graph: the module, its inputs and outputs as declared."""

    def __init__(self, path, pins, notes):
        t0 = time.perf_counter()
        m, n = prepare(path, pins)
        notes.extend(n)
        check_ops(m, path)
        self.path = path
        self.inputs = []  # (name, torch dtype, shape)
        inits = {t.name for t in m.graph.initializer}
        for vi in m.graph.input:
            if vi.name in inits:
                continue
            dt = ONNX_TO_TORCH_DTYPE.get(vi.type.tensor_type.elem_type)
            if dt is None:
                die(1, f"{path}: input {vi.name} has element type {vi.type.tensor_type.elem_type}, not supported here")
            self.inputs.append((vi.name, dt, [int(d) for d in _dims(vi)]))
        self.outputs = [o.name for o in m.graph.output]
        self.vocab = {}
        init = {t.name: t for t in m.graph.initializer}
        for node in m.graph.node:  # a token input indexes an embedding table: its rows
            if node.op_type == "Gather" and node.input[0] in init:
                self.vocab[node.input[1]] = int(init[node.input[0]].dims[0])
        # The shape inference was done in prepare, on the graph without its weights (a big
        # graph's would otherwise be written out to a temporary file and read again).
        saved = o2t_converter.safe_shape_inference
        o2t_converter.safe_shape_inference = lambda model, **_k: model
        try:
            self.module = onnx2torch.convert(m)
        except NotImplementedError as e:
            die(2, f"{path}: onnx2torch {O2T_VERSION}: {e}")
        finally:
            o2t_converter.safe_shape_inference = saved
        del m
        self.module.eval()
        self.host_buffers = self._host_buffers()
        self.convert_s = time.perf_counter() - t0

    def _host_buffers(self):
        gm = self.module
        host, data = set(), set()
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            cls = type(gm.get_submodule(node.target)).__name__
            pos = HOST_ARGS.get(cls, set())
            for i, a in enumerate(list(node.args) + list(node.kwargs.values())):
                if getattr(a, "op", None) == "get_attr":
                    (host if i in pos else data).add(a.target)
        both = host & data
        for name in both:  # read as a shape and as data: one copy of each
            host.discard(name)
        return sorted(host)

    def to(self, device):
        kept = {}
        for name in self.host_buffers:  # kept in host memory (see HOST_ARGS)
            mod_name, _, buf = name.rpartition(".")
            owner = self.module.get_submodule(mod_name)
            kept[name] = (owner, buf, owner._buffers[buf].cpu())
        self.module.to(device)
        for owner, buf, t in kept.values():
            owner._buffers[buf] = t
        return self

    def __call__(self, feed):
        try:
            args = [feed[n] for n, _, _ in self.inputs]
        except KeyError as e:
            raise RuntimeError(f"{self.path}: input {e} not fed") from None
        out = self.module(*args)
        if not isinstance(out, (tuple, list)):
            out = (out,)
        return dict(zip(self.outputs, out))


# ---------------------------------------------------------------------------------------
# The export's layout (seed layouts and format_version 2), as the runtime reads it.


class Plan:
    pass


def read_plan(export):
    with open(os.path.join(export, "reflex_config.json")) as f:
        cfg = json.load(f)
    p = Plan()
    p.cfg = cfg
    p.embed = None
    p.positions_input = None
    p.time = "one_to_zero"
    p.x = p.t = p.v = p.noise = p.actions = None
    p.steps = int(cfg.get("num_denoising_steps", 10))
    if cfg.get("format_version") == 2:
        d = cfg["denoise"]
        p.kind = "monolithic" if cfg["export_kind"] == "monolithic" else "decomposed"
        p.prefix = cfg["graphs"].get("prefix")
        p.expert = cfg["graphs"]["expert"]
        p.baked = d["expert"] == "baked"
        p.steps = int(d["steps"])
        p.time = d.get("time", "one_to_zero")
        p.noise, p.actions = d.get("noise_input"), d.get("actions_output")
        p.x, p.t, p.v = d.get("x_input"), d.get("t_input"), d.get("velocity_output")
        p.positions_input = d.get("positions_input")
        e = cfg.get("embed")
        if e:
            p.embed = dict(
                image=e["image"], text=e["text"], tokens=int(e["tokens"]), weight=e["state_weight"],
                bias=e.get("state_bias"), scale=float(e["scale"]), embeds_input=e["embeds_input"],
                mask_input=e["mask_input"], mask=e.get("mask", "valid"), offset_input=e.get("offset_input"),
                kv_mask_input=e.get("kv_mask_input"), cameras=len(cfg.get("cameras", [])) or 1,
            )
    elif cfg.get("export_kind") == "decomposed":
        d = cfg.get("decomposed", {})
        p.kind = "decomposed"
        p.prefix = d.get("vlm_prefix_onnx", "vlm_prefix.onnx")
        p.expert = d.get("expert_denoise_onnx", "expert_denoise.onnx")
        p.baked = not d.get("per_step_expert", False)
        p.noise, p.actions = "noise", "actions"
        p.x, p.t, p.v = "x_t", "t", "v_t"
    elif cfg.get("export_kind") == "monolithic":
        p.kind, p.prefix, p.expert, p.baked = "monolithic", None, "model.onnx", True
        p.noise, p.actions = "noise", "actions"
    elif "export_kind" not in cfg and os.path.exists(os.path.join(export, "expert_stack.onnx")):
        # The seed's SmolVLA four-graph layout, fed as its runtime feeds it (reflex's
        # `--seed-quirks keep`, the default): one camera, the prefill mask 0 for images and
        # text and 1 for the state, the expert's kv_mask all true.
        hidden = cfg.get("vlm_hidden_size") or cfg.get("vlm_kv_dim") or 960
        p.kind, p.prefix, p.expert, p.baked = "decomposed", cfg.get("decoder_prefill_onnx", "decoder_prefill.onnx"), "expert_stack.onnx", False
        p.x, p.t, p.v = "noisy_actions", "timestep", "velocity"
        p.positions_input = "position_ids"
        bias = "state_proj_bias.npy" if os.path.exists(os.path.join(export, "state_proj_bias.npy")) else None
        p.embed = dict(
            image=dict(graph=cfg.get("vlm_prefix_onnx", "vision_encoder.onnx"), input="pixel_values", output="image_embeds"),
            text=dict(graph=cfg.get("text_embedder_onnx", "text_embedder.onnx"), input="input_ids", output="text_embeds"),
            tokens=32, weight="state_proj_weight.npy", bias=bias, scale=math.sqrt(hidden),
            embeds_input="inputs_embeds", mask_input="attention_mask", mask="seed",
            offset_input="prefix_offset", kv_mask_input="kv_mask", cameras=1,
        )
    else:
        die(1, f"{export}/reflex_config.json: an export layout this baseline does not know")
    return p


# ---------------------------------------------------------------------------------------
# Synthetic inputs and the Act.


def synth(name, dtype, shape, vocab, gen):
    """One input of the declared dtype and shape: images in [-1, 1], valid token ids,
    masks half real (token masks) or on, noise and state Gaussian."""
    low = name.lower()
    if dtype == torch.bool:
        t = torch.ones(shape, dtype=torch.bool)
        if len(shape) == 2 and shape[-1] > 1:  # a token mask: the first half real
            t[:, shape[-1] // 2 :] = False
        return t
    if dtype in (torch.int64, torch.int32):
        if "mask" in low:
            return torch.ones(shape, dtype=dtype)
        hi = vocab.get(name, 2)
        return torch.randint(0, max(hi, 1), shape, generator=gen, dtype=torch.int64).to(dtype)
    if len(shape) == 4 and shape[1] == 3:
        return (torch.rand(shape, generator=gen) * 2 - 1).to(dtype)
    scale = 0.5 if "state" in low else 1.0
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


class Model:
    """The export's graphs and one Act over them, on one device."""

    def __init__(self, export, plan, notes):
        self.plan, self.notes = plan, notes
        self.g = {}
        e = plan.embed
        t0 = time.perf_counter()
        if e:
            img = Graph(os.path.join(export, e["image"]["graph"]), {"batch": 1}, notes)
            per_cam = _out_dims(img, e["image"]["output"])[1]
            self.g["image"] = img
            self.g["text"] = Graph(os.path.join(export, e["text"]["graph"]), {"batch": 1, "seq": e["tokens"]}, notes)
            self.length = e["cameras"] * per_cam + e["tokens"] + 1
            pins = {"batch": 1, "seq": self.length}
            self.w = torch.from_numpy(np.load(os.path.join(export, e["weight"])).astype(np.float32))
            self.b = (
                torch.from_numpy(np.load(os.path.join(export, e["bias"])).astype(np.float32))
                if e["bias"] else torch.zeros(self.w.shape[0])
            )
        else:
            pins = {"batch": 1}
        if plan.prefix:
            self.g["prefix"] = Graph(os.path.join(export, plan.prefix), pins, notes)
        self.g["expert"] = Graph(os.path.join(export, plan.expert), pins, notes)
        self.load_s = time.perf_counter() - t0
        self.device = torch.device("cpu")

    def to(self, device):
        self.device = torch.device(device)
        for g in self.g.values():
            g.to(device)
        if self.plan.embed:
            self.w, self.b = self.w.to(device), self.b.to(device)
        return self

    def make_inputs(self, seed=0):
        """The observation-side feed (every graph input not made by the Act itself)."""
        gen = torch.Generator().manual_seed(seed)
        p, feed = self.plan, {}
        made = {p.x, p.t, p.positions_input}
        if p.embed:
            e = p.embed
            made |= {e["embeds_input"], e["mask_input"], e["offset_input"], e["kv_mask_input"]}
        for g in self.g.values():
            handed = set(self.g["prefix"].outputs) if "prefix" in self.g and g is self.g["expert"] else set()
            for name, dt, shape in g.inputs:
                if name in feed or name in made or name in handed:
                    continue
                if p.embed and g is self.g["image"]:
                    for c in range(p.embed["cameras"]):
                        feed[f"{name}#{c}"] = synth(name, dt, shape, g.vocab, gen)
                    continue
                feed[name] = synth(name, dt, shape, g.vocab, gen)
        if p.embed:
            feed["#state"] = torch.randn(self.w.shape[1], generator=gen) * 0.5
        if not p.baked:
            x = next((s for n, _, s in self.g["expert"].inputs if n == p.x), None)
            feed["#noise"] = torch.randn(x, generator=gen)
        return feed

    def constants(self, feed):
        """Act constants on the device, made once: the step times, positions, the masks of
        an assembled prefix (a CUDA graph replays them, never rebuilds them)."""
        p, c = self.plan, {}
        if not p.baked:
            n = p.steps
            t0, dt = (1.0, -1.0 / n) if p.time == "one_to_zero" else (0.0, 1.0 / n)
            tshape = next(s for nm, _, s in self.g["expert"].inputs if nm == p.t)
            c["times"] = [torch.full(tshape, float(np.float32(t0 + k * dt)), dtype=torch.float32, device=self.device) for k in range(n)]
            c["dt"] = float(np.float32(dt))
        ex = {n: (dt, s) for n, dt, s in self.g["expert"].inputs}
        if p.positions_input and p.positions_input in ex:
            dt, s = ex[p.positions_input]
            c[p.positions_input] = torch.arange(s[-1], dtype=dt, device=self.device).reshape(s)
        if p.embed:
            e, L = p.embed, self.length
            mask_dt = dict((n, d) for n, d, _ in self.g["prefix"].inputs)[e["mask_input"]]
            if e["mask"] == "seed":
                mask = torch.zeros(1, L, dtype=mask_dt)
                mask[0, -1] = 1
                kv = torch.ones(1, L, dtype=torch.bool)
            else:
                mask = torch.ones(1, L, dtype=mask_dt)
                kv = torch.ones(1, L, dtype=torch.bool)
            c[e["mask_input"]] = mask.to(self.device)
            if e["offset_input"] in ex:
                c[e["offset_input"]] = torch.full(ex[e["offset_input"]][1], L, dtype=ex[e["offset_input"]][0], device=self.device)
            if e["kv_mask_input"] in ex:
                c[e["kv_mask_input"]] = kv.to(ex[e["kv_mask_input"]][0]).to(self.device)
        return c

    def prefix(self, feed, c):
        """The prefix graph's outputs (with, for an assembled prefix, what the expert gets
        beside them), by name."""
        p = self.plan
        if p.kind == "monolithic":
            return {}
        if not p.embed:
            return self.g["prefix"](feed)
        e = p.embed
        parts = []
        img = self.g["image"]
        for cam in range(e["cameras"]):
            out = img({e["image"]["input"]: feed[f"{e['image']['input']}#{cam}"]})
            parts.append(out[e["image"]["output"]] * e["scale"])
        txt = self.g["text"]({e["text"]["input"]: feed[e["text"]["input"]]})
        parts.append(txt[e["text"]["output"]] * e["scale"])
        state = torch.nn.functional.linear(feed["#state"], self.w, self.b)
        parts.append(state.reshape(1, 1, -1))
        embeds = torch.cat(parts, dim=1)
        out = self.g["prefix"]({e["embeds_input"]: embeds, e["mask_input"]: c[e["mask_input"]]})
        for k in (e["offset_input"], e["kv_mask_input"]):
            if k in c:
                out[k] = c[k]
        return out

    def denoise(self, feed, pre, c):
        p = self.plan
        ex = self.g["expert"]
        f = dict(feed)
        f.update(pre)
        if p.positions_input in c:
            f[p.positions_input] = c[p.positions_input]
        if p.baked:
            return ex(f)[p.actions]
        x = feed["#noise"]
        for t in c["times"]:
            f[p.x], f[p.t] = x, t
            x = x + c["dt"] * ex(f)[p.v]
        return x


def _out_dims(graph, name):
    # The image graph's output shape, from one run on zeros (pinned, so static).
    feed = {n: torch.zeros(s, dtype=dt) for n, dt, s in graph.inputs}
    with torch.inference_mode():
        return list(graph(feed)[name].shape)


# ---------------------------------------------------------------------------------------
# Timing.


def pct(v, p):
    """Nearest-rank percentile, as reflex's latency summaries (src/latency.rs)."""
    if not v:
        return float("nan")
    s = sorted(v)
    rank = max(1, math.ceil(p / 100.0 * len(s)))
    return s[min(rank, len(s)) - 1]


def summary(v):
    return {"p50": round(pct(v, 50), 4), "p99": round(pct(v, 99), 4)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_acts(step_prefix, step_denoise, dev, calls, warmup):
    """Times `warmup + calls` Acts: step_prefix(), then step_denoise(its result), the device
    synchronised around each; the measured ones' prefix, denoise and Act ms."""
    pre_ms, den_ms, act_ms = [], [], []
    for i in range(warmup + calls):
        sync(dev)
        t0 = time.perf_counter()
        pre = step_prefix()
        sync(dev)
        t1 = time.perf_counter()
        step_denoise(pre)
        sync(dev)
        t2 = time.perf_counter()
        if i >= warmup:
            pre_ms.append((t1 - t0) * 1e3)
            den_ms.append((t2 - t1) * 1e3)
            act_ms.append((t2 - t0) * 1e3)
    return pre_ms, den_ms, act_ms


def time_eager(model, feed, c, calls, warmup):
    return time_acts(
        lambda: model.prefix(feed, c),
        lambda pre: model.denoise(feed, pre, c),
        model.device,
        calls,
        warmup,
    )


def time_graphs(model, feed, c, calls, warmup):
    """The Act as two captured CUDA graphs sharing one pool, prefix then denoise, over
    static buffers (the feed, the constants, the prefix's outputs)."""
    dev = model.device
    s = torch.cuda.Stream(device=dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s):  # warm-up off the default stream, as capture wants
        for _ in range(2):
            model.denoise(feed, model.prefix(feed, c), c)
    torch.cuda.current_stream(dev).wait_stream(s)
    sync(dev)
    pool = torch.cuda.graph_pool_handle()
    t0 = time.perf_counter()
    g_pre, g_den = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    monolithic = model.plan.kind == "monolithic"
    if monolithic:  # no prefix graph: nothing to capture (an empty capture is an error)
        pre = {}
    else:
        with torch.cuda.graph(g_pre, pool=pool):
            pre = model.prefix(feed, c)
    with torch.cuda.graph(g_den, pool=pool):
        out = model.denoise(feed, pre, c)
    sync(dev)
    capture_s = time.perf_counter() - t0
    pre_ms, den_ms, act_ms = time_acts(
        (lambda: None) if monolithic else g_pre.replay,
        lambda _: g_den.replay(),
        dev,
        calls,
        warmup,
    )
    return pre_ms, den_ms, act_ms, capture_s, out


# ---------------------------------------------------------------------------------------
# Parity.


class OrtGraph:
    def __init__(self, graph, sess):
        self.inputs, self.outputs, self.sess, self.path = graph.inputs, graph.outputs, sess, graph.path

    def __call__(self, feed):
        args = {n: feed[n].detach().cpu().numpy() for n, _, _ in self.inputs}
        res = self.sess.run(self.outputs, args)
        return {n: torch.from_numpy(np.asarray(v)) for n, v in zip(self.outputs, res)}


def one_act(model, feed, c):
    with torch.inference_mode():
        pre = model.prefix(feed, c)
        act = model.denoise(feed, pre, c)
    return pre, act


def compare(pairs):
    worst_cos, worst_rel, rows = 1.0, 0.0, []
    for name, a, b in pairs:
        a = a.detach().double().cpu().reshape(-1)
        b = b.detach().double().cpu().reshape(-1)
        if a.numel() != b.numel():
            rows.append((name, -1.0, float("inf")))
            worst_cos, worst_rel = -1.0, float("inf")
            continue
        na, nb = a.norm().item(), b.norm().item()
        cos = 1.0 if na == 0 and nb == 0 else (a @ b).item() / max(na * nb, 1e-300)
        scale = max(b.abs().max().item(), 1e-30)
        rel = (a - b).abs().max().item() / scale
        rows.append((name, cos, rel))
        worst_cos, worst_rel = min(worst_cos, cos), max(worst_rel, rel)
    return worst_cos, worst_rel, rows


def ort_reference(model, notes):
    """onnxruntime CPU sessions of the export's graphs (no graph optimisation: the graphs as
    written), or None with a note saying why not."""
    try:
        import onnxruntime as ort
    except ImportError:
        notes.append("parity: onnxruntime is not importable here")
        return None, None
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        graphs = {k: OrtGraph(g, ort.InferenceSession(g.path, so, providers=["CPUExecutionProvider"])) for k, g in model.g.items()}
    except Exception as e:  # noqa: BLE001 - a graph onnxruntime refuses: say so, go on
        notes.append(f"parity: onnxruntime could not load the graphs ({str(e)[:200]})")
        return None, None
    return graphs, f"onnxruntime {ort.__version__} cpu"


def run_parity(model, ref, feed_dev, c_dev, feed_cpu, c_cpu):
    """(worst_cos, worst_rel, rows): this model's Act vs the reference's, prefix tensors
    and actions."""
    pre, act = one_act(model, feed_dev, c_dev)
    saved = model.g, model.device, (getattr(model, "w", None), getattr(model, "b", None))
    try:
        model.g, model.device = ref["graphs"], torch.device("cpu")
        if model.plan.embed:
            model.w, model.b = ref["w"], ref["b"]
        rpre, ract = one_act(model, feed_cpu, c_cpu)
    finally:
        model.g, model.device = saved[0], saved[1]
        if model.plan.embed:
            model.w, model.b = saved[2]
    pairs = [(f"prefix {k}", pre[k], rpre[k]) for k in sorted(rpre) if k in pre]
    pairs.append(("actions", act, ract))
    return compare(pairs)


def placement_check(model, feed_cpu):
    """`--device meta`: one Act with the weights and data on PyTorch's meta device (no
    values) and the shape constants in host memory, as on a GPU. A module that reads a
    device value on the host (a sync per call, and an error under CUDA graph capture) or
    mixes host and device tensors fails here, by name, without a GPU."""
    current = ["?"]
    for g in model.g.values():
        for name, mod in g.module.named_modules():
            if name:
                where = f"{os.path.basename(g.path)}:{name} ({type(mod).__name__})"
                mod.register_forward_pre_hook(lambda _m, _a, n=where: current.__setitem__(0, n))
    model.to("meta")
    feed = {k: v.to("meta") for k, v in feed_cpu.items()}
    c = model.constants(feed)
    from torch.utils._python_dispatch import TorchDispatchMode

    uploads = []

    class Uploads(TorchDispatchMode):
        # Host data copied to the device inside a forward (torch.tensor(..., device=x.device),
        # .to(x.device)): a pageable copy per call, which CUDA graph capture refuses.
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = str(func)
            if name.startswith("aten.lift_fresh") and args and getattr(args[0], "device", None) == torch.device("meta"):
                uploads.append(current[0])
            elif name.startswith(("aten._to_copy", "aten.copy_")):
                src = args[1] if name.startswith("aten.copy_") else args[0]
                dst = args[0].device if name.startswith("aten.copy_") else kwargs.get("device")
                if getattr(src, "device", None) == torch.device("cpu") and src.dim() > 0 and dst == torch.device("meta"):
                    uploads.append(current[0])
            return func(*args, **(kwargs or {}))

    try:
        with Uploads():
            one_act(model, feed, c)
    except Exception as e:  # noqa: BLE001 - the finding itself
        print(f"placement check (meta device): FAIL at {current[0]}: {type(e).__name__}: {str(e)[:300]}")
        return 5
    if uploads:
        print(f"placement check (meta device): FAIL: {len(uploads)} host-to-device copies in one Act, first at {uploads[0]}")
        return 5
    print("placement check (meta device): PASS: one Act reads no device value on the host and copies no host data to the device")
    return 0


# ---------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", required=True, help="an export folder (reflex_config.json and its graphs)")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu, or meta (a placement check: no timing)")
    ap.add_argument("--calls", type=int, default=50, help="measured Acts per mode")
    ap.add_argument("--warmup", type=int, default=3, help="Acts run before measuring")
    ap.add_argument("--modes", default="eager,graphs", help="eager and/or graphs (CUDA graphs; cuda only)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--parity-vs", default="auto", choices=["auto", "onnxruntime", "torch-cpu", "none"],
                    help="the parity Act's reference: auto (onnxruntime cpu if it imports, else torch on the cpu when the device is not), or one of them, or none")
    ap.add_argument("--strict", action="store_true", help="exit 3 when parity fails")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads on cpu (0: torch's default)")
    a = ap.parse_args()
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("eager", "graphs"):
            die(1, f"--modes: {m!r} is not eager or graphs")
    if a.calls < 1 or a.warmup < 0:
        die(1, "--calls must be >= 1 and --warmup >= 0")
    if not os.path.isfile(os.path.join(a.export, "reflex_config.json")):
        die(1, f"{a.export}: no reflex_config.json")
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        die(1, f"--device {a.device}: torch {torch.__version__} sees no CUDA device")
    if a.threads:
        torch.set_num_threads(a.threads)
    # fp32 as the reflex engines compute it: no TF32 in matmuls or convolutions.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_grad_enabled(False)

    notes = []
    register_converters()
    plan = read_plan(a.export)
    model = Model(a.export, plan, notes)
    if ALIASES:
        notes.append("converters added: Slice-10/11/13 (constant bounds, tuple index), Gather-1/11/13 (constant indices), SplitToSequence-11, SequenceAt-11, CumSum-11/14 (axis read once), ReduceMean/Max/Min-18 (axes input); " + ", ".join(ALIASES))
    feed_cpu = model.make_inputs(seed=0)
    model.to("cpu")
    c_cpu = model.constants(feed_cpu)

    if device.type == "meta":
        sys.exit(placement_check(model, feed_cpu))

    ref, vs = None, None
    if a.parity_vs != "none":
        graphs = None
        if a.parity_vs in ("auto", "onnxruntime"):
            graphs, vs = ort_reference(model, notes)
            if graphs is None and a.parity_vs == "onnxruntime":
                die(1, "--parity-vs onnxruntime: " + notes[-1])
        if graphs is None and (a.parity_vs == "torch-cpu" or device.type != "cpu"):
            # The same converted graphs on the cpu, copied before the move: this checks the
            # device's numerics, not the conversion (the fixtures' conversion is checked
            # against onnxruntime where it imports).
            import copy

            graphs = {k: copy.deepcopy(g) for k, g in model.g.items()}
            vs = "pytorch cpu (the same converted graphs)"
        if graphs is not None:
            ref = {"graphs": graphs}
            if plan.embed:
                ref["w"], ref["b"] = model.w.clone(), model.b.clone()
        else:
            notes.append("parity: not checked (no onnxruntime, and the device is the cpu)")

    t0 = time.perf_counter()
    model.to(device)
    to_s = time.perf_counter() - t0
    feed = {k: v.to(device) for k, v in feed_cpu.items()}
    c = model.constants(feed)
    load_s = model.load_s + to_s
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch_baseline: {a.export}: {plan.kind}{'' if plan.kind == 'monolithic' else (' baked' if plan.baked else f' per-step x{plan.steps}')}{' (assembled prefix)' if plan.embed else ''} on {where}; pytorch {torch.__version__}, onnx2torch {O2T_VERSION}; load {load_s:.2f} s")

    par = None
    if ref is not None:
        wc, wr, rows = run_parity(model, ref, feed, c, feed_cpu, c_cpu)
        ok = wc >= 0.9999 and wr <= 1e-3
        par = {"vs": vs, "worst_cos": round(wc, 9), "worst_max_rel": float(f"{wr:.3e}"), "ok": ok,
               "tensors": len(rows), "bound": "cos >= 0.9999, max |d|/max |ref| <= 1e-3"}
        worst = min(rows, key=lambda r: (r[1], -r[2]))
        print(f"parity vs {vs}: worst cos {wc:.9f}, worst max |d|/scale {wr:.3e} over {len(rows)} tensors (worst: {worst[0]}) -> {'PASS' if ok else 'FAIL'}")
    else:  # the same shape, unchecked
        par = {"vs": None, "worst_cos": None, "ok": None}

    if device.type == "cuda":  # device syncs in one eager Act: each breaks CUDA graph capture
        try:
            torch.cuda.set_sync_debug_mode("warn")
            import warnings

            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                one_act(model, feed, c)
            torch.cuda.set_sync_debug_mode("default")
            syncs = [x for x in w if "synchroniz" in str(x.message).lower()]
            notes.append(f"device syncs in one eager Act: {len(syncs)}")
        except Exception as e:  # noqa: BLE001 - a diagnostic only
            notes.append(f"sync check not run: {e}")

    out_modes = []
    for m in modes:
        if m == "graphs" and device.type != "cuda":
            notes.append("graphs: skipped (CUDA graphs need --device cuda)")
            print("pytorch + cuda graphs: skipped (CUDA graphs need --device cuda)")
            continue
        entry = {"name": "pytorch eager" if m == "eager" else "pytorch + cuda graphs", "calls": a.calls, "warmup": a.warmup}
        try:
            with torch.inference_mode():
                if m == "eager":
                    pre, den, act = time_eager(model, feed, c, a.calls, a.warmup)
                    entry["load_s"] = round(load_s, 3)
                else:
                    pre, den, act, cap, out = time_graphs(model, feed, c, a.calls, a.warmup)
                    entry["load_s"] = round(load_s + cap, 3)
                    entry["capture_s"] = round(cap, 3)
                    # Replays give what the eager Act gives.
                    _, eager_act = one_act(model, feed, c)
                    wc, wr, _ = compare([("actions", out, eager_act)])
                    entry["vs_eager"] = {"cos": round(wc, 9), "max_rel": float(f"{wr:.3e}")}
        except Exception as e:  # noqa: BLE001 - one mode failing still reports the others
            entry["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            print(f"{entry['name']}: FAILED: {entry['error']}")
            out_modes.append(entry)
            continue
        if plan.kind == "monolithic":
            entry["prefix_ms"] = {"p50": 0.0, "p99": 0.0}
        else:
            entry["prefix_ms"] = summary(pre)
        entry["denoise_ms"], entry["act_ms"] = summary(den), summary(act)
        out_modes.append(entry)
        print(
            f"{entry['name']}: prefix {entry['prefix_ms']['p50']:.3f}/{entry['prefix_ms']['p99']:.3f} ms, "
            f"denoise {entry['denoise_ms']['p50']:.3f}/{entry['denoise_ms']['p99']:.3f} ms, "
            f"act {entry['act_ms']['p50']:.3f}/{entry['act_ms']['p99']:.3f} ms (p50/p99, {a.calls} calls after {a.warmup}); load {entry['load_s']:.2f} s"
            + (f"; replay vs eager cos {entry['vs_eager']['cos']:.9f}" if "vs_eager" in entry else "")
        )
    notes.append("timed: graph execution on inputs already on the device (synthetic, seed 0), a device sync after the prefix and after the denoise; no pre/post-processing, no prefix copy to the host; fp32, TF32 off")
    for n in notes:
        print(f"note: {n}")
    result = {
        "baseline": f"pytorch {torch.__version__} onnx2torch {O2T_VERSION}",
        "device": where,
        "export": os.path.abspath(a.export),
        "kind": plan.kind if plan.kind == "monolithic" else ("decomposed baked" if plan.baked else f"decomposed per-step x{plan.steps}"),
        "modes": out_modes,
        "parity": par,
        "notes": notes,
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    if a.strict and par is not None and par.get("ok") is False:
        sys.exit(3)
    if any("error" in m for m in out_modes) and not any("error" not in m for m in out_modes):
        sys.exit(4)


if __name__ == "__main__":
    main()
