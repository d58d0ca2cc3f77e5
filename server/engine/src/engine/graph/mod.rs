//! The GPU executor's compiler: an export's ONNX graph lowered to a flat
//! program of a few kernel kinds, independent of any device.
//!
//! A [`Program`] is a list of [`Op`]s over numbered buffers, every shape fixed
//! at load (the export declares concrete shapes). Four kinds of work remain
//! after lowering:
//! - [`Op::Map`]: one output element per thread, computed by an [`Expr`] over
//!   loads at affine offsets of the output coordinates. Elementwise chains
//!   (bias add + GELU, residual adds, the velocity formula), broadcasts,
//!   transposes, concatenation, embedding gathers and the convolution's
//!   im2col are all maps; a single-use elementwise result is fused into its
//!   consumer instead of being written out.
//! - [`Op::Gemm`]: (batched) matrix products, for cuBLAS; [`cublas_call`]
//!   turns the row-major description into cuBLAS's column-major arguments.
//! - [`Op::LayerNorm`], [`Op::Softmax`], [`Op::Axis`]: row reductions (mean, sum) and the
//!   running sum along one axis.
//! - [`Op::Fill`] and [`Op::Step`]: the denoise loop's own steps
//!   (`t ← 0`; `x ← x + dt·v` with the next `t`), see [`denoise_ops`].
//!
//! [`reference`] runs a program on the CPU with the same semantics as the
//! CUDA kernels (including the column-major cuBLAS arguments), which is how
//! the lowering is tested against tract on machines without a GPU;
//! [`cuda_src`] prints the map kernels as CUDA C for NVRTC.

pub mod cuda_src;
pub mod host;
pub mod reference;

use std::collections::HashMap;
use std::path::Path;

use prost::Message;
use tract_onnx::pb;

use super::EngineError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    I64,
    /// Booleans (masks). A bool graph input or a bool computed at run time is held in a
    /// float32 buffer as 0 or 1 (the host converts an input when staging it); buffers
    /// themselves are F32 or I64 only. Int64 values computed at run time (a mask's CumSum)
    /// are held the same way, exact below 2^24.
    Bool,
}

/// One device buffer: its element count, type and (for weights) contents.
#[derive(Debug, Clone)]
pub struct Buffer {
    pub len: usize,
    pub dtype: DType,
    pub init: Option<Vec<f32>>,
    /// Stored in the program's half [`Precision`] (2 bytes; computed in f32, rounded on
    /// store): tensor-core GEMM operands and results, big embedding tables.
    pub half: bool,
}

impl Buffer {
    /// Bytes on the device at precision `p`.
    pub fn bytes(&self, p: Precision) -> usize {
        self.len
            * match self.dtype {
                DType::I64 => 8,
                _ if self.half => p.bytes(),
                _ => 4,
            }
    }
}

/// How a program stores its float weights and activations (`--precision`): f32, or half
/// (IEEE f16 or bfloat16) for the GEMMs' operands and results, with f32 accumulation and
/// everything else (norms, softmax, masks, positions, the loop's x) in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Precision {
    #[default]
    F32,
    F16,
    BF16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::BF16 => "bf16",
        }
    }

    /// Bytes of one stored value.
    pub fn bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            _ => 2,
        }
    }

    /// `x` rounded to this precision (to nearest, ties to even; what the device's
    /// conversions do), as f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Precision::F32 => x,
            Precision::F16 => half::f16::from_f32(x).to_f32(),
            Precision::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    /// The stored bits of `x` (a half buffer's upload).
    pub fn bits(self, x: f32) -> u16 {
        match self {
            Precision::F16 => half::f16::from_f32(x).to_bits(),
            _ => half::bf16::from_f32(x).to_bits(),
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "f16" | "fp16" => Ok(Precision::F16),
            "bf16" => Ok(Precision::BF16),
            other => Err(format!(
                "unknown precision {other:?} (one of: f32, f16, bf16)"
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    /// Exact GELU, x·½·(1 + erf(x/√2)): the ONNX Gelu op, or the five-node
    /// pattern exporters write before opset 20 (recognised at load).
    Gelu,
    /// GELU's tanh approximation (Gelu with approximate="tanh").
    GeluTanh,
    Erf,
    Sin,
    Cos,
    Exp,
    Tanh,
    Sqrt,
    Neg,
    Relu,
    Sigmoid,
    /// 1/x (ONNX Reciprocal).
    Reciprocal,
    /// 1 when x is 0, else 0 (ONNX Not).
    Not,
    /// 1 when x is not 0, else 0 (Cast to bool).
    NonZero,
    /// Toward zero (Cast of a float to an integer type).
    Trunc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    /// a^b (ONNX Pow with a float exponent; `x^2` is lowered to `x·x` instead).
    Pow,
    /// fmaxf / fminf (ONNX Max, Min of two inputs; Clip).
    Max,
    Min,
    /// Comparisons and logic on values held as floats: 1 when true, 0 when false.
    Equal,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    And,
    Or,
}

impl BinOp {
    /// Comparisons and logic: their result is a bool (1 or 0).
    pub fn is_predicate(self) -> bool {
        matches!(
            self,
            BinOp::Equal
                | BinOp::Less
                | BinOp::LessOrEqual
                | BinOp::Greater
                | BinOp::GreaterOrEqual
                | BinOp::And
                | BinOp::Or
        )
    }
}

/// The elements of a row-major host tensor of shape `from` at `first[d] + c_d · step[d]`
/// for every coordinate `c` of `out`: Slice and Split of tensors known at load.
fn pick_strided<T: Copy>(
    vals: &[T],
    from: &[usize],
    out: &[usize],
    first: &[i64],
    step: &[i64],
) -> Vec<T> {
    let st = strides(from);
    let n: usize = out.iter().product();
    let mut picked = Vec::with_capacity(n);
    for idx in 0..n {
        let (mut r, mut at) = (idx, 0i64);
        for d in (0..out.len()).rev() {
            let c = (r % out[d]) as i64;
            r /= out[d];
            at += (first[d] + c * step[d]) * st[d];
        }
        picked.push(vals[at as usize]);
    }
    picked
}

/// A load-time value as float64 (a float64 tensor, a float32 scalar, int64 constants).
fn load_time_f64(src: &Source) -> Option<Vec<f64>> {
    match src {
        Source::F64(v) => Some(v.clone()),
        Source::Scalar(x) => Some(vec![*x as f64]),
        Source::Ints(i) => Some(i.iter().map(|&x| x as f64).collect()),
        _ => None,
    }
}

fn float64_at_run_time(name: &str) -> String {
    format!(
        "{name} is a float64 value computed at run time (a time embedding from a time input); \
         the cuda engine computes float64 only at load"
    )
}

/// `f(p[i], q[j])` for every element of `out`, which `ps` and `qs` broadcast to: the
/// load-time folding of binary operators.
fn fold_broadcast<T: Copy>(
    (p, ps): (&[T], &[usize]),
    (q, qs): (&[T], &[usize]),
    out: &[usize],
    f: impl Fn(T, T) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let (cp, cq) = (broadcast_coefs(ps, out), broadcast_coefs(qs, out));
    let n: usize = out.iter().product();
    let mut v = Vec::with_capacity(n);
    for idx in 0..n {
        let (mut r, mut i, mut j) = (idx, 0i64, 0i64);
        for d in (0..out.len()).rev() {
            let c = (r % out[d]) as i64;
            r /= out[d];
            i += c * cp[d];
            j += c * cq[d];
        }
        v.push(f(p[i as usize], q[j as usize])?);
    }
    Ok(v)
}

/// `op` on two load-time float64 tensors, broadcast to `out`, in double precision.
fn fold_f64(
    op: BinOp,
    p: &[f64],
    ps: &[usize],
    q: &[f64],
    qs: &[usize],
    out: &[usize],
) -> Result<Vec<f64>, String> {
    fold_broadcast((p, ps), (q, qs), out, |a, b| {
        Ok(match op {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
            BinOp::Pow => a.powf(b),
            BinOp::Max => a.max(b),
            BinOp::Min => a.min(b),
            other => return Err(format!("{other:?} of float64 tensors")),
        })
    })
}

/// `op` on two load-time int64 tensors, broadcast to `out` (integer division truncates,
/// as onnxruntime's does).
fn fold_ints(
    op: BinOp,
    p: &[i64],
    ps: &[usize],
    q: &[i64],
    qs: &[usize],
    out: &[usize],
) -> Result<Vec<i64>, String> {
    fold_broadcast((p, ps), (q, qs), out, |a, b| {
        Ok(match op {
            BinOp::Add => a.wrapping_add(b),
            BinOp::Sub => a.wrapping_sub(b),
            BinOp::Mul => a.wrapping_mul(b),
            BinOp::Div if b != 0 => a / b,
            BinOp::Div => return Err("int64 division by zero at load".into()),
            BinOp::Max => a.max(b),
            BinOp::Min => a.min(b),
            BinOp::Equal => (a == b) as i64,
            BinOp::Less => (a < b) as i64,
            BinOp::LessOrEqual => (a <= b) as i64,
            BinOp::Greater => (a > b) as i64,
            BinOp::GreaterOrEqual => (a >= b) as i64,
            BinOp::And => (a != 0 && b != 0) as i64,
            BinOp::Or => (a != 0 || b != 0) as i64,
            BinOp::Pow => return Err("Pow of int64 tensors".into()),
        })
    })
}

/// The value of one output element. Coordinates are those of the map's
/// output; a load reads `src[offset + Σ coord_d · coefs_d]`.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Load {
        src: usize,
        coefs: Vec<i64>,
        offset: i64,
    },
    /// `table[clamp(index[..]) · row_len + row offset]`: an embedding lookup.
    Gather {
        table: usize,
        rows: i64,
        row_len: i64,
        index: usize,
        index_coefs: Vec<i64>,
        index_offset: i64,
        row_coefs: Vec<i64>,
        row_offset: i64,
    },
    Const(f32),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `cond ≠ 0 ? then : else` (ONNX Where); only the chosen side counts, so a
    /// -inf or NaN on the other never leaks in.
    Where(Box<Expr>, Box<Expr>, Box<Expr>),
    /// Concatenation along `axis`: part j holds coordinates from `starts[j]`
    /// and is an expression over its own (part-local) coordinates and shape.
    Select {
        axis: usize,
        starts: Vec<i64>,
        parts: Vec<Expr>,
    },
    /// `Σ_p a·b` over p < len: a small matrix product fused into its
    /// consumer. `a` and `b` are loads over the output coordinates plus p
    /// (one more coefficient, last).
    Dot {
        len: i64,
        a: Box<Expr>,
        b: Box<Expr>,
    },
    /// `expr` over the coordinates of `from`, which has the same elements in
    /// the same order as the current shape (a reshape of a fused value).
    Reshape {
        from: Vec<usize>,
        expr: Box<Expr>,
    },
}

impl Expr {
    fn nodes(&self) -> usize {
        match self {
            Expr::Load { .. } | Expr::Gather { .. } | Expr::Const(_) => 1,
            Expr::Unary(_, x) => 1 + x.nodes(),
            Expr::Binary(_, a, b) => 1 + a.nodes() + b.nodes(),
            Expr::Where(c, a, b) => 1 + c.nodes() + a.nodes() + b.nodes(),
            Expr::Select { parts, .. } => 1 + parts.iter().map(Expr::nodes).sum::<usize>(),
            Expr::Dot { a, b, len } => 1 + (a.nodes() + b.nodes()) * *len as usize,
            Expr::Reshape { expr, .. } => 1 + expr.nodes(),
        }
    }

    /// Whether a product ([`Expr::Dot`]) is computed inside it.
    fn has_dot(&self) -> bool {
        match self {
            Expr::Load { .. } | Expr::Gather { .. } | Expr::Const(_) => false,
            Expr::Dot { .. } => true,
            Expr::Unary(_, x) | Expr::Reshape { expr: x, .. } => x.has_dot(),
            Expr::Binary(_, a, b) => a.has_dot() || b.has_dot(),
            Expr::Where(c, a, b) => c.has_dot() || a.has_dot() || b.has_dot(),
            Expr::Select { parts, .. } => parts.iter().any(Expr::has_dot),
        }
    }

    /// A few unary and binary functions of loads: cheap to compute again for every
    /// element it broadcasts to.
    fn small_pointwise(&self) -> bool {
        fn pointwise(e: &Expr) -> bool {
            match e {
                Expr::Load { .. } | Expr::Const(_) => true,
                Expr::Unary(_, x) => pointwise(x),
                Expr::Binary(_, a, b) => pointwise(a) && pointwise(b),
                _ => false,
            }
        }
        self.nodes() <= 8 && pointwise(self)
    }

    /// Small enough to compute again in each consumer rather than store.
    fn cheap(&self) -> bool {
        self.nodes() <= 4
            && !matches!(
                self,
                Expr::Select { .. } | Expr::Gather { .. } | Expr::Dot { .. } | Expr::Reshape { .. }
            )
    }
}

/// Products up to this many multiply-adds become [`Expr::Dot`]s fused into
/// their consumers (one thread per output, a short loop); larger ones go to
/// cuBLAS. The reference model's per-step products are all far below it.
pub const DOT_MACS: usize = 1 << 22;

/// Row-major batched product: `c[b] = alpha · op(a[b]) · op(b[b])`, `c[b]`
/// an m×n matrix, `op(a)` m×k, `op(b)` k×n. A stored operand is row-major;
/// `*_trans` means it is stored transposed. Batch strides in elements.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemm {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: usize,
    pub a_trans: bool,
    pub a_stride: usize,
    pub b: usize,
    pub b_trans: bool,
    pub b_stride: usize,
    pub c: usize,
    pub alpha: f32,
    /// Where C's elements go: row `i` of batch `b` starts at `b·c_stride + i·c_ld` (row
    /// length `n`, contiguous). Contiguous C is `c_ld = n`, `c_stride = m·n`; attention's
    /// P·V writes its heads straight into token-major layout with `c_ld = heads·n`,
    /// `c_stride = n` ([`gemm_layouts`]).
    pub c_ld: usize,
    pub c_stride: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Map {
        out: usize,
        shape: Vec<usize>,
        expr: Expr,
    },
    Gemm(Gemm),
    LayerNorm {
        x: usize,
        gamma: usize,
        beta: usize,
        out: usize,
        rows: usize,
        dim: usize,
        eps: f32,
    },
    Softmax {
        x: usize,
        out: usize,
        rows: usize,
        dim: usize,
    },
    /// Softmax over the last axis of an expression over `shape` (attention's
    /// `scores + mask`), read as it is computed: one generated row kernel, the input never
    /// stored.
    SoftmaxOf {
        out: usize,
        shape: Vec<usize>,
        expr: Expr,
    },
    /// Along the middle axis of `x[outer, len, inner]`: the mean or the sum
    /// (`out[o, i]`), or the running sum (`out[o, l, i]`, ONNX CumSum), added in index order.
    Axis {
        kind: AxisKind,
        x: usize,
        out: usize,
        outer: usize,
        len: usize,
        inner: usize,
    },
    Fill {
        out: usize,
        len: usize,
        value: f32,
    },
    /// The Euler update `x ← x + dt · v`, in place, and `t ← t_next` for
    /// the next step (one launch for both).
    Step {
        x: usize,
        v: usize,
        len: usize,
        dt: f32,
        t: usize,
        t_next: f32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AxisKind {
    Mean,
    Sum,
    CumSum,
    /// The mean of the squares of contiguous rows (`inner` = 1): RMSNorm's statistic, the
    /// x·x map fused into the reduction instead of written out.
    MeanSquare,
}

/// A graph input or output: its name, buffer and shape.
#[derive(Debug, Clone)]
pub struct Port {
    pub name: String,
    pub buf: usize,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

#[derive(Debug, Clone)]
pub struct Program {
    pub name: String,
    pub buffers: Vec<Buffer>,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
    pub ops: Vec<Op>,
    /// The ONNX graph's node count, before any fusion.
    pub nodes: usize,
    /// Exact-GELU five-node patterns fused into one function (see `fuse_gelu`).
    pub fused_gelu: usize,
    /// `mean(x·x)` over rows (RMSNorm) read as one reduction ([`AxisKind::MeanSquare`]).
    pub fused_square_means: usize,
    /// Float64 work on a run-time scalar, done on the host per call ([`host`]); its
    /// results are inputs of this program.
    pub host: Option<host::HostIsland>,
    /// The storage of its [`Buffer::half`] buffers.
    pub precision: Precision,
    /// GEMMs that run on half operands (tensor cores), and the f32 → half copies made for
    /// operands that must stay f32 elsewhere (a port, a norm's input).
    pub half_gemms: usize,
    pub half_copies: usize,
    /// The transformer patterns the compiler fused (see [`Fusions`]).
    pub fusions: Fusions,
}

/// Counts of what the compiler fused beyond elementwise chains, for `reflex inspect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Fusions {
    /// Pieces of a split concatenation read from their parts where they lie (a stacked KV
    /// cache split per layer) instead of a copy of the whole stack per piece.
    pub split_parts: usize,
    /// Products whose constant factor (attention's 1/√d) is the GEMM's alpha.
    pub scaled_gemms: usize,
    /// Softmaxes that read their input as an expression (attention's scores + mask) instead
    /// of a stored tensor.
    pub fused_softmax_inputs: usize,
    /// GEMMs that write their result in the layout a following transpose wants (attention's
    /// heads back to tokens), the copy dropped.
    pub transposed_outputs: usize,
    /// Products of one input with several weights (Q/K/V, gate/up) run as one GEMM over the
    /// weights side by side; the count of products merged away.
    pub merged_gemms: usize,
}

/// The ONNX operators [`compile`] lowers (`Gelu` also as the five-node exact pattern).
/// `reflex inspect --engine cuda` checks every node of an export against it; a unit test
/// keeps it equal to what the lowering accepts.
pub const SUPPORTED_OPS: &[&str] = &[
    "Erf",
    "Gelu",
    "Sin",
    "Cos",
    "Exp",
    "Tanh",
    "Sqrt",
    "Neg",
    "Relu",
    "Sigmoid",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Identity",
    "Reshape",
    "Transpose",
    "Concat",
    "Gather",
    "MatMul",
    "Gemm",
    "Conv",
    "LayerNormalization",
    "Softmax",
    "ReduceMean",
    "Reciprocal",
    "Pow",
    "Constant",
    "Cast",
    "Shape",
    "Unsqueeze",
    "Squeeze",
    "Expand",
    "Slice",
    "Max",
    "Min",
    "Clip",
    "Range",
    "Split",
    "SplitToSequence",
    "SequenceAt",
    "Equal",
    "Less",
    "LessOrEqual",
    "Greater",
    "GreaterOrEqual",
    "And",
    "Or",
    "Not",
    "Where",
    "CumSum",
    "ReduceSum",
];

/// An input the caller of a whole program supplies (its graph's own inputs): a device
/// input, or a scalar the host island reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feed {
    pub name: String,
    pub shape: Vec<usize>,
    /// The ONNX element type: 1 float32, 7 int64, 9 bool, 11 float64 (a host input).
    pub elem: i32,
}

impl Program {
    pub fn input(&self, name: &str) -> Option<&Port> {
        self.inputs.iter().find(|p| p.name == name)
    }

    /// What a caller feeds: the device inputs the host island does not fill, then the
    /// island's own inputs not already among them.
    pub fn feeds(&self) -> Vec<Feed> {
        let filled = |name: &str| {
            self.host
                .as_ref()
                .is_some_and(|h| h.outputs.iter().any(|(n, _)| n == name))
        };
        let mut out: Vec<Feed> = self
            .inputs
            .iter()
            .filter(|p| !filled(&p.name))
            .map(|p| Feed {
                name: p.name.clone(),
                shape: p.shape.clone(),
                elem: match p.dtype {
                    DType::F32 => 1,
                    DType::I64 => 7,
                    DType::Bool => 9,
                },
            })
            .collect();
        for i in self.host.iter().flat_map(|h| &h.inputs) {
            if !out.iter().any(|f| f.name == i.name) {
                out.push(Feed {
                    name: i.name.clone(),
                    shape: i.shape.clone(),
                    elem: i.elem,
                });
            }
        }
        out
    }

    /// Number of launches one run makes (maps and reductions are one kernel
    /// each, a gemm one cuBLAS call).
    pub fn launches(&self) -> usize {
        self.ops.len()
    }

    /// Bytes of a port's values on the device: int64 in 8, floats and bools in 4 (a port is
    /// never stored in half).
    pub fn port_bytes(&self, port: &Port) -> usize {
        let width = if self.buffers[port.buf].dtype == DType::I64 {
            8
        } else {
            4
        };
        port.shape.iter().product::<usize>() * width
    }
}

/// The Euler loop unrolled: `first(0)`, then per step k the body and
/// `update(dt, t of step k+1)` — the same step times as [`super::euler`].
pub fn unroll<T: Clone>(
    body: &[T],
    steps: u32,
    first: impl Fn(f32) -> T,
    update: impl Fn(f32, f32) -> T,
) -> Vec<T> {
    let dt = 1.0 / steps as f32;
    let mut out = Vec::with_capacity((body.len() + 1) * steps as usize + 1);
    out.push(first(0.0));
    for k in 0..steps {
        out.extend(body.iter().cloned());
        out.push(update(dt, (k + 1) as f32 * dt));
    }
    out
}

/// The expert's denoise buffers: `x_t` (the chunk before and after), `t`,
/// and the velocity output.
pub struct DenoisePorts {
    pub x: Port,
    pub t: Port,
    pub v: Port,
}

pub fn denoise_ports(expert: &Program) -> Result<DenoisePorts, String> {
    let port = |name: &str| {
        expert
            .input(name)
            .cloned()
            .ok_or_else(|| format!("the expert graph has no input {name:?}"))
    };
    let v = expert
        .outputs
        .first()
        .cloned()
        .ok_or("the expert graph has no output")?;
    Ok(DenoisePorts {
        x: port("x_t")?,
        t: port("t")?,
        v,
    })
}

/// The whole Euler loop over an expert program as one op list.
pub fn denoise_ops(expert: &Program, steps: u32) -> Result<Vec<Op>, String> {
    let p = denoise_ports(expert)?;
    let len = p.x.shape.iter().product();
    Ok(unroll(
        &expert.ops,
        steps,
        |t| Op::Fill {
            out: p.t.buf,
            len: 1,
            value: t,
        },
        |dt, t_next| Op::Step {
            x: p.x.buf,
            v: p.v.buf,
            len,
            dt,
            t: p.t.buf,
            t_next,
        },
    ))
}

/// A real export's per-step expert run as one loop on the device: step k at `times[k]`, then
/// `x ← x + dt·v` (the runtime's own Euler loop, `vla::VlaModel::denoise`). The host island's
/// results (the float64 time embedding) are computed for every step at once, in double, into
/// one table per result; each step copies its row into the program's input. The whole loop is
/// then one op list — one CUDA graph — instead of one graph run and one host round trip per
/// step.
#[derive(Debug, Clone)]
pub struct DeviceLoop {
    pub x: Port,
    pub v: Port,
    /// The expert's time input when the device program reads it (filled each step).
    pub t: Option<Port>,
    /// Per host-island result: the program input it fills and its values, step after step.
    pub tables: Vec<(Port, Vec<f32>)>,
    pub times: Vec<f32>,
    pub dt: f32,
}

impl DeviceLoop {
    pub fn new(
        p: &Program,
        (x, t, v): (&str, &str, &str),
        times: &[f32],
        dt: f32,
    ) -> Result<DeviceLoop, String> {
        let x = p
            .input(x)
            .cloned()
            .ok_or_else(|| format!("the expert has no device input {x:?}"))?;
        let v = p
            .outputs
            .iter()
            .find(|o| o.name == v)
            .cloned()
            .ok_or_else(|| format!("the expert has no output {v:?}"))?;
        let mut tables = vec![];
        if let Some(h) = &p.host {
            if let Some(other) = h.inputs.iter().find(|i| i.name != t) {
                return Err(format!(
                    "the host island reads {}, not only the time {t}",
                    other.name
                ));
            }
            let mut per: Vec<Vec<f32>> = vec![vec![]; h.outputs.len()];
            for &tk in times {
                // The runtime feeds each step's time as f32; the island reads it in double.
                let vals: Vec<Vec<f64>> = h
                    .inputs
                    .iter()
                    .map(|i| vec![tk as f64; i.shape.iter().product()])
                    .collect();
                let refs: Vec<&[f64]> = vals.iter().map(Vec::as_slice).collect();
                for (row, out) in per.iter_mut().zip(h.eval(&refs)?) {
                    row.extend(out);
                }
            }
            for ((name, _), vals) in h.outputs.iter().zip(per) {
                let port = p
                    .input(name)
                    .cloned()
                    .ok_or_else(|| format!("no program input {name}"))?;
                tables.push((port, vals));
            }
        }
        Ok(DeviceLoop {
            x,
            v,
            t: p.input(t).cloned(),
            tables,
            times: times.to_vec(),
            dt,
        })
    }

    /// Whether `name` is an input the loop fills itself (x, t, a table's).
    pub fn fills(&self, name: &str) -> bool {
        self.x.name == name
            || self.t.as_ref().is_some_and(|t| t.name == name)
            || self.tables.iter().any(|(p, _)| p.name == name)
    }

    /// The whole loop over the expert's `ops`: `table_bufs[i]` holds `tables[i]`, `t_buf` the
    /// time (the t port's buffer, or a spare one when the program does not read it).
    pub fn ops(&self, ops: &[Op], table_bufs: &[usize], t_buf: usize) -> Vec<Op> {
        let len: usize = self.x.shape.iter().product();
        let mut out = vec![];
        for (k, &tk) in self.times.iter().enumerate() {
            for ((port, _), &buf) in self.tables.iter().zip(table_bufs) {
                let n: usize = port.shape.iter().product();
                out.push(Op::Map {
                    out: port.buf,
                    shape: port.shape.clone(),
                    expr: Expr::Load {
                        src: buf,
                        coefs: strides(&port.shape),
                        offset: (k * n) as i64,
                    },
                });
            }
            if let Some(t) = &self.t {
                out.push(Op::Fill {
                    out: t.buf,
                    len: t.shape.iter().product(),
                    value: tk,
                });
            }
            out.extend(ops.iter().cloned());
            out.push(Op::Step {
                x: self.x.buf,
                v: self.v.buf,
                len,
                dt: self.dt,
                t: t_buf,
                t_next: self.times.get(k + 1).copied().unwrap_or(tk),
            });
        }
        out
    }
}

/// cuBLAS's column-major arguments for a row-major [`Gemm`]: the row-major
/// C = op(A)·op(B) is the column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, so B goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CublasCall {
    /// Transpose flags of the first and second cuBLAS operands.
    pub trans_first: bool,
    pub trans_second: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    /// First operand = the row-major B buffer, second = the A buffer.
    pub first: usize,
    pub ld_first: i32,
    pub stride_first: i64,
    pub second: usize,
    pub ld_second: i32,
    pub stride_second: i64,
    pub c: usize,
    pub ldc: i32,
    pub stride_c: i64,
    pub batch: i32,
}

pub fn cublas_call(g: &Gemm) -> CublasCall {
    // A stored row-major has rows of length k (or m when stored transposed);
    // its column-major view is the transpose, which is what Cᵀ needs.
    CublasCall {
        trans_first: g.b_trans,
        trans_second: g.a_trans,
        m: g.n as i32,
        n: g.m as i32,
        k: g.k as i32,
        first: g.b,
        ld_first: if g.b_trans { g.k } else { g.n } as i32,
        stride_first: g.b_stride as i64,
        second: g.a,
        ld_second: if g.a_trans { g.m } else { g.k } as i32,
        stride_second: g.a_stride as i64,
        c: g.c,
        ldc: g.c_ld as i32,
        stride_c: g.c_stride as i64,
        batch: g.batch as i32,
    }
}

// ---------------------------------------------------------------------------
// Lowering

fn load_err(graph: &Path, message: impl Into<String>) -> EngineError {
    EngineError::Load {
        graph: graph.display().to_string(),
        message: message.into(),
    }
}

/// Reads and lowers one ONNX file.
pub fn compile_file(path: &Path) -> Result<Program, EngineError> {
    compile_model(read_model(path)?, path)
}

/// Reads one ONNX file, not yet lowered (its external data still outside it).
pub fn read_model(path: &Path) -> Result<pb::ModelProto, EngineError> {
    let bytes = std::fs::read(path).map_err(|e| load_err(path, e.to_string()))?;
    pb::ModelProto::decode(bytes.as_slice())
        .map_err(|e| load_err(path, format!("not an ONNX model: {e}")))
}

/// Lowers a model [`read_model`] read from `path`, its external data read from beside it.
pub fn compile_model(model: pb::ModelProto, path: &Path) -> Result<Program, EngineError> {
    compile_model_at(model, path, Precision::F32)
}

/// [`compile_model`] at `precision`.
pub fn compile_model_at(
    mut model: pb::ModelProto,
    path: &Path,
    precision: Precision,
) -> Result<Program, EngineError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    crate::onnx::inline_external(&mut model, dir).map_err(|m| load_err(path, m))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    compile_at(&model, &name, precision).map_err(|m| load_err(path, m))
}

#[derive(Debug, Clone)]
enum Source {
    /// A materialised buffer, contiguous row-major in the value's shape.
    Buf(usize),
    /// A compile-time integer tensor (shapes, axes).
    Ints(Vec<i64>),
    /// A one-element f32 constant (inlined into expressions).
    Scalar(f32),
    /// A float64 tensor known at load (a time embedding computed in double, as the graph
    /// says, from a time that is itself a load-time constant — the baked Euler loop's).
    /// Folded in f64 until a Cast to float32 makes it a constant; it never reaches a kernel.
    F64(Vec<f64>),
    /// A single-use elementwise result not yet written anywhere.
    Pending(Expr),
}

#[derive(Debug, Clone)]
struct Value {
    shape: Vec<usize>,
    dtype: DType,
    src: Source,
}

struct Lowering {
    buffers: Vec<Buffer>,
    ops: Vec<Op>,
    values: HashMap<String, Value>,
    uses: HashMap<String, usize>,
    /// Tensor sequences (SplitToSequence): their pieces, each a view.
    seqs: HashMap<String, Vec<Value>>,
    /// Products up to this many multiply-adds are fused dots ([`DOT_MACS`]).
    dot_macs: usize,
    /// RMSNorm statistics whose square was fused into the reduction.
    fused_square_means: usize,
    fusions: Fusions,
    /// Products of one input with several constant weights ([`sibling_products`]): a
    /// MatMul's output name → its group.
    siblings: HashMap<String, usize>,
    groups: Vec<Siblings>,
    /// Merged weights by their members' names.
    merged_weights: HashMap<Vec<String>, usize>,
}

/// MatMuls that multiply the same input by constant `[k, n_i]` weights (a layer's Q, K and V
/// projections; an MLP's gate and up): one GEMM over the weights side by side.
#[derive(Debug, Clone)]
struct Siblings {
    members: Members,
    state: SiblingState,
}

/// (output name, weight name) of each product, in node order.
type Members = Vec<(String, String)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SiblingState {
    Waiting,
    Merged,
    /// Small enough to be fused dots: each product on its own.
    Separate,
}

/// Groups of MatMuls over one input with constant 2-D weights of the same depth.
fn sibling_products(nodes: &[pb::NodeProto], l: &Lowering) -> Vec<Siblings> {
    let weight = |name: &str| match l.values.get(name) {
        Some(Value {
            shape,
            src: Source::Buf(b),
            ..
        }) if shape.len() == 2 && l.buffers[*b].init.is_some() => Some(shape[0]),
        _ => None,
    };
    // (input name, depth k, members)
    let mut groups: Vec<(String, usize, Members)> = vec![];
    for n in nodes {
        if n.op_type != "MatMul" || n.input.len() != 2 || n.output.len() != 1 {
            continue;
        }
        let Some(k) = weight(&n.input[1]) else {
            continue;
        };
        let member = (n.output[0].clone(), n.input[1].clone());
        match groups
            .iter_mut()
            .find(|(a, gk, _)| *a == n.input[0] && *gk == k)
        {
            Some((_, _, m)) => m.push(member),
            None => groups.push((n.input[0].clone(), k, vec![member])),
        }
    }
    groups
        .into_iter()
        .filter(|(_, _, m)| m.len() > 1)
        .map(|(_, _, members)| Siblings {
            members,
            state: SiblingState::Waiting,
        })
        .collect()
}

fn strides(shape: &[usize]) -> Vec<i64> {
    let mut s = vec![0i64; shape.len()];
    let mut acc = 1i64;
    for d in (0..shape.len()).rev() {
        s[d] = acc;
        acc *= shape[d] as i64;
    }
    s
}

/// Numpy broadcasting of two shapes.
fn broadcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        };
    }
    Ok(out)
}

/// Load coefficients reading a contiguous `shape` broadcast to `out`.
fn broadcast_coefs(shape: &[usize], out: &[usize]) -> Vec<i64> {
    let st = strides(shape);
    let lead = out.len() - shape.len();
    (0..out.len())
        .map(|d| {
            if d < lead || shape[d - lead] == 1 {
                0
            } else {
                st[d - lead]
            }
        })
        .collect()
}

/// A cheap expression over `from` re-expressed over the coordinates of
/// `to`, which `from` broadcasts to (dims of size 1 and missing leading dims
/// read coordinate 0).
fn rebroadcast(e: &Expr, from: &[usize], to: &[usize]) -> Expr {
    match e {
        Expr::Load { src, coefs, offset } => {
            let lead = to.len() - from.len();
            let coefs = (0..to.len())
                .map(|d| {
                    if d < lead || from[d - lead] == 1 {
                        0
                    } else {
                        coefs[d - lead]
                    }
                })
                .collect();
            Expr::Load {
                src: *src,
                coefs,
                offset: *offset,
            }
        }
        Expr::Const(c) => Expr::Const(*c),
        Expr::Unary(op, x) => Expr::Unary(*op, Box::new(rebroadcast(x, from, to))),
        Expr::Binary(op, a, b) => Expr::Binary(
            *op,
            Box::new(rebroadcast(a, from, to)),
            Box::new(rebroadcast(b, from, to)),
        ),
        Expr::Where(c, a, b) => Expr::Where(
            Box::new(rebroadcast(c, from, to)),
            Box::new(rebroadcast(a, from, to)),
            Box::new(rebroadcast(b, from, to)),
        ),
        other => unreachable!("only cheap expressions are rebroadcast: {other:?}"),
    }
}

fn attr<'a>(node: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_int(node: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map(|a| a.i).unwrap_or(default)
}

fn attr_float(node: &pb::NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name).map(|a| a.f).unwrap_or(default)
}

fn attr_ints(node: &pb::NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

fn norm_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a >= rank as i64 {
        return Err(format!("axis {axis} out of range for rank {rank}"));
    }
    Ok(a as usize)
}

fn tensor_data(t: &pb::TensorProto) -> Result<(DType, Vec<f32>, Vec<i64>), String> {
    if !t.external_data.is_empty() {
        return Err(format!("initializer {} uses external data", t.name));
    }
    let n: usize = t.dims.iter().map(|&d| d as usize).product();
    let (dtype, f, i) = match t.data_type {
        1 => {
            let v: Vec<f32> = if !t.raw_data.is_empty() {
                t.raw_data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            } else {
                t.float_data.clone()
            };
            (DType::F32, v, vec![])
        }
        7 => (
            DType::I64,
            vec![],
            crate::onnx::int_values(t).expect("an int64 tensor"),
        ),
        9 => {
            let v: Vec<i64> = if !t.raw_data.is_empty() {
                t.raw_data.iter().map(|&b| (b != 0) as i64).collect()
            } else {
                t.int32_data.iter().map(|&b| (b != 0) as i64).collect()
            };
            (DType::Bool, vec![], v)
        }
        other => {
            return Err(format!(
                "initializer {} has ONNX data type {other}; the cuda engine takes float32, int64 and bool",
                t.name
            ));
        }
    };
    // One of the two holds the values.
    let got = f.len() + i.len();
    if got != n {
        return Err(format!("initializer {} has {got} values, not {n}", t.name));
    }
    Ok((dtype, f, i))
}

fn value_shape(v: &pb::ValueInfoProto) -> Result<(Vec<usize>, DType), String> {
    let t =
        crate::onnx::tensor_type(v).ok_or_else(|| format!("input {} is not a tensor", v.name))?;
    let dtype = match t.elem_type {
        1 => DType::F32,
        7 => DType::I64,
        9 => DType::Bool,
        other => return Err(format!("input {} has ONNX data type {other}", v.name)),
    };
    let dims = t
        .shape
        .as_ref()
        .ok_or_else(|| format!("input {} has no shape", v.name))?
        .dim
        .iter()
        .map(|d| match d.value {
            Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) if n > 0 => Ok(n as usize),
            _ => Err(format!(
                "input {} has a symbolic dimension; the cuda engine needs fixed shapes",
                v.name
            )),
        })
        .collect::<Result<_, _>>()?;
    Ok((dims, dtype))
}

/// The graph's nodes with each exact-GELU pattern — Div(x, √2) → Erf →
/// Add 1 → Mul x → Mul ½, in either operand order, each intermediate used
/// once — replaced by one `Gelu` node, so x is read once and the chain is a
/// single fused function.
fn fuse_gelu(graph: &pb::GraphProto) -> Vec<pb::NodeProto> {
    let scalars: HashMap<&str, f32> = graph
        .initializer
        .iter()
        .filter_map(|t| match tensor_data(t) {
            Ok((DType::F32, v, _)) if v.len() == 1 => Some((t.name.as_str(), v[0])),
            _ => None,
        })
        .collect();
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            *uses.entry(i.as_str()).or_default() += 1;
        }
    }
    for o in &graph.output {
        *uses.entry(o.name.as_str()).or_default() += 1;
    }
    let by_input = |name: &str| -> Option<usize> {
        (uses.get(name) == Some(&1))
            .then(|| {
                graph
                    .node
                    .iter()
                    .position(|n| n.input.iter().any(|i| i == name))
            })
            .flatten()
    };
    let is = |name: &str, want: f32| scalars.get(name).is_some_and(|v| (v - want).abs() < 1e-4);
    // The other operand of a binary node, when one of them is `name`.
    let other = |n: &pb::NodeProto, name: &str| -> Option<String> {
        match n.input.as_slice() {
            [a, b] if a == name => Some(b.clone()),
            [a, b] if b == name => Some(a.clone()),
            _ => None,
        }
    };
    let mut skip = vec![false; graph.node.len()];
    let mut replace: HashMap<usize, pb::NodeProto> = HashMap::new();
    for (di, div) in graph.node.iter().enumerate() {
        let (x, c) = match (div.op_type.as_str(), div.input.as_slice()) {
            ("Div", [x, c]) if is(c, std::f32::consts::SQRT_2) => (x, c),
            ("Mul", [x, c]) if is(c, std::f32::consts::FRAC_1_SQRT_2) => (x, c),
            _ => continue,
        };
        let _ = c;
        let Some(out) = div.output.first() else {
            continue;
        };
        let chain = || -> Option<(usize, usize, usize, usize)> {
            let ei = by_input(out)?;
            let erf = &graph.node[ei];
            (erf.op_type == "Erf").then_some(())?;
            let ai = by_input(erf.output.first()?)?;
            let add = &graph.node[ai];
            (add.op_type == "Add" && is(&other(add, &erf.output[0])?, 1.0)).then_some(())?;
            let mi = by_input(add.output.first()?)?;
            let mul = &graph.node[mi];
            (mul.op_type == "Mul" && other(mul, &add.output[0])? == *x).then_some(())?;
            let hi = by_input(mul.output.first()?)?;
            let half = &graph.node[hi];
            (half.op_type == "Mul" && is(&other(half, &mul.output[0])?, 0.5)).then_some(())?;
            Some((ei, ai, mi, hi))
        };
        if let Some((ei, ai, mi, hi)) = chain() {
            for i in [di, ei, ai, mi] {
                skip[i] = true;
            }
            replace.insert(
                hi,
                pb::NodeProto {
                    op_type: "Gelu".into(),
                    name: format!("{} (fused GELU)", graph.node[hi].name),
                    input: vec![x.clone()],
                    output: graph.node[hi].output.clone(),
                    ..Default::default()
                },
            );
        }
    }
    graph
        .node
        .iter()
        .enumerate()
        .filter(|(i, _)| !skip[*i])
        .map(|(i, n)| replace.remove(&i).unwrap_or_else(|| n.clone()))
        .collect()
}

/// Lowers a model to a program, the float64 work on a run-time scalar cut out for the host
/// first ([`host::split`]). Errors name the node and what is missing.
pub fn compile(model: &pb::ModelProto, name: &str) -> Result<Program, String> {
    compile_at(model, name, Precision::F32)
}

/// [`compile`] with weights and activations stored at `precision` ([`half_precision`]).
pub fn compile_at(
    model: &pb::ModelProto,
    name: &str,
    precision: Precision,
) -> Result<Program, String> {
    compile_with(model, name, precision, DOT_MACS)
}

/// [`compile_at`] with products up to `dot_macs` multiply-adds fused as dots (the rest
/// GEMMs): tests lower it so that tiny fixtures take the GEMM paths full-size exports take.
pub fn compile_with(
    model: &pb::ModelProto,
    name: &str,
    precision: Precision,
    dot_macs: usize,
) -> Result<Program, String> {
    let mut p = match host::split(model)? {
        Some((main, island)) => {
            let mut p = lower(&main, name, dot_macs)?;
            p.nodes = model.graph.as_ref().map_or(0, |g| g.node.len());
            p.host = Some(island);
            p
        }
        None => lower(model, name, dot_macs)?,
    };
    gemm_layouts(&mut p);
    half_precision(&mut p, precision);
    share_activations(&mut p);
    Ok(p)
}

/// A map that only moves a GEMM's result into another layout (attention's context
/// `[heads, tokens, d]` transposed to `[tokens, heads·d]` for the output projection) is
/// dropped: the GEMM writes that layout itself through its C strides ([`Gemm::c_ld`],
/// [`Gemm::c_stride`]) when rows stay contiguous and nothing else reads the result.
fn gemm_layouts(p: &mut Program) {
    let mut reads = vec![0usize; p.buffers.len()];
    for op in &mut p.ops {
        op.for_each_buf(&mut |b, written| {
            if !written {
                reads[*b] += 1;
            }
        });
    }
    for port in &p.outputs {
        reads[port.buf] += 1;
    }
    let mut dropped = vec![];
    for i in 0..p.ops.len() {
        let Op::Map { out, shape, expr } = &p.ops[i] else {
            continue;
        };
        let (from, load) = match expr {
            Expr::Reshape { from, expr } => (from.as_slice(), &**expr),
            e => (shape.as_slice(), e),
        };
        let Expr::Load {
            src,
            coefs,
            offset: 0,
        } = load
        else {
            continue;
        };
        if reads[*src] != 1 || p.outputs.iter().any(|o| o.buf == *out) {
            continue;
        }
        let Some(w) = p.ops[..i]
            .iter()
            .rposition(|op| matches!(op, Op::Gemm(g) if g.c == *src))
        else {
            continue;
        };
        let Op::Gemm(g) = &p.ops[w] else { continue };
        if g.c_ld != g.n || g.c_stride != g.m * g.n {
            continue;
        }
        // The output stride of the from-axis whose load coefficient is `coef` and extent
        // `extent` (an axis of extent 1 is free); every other axis must have extent 1.
        let ostr = strides(from);
        let axis_for = |coef: usize, extent: usize| -> Option<Option<usize>> {
            if extent == 1 {
                return Some(None);
            }
            let d = (0..from.len()).find(|&d| from[d] == extent && coefs[d] == coef as i64)?;
            Some(Some(d))
        };
        let (Some(j), Some(r), Some(b)) = (
            axis_for(1, g.n),
            axis_for(g.n, g.m),
            axis_for(g.m * g.n, g.batch),
        ) else {
            continue;
        };
        let used: Vec<usize> = [j, r, b].into_iter().flatten().collect();
        let others_trivial = (0..from.len()).all(|d| used.contains(&d) || from[d] == 1);
        if !others_trivial || j.is_some_and(|d| ostr[d] != 1) {
            continue;
        }
        let (out, c_ld, c_stride) = (
            *out,
            r.map_or(g.n, |d| ostr[d] as usize),
            b.map_or(g.m * g.n, |d| ostr[d] as usize),
        );
        if (c_ld, c_stride) == (g.n, g.m * g.n) {
            // Already the layout: a copy all the same (not expected from the lowering).
            continue;
        }
        let Op::Gemm(g) = &mut p.ops[w] else { continue };
        p.buffers[g.c].len = 1;
        g.c = out;
        g.c_ld = c_ld;
        g.c_stride = c_stride;
        dropped.push(i);
        p.fusions.transposed_outputs += 1;
    }
    let mut k = 0;
    p.ops.retain(|_| {
        k += 1;
        !dropped.contains(&(k - 1))
    });
}

/// GEMMs at least this deep run on half operands (tensor cores); shallower ones (a position
/// times a frequency) stay f32.
pub const HALF_GEMM_K: usize = 16;

/// Every buffer an expression reads, in order: `f(buffer, as a gather table)`.
pub(crate) fn visit_reads(e: &Expr, f: &mut dyn FnMut(usize, bool)) {
    match e {
        Expr::Load { src, .. } => f(*src, false),
        Expr::Gather { table, index, .. } => {
            f(*table, true);
            f(*index, false);
        }
        Expr::Const(_) => {}
        Expr::Unary(_, x) | Expr::Reshape { expr: x, .. } => visit_reads(x, f),
        Expr::Binary(_, a, b) | Expr::Dot { a, b, .. } => {
            visit_reads(a, f);
            visit_reads(b, f);
        }
        Expr::Where(c, a, b) => {
            visit_reads(c, f);
            visit_reads(a, f);
            visit_reads(b, f);
        }
        Expr::Select { parts, .. } => parts.iter().for_each(|p| visit_reads(p, f)),
    }
}

/// Stores the program's GEMMs in half `precision`, as mixed-precision inference does:
/// - a GEMM of depth ≥ [`HALF_GEMM_K`] takes half operands (tensor cores; cuBLAS
///   `GemmEx`, f32 accumulation) and writes a half result where it may;
/// - a buffer may be half when it is a float32 activation or weight that only maps and such
///   GEMMs touch, or a LayerNorm's or Softmax's output (its kernel stores half): graph inputs
///   and outputs (the host's staging, the prefix's handoff), what the row kernels read, the
///   reductions' and the loop's buffers, bools and integers stay f32;
/// - an operand that must stay f32 is copied to a half buffer just before the GEMM;
/// - an embedding table (a weight of ≥ 64Ki values that is only gathered from) is half.
///
/// Maps read half as f32 and round what they store; the reference executor rounds the same
/// way, so the CPU tests see the same numbers the device computes (up to summation order).
fn half_precision(p: &mut Program, precision: Precision) {
    p.precision = precision;
    if precision == Precision::F32 {
        return;
    }
    let n = p.buffers.len();
    let mut storable: Vec<bool> = p.buffers.iter().map(|b| b.dtype == DType::F32).collect();
    for port in p.inputs.iter().chain(&p.outputs) {
        storable[port.buf] = false;
    }
    let (mut loaded, mut gathered) = (vec![false; n], vec![false; n]);
    for op in &p.ops {
        match op {
            Op::Gemm(g) if g.k >= HALF_GEMM_K => {}
            // A generated softmax reads its expression as a map does and stores like the
            // row kernels.
            Op::Map { expr, .. } | Op::SoftmaxOf { expr, .. } => {
                visit_reads(expr, &mut |b, table| {
                    if table {
                        gathered[b] = true;
                    } else {
                        loaded[b] = true;
                    }
                })
            }
            // The row kernels read f32 and may write half (one instantiation per storage).
            Op::LayerNorm { .. } | Op::Softmax { .. } => {
                op.clone().for_each_buf(&mut |b, written| {
                    if !written {
                        storable[*b] = false;
                    }
                })
            }
            other => other.clone().for_each_buf(&mut |b, _| storable[*b] = false),
        }
    }
    let mut half = vec![false; n];
    for b in 0..n {
        let buf = &p.buffers[b];
        half[b] =
            storable[b] && gathered[b] && !loaded[b] && buf.init.is_some() && buf.len >= 1 << 16;
    }
    let mut ops = Vec::with_capacity(p.ops.len());
    for op in std::mem::take(&mut p.ops) {
        let Op::Gemm(mut g) = op else {
            ops.push(op);
            continue;
        };
        if g.k < HALF_GEMM_K {
            ops.push(Op::Gemm(g));
            continue;
        }
        p.half_gemms += 1;
        for operand in [&mut g.a, &mut g.b] {
            if storable[*operand] {
                half[*operand] = true;
                continue;
            }
            let len = p.buffers[*operand].len;
            p.buffers.push(Buffer {
                len,
                dtype: DType::F32,
                init: None,
                half: true,
            });
            half.push(true);
            let copy = p.buffers.len() - 1;
            ops.push(Op::Map {
                out: copy,
                shape: vec![len],
                expr: Expr::Load {
                    src: *operand,
                    coefs: vec![1],
                    offset: 0,
                },
            });
            p.half_copies += 1;
            *operand = copy;
        }
        if storable[g.c] {
            half[g.c] = true;
        }
        ops.push(Op::Gemm(g));
    }
    p.ops = ops;
    for (b, h) in p.buffers.iter_mut().zip(half) {
        b.half = h;
    }
}

/// The buffer `x` squares, when `x` is a pending `b·b` or `b^2` of a contiguous load of buffer
/// `b` (row-major strides; any coefficient on a size-1 axis): RMSNorm's `x²`, which a mean
/// over rows can read from `b` itself ([`AxisKind::MeanSquare`]).
fn contiguous_square(x: &Value) -> Option<usize> {
    let Source::Pending(Expr::Binary(op, a, b)) = &x.src else {
        return None;
    };
    let square = match op {
        BinOp::Mul => a == b,
        BinOp::Pow => **b == Expr::Const(2.0),
        _ => false,
    };
    match a.as_ref() {
        Expr::Load { src, coefs, offset }
            if square
                && *offset == 0
                && coefs.len() == x.shape.len()
                && coefs
                    .iter()
                    .zip(strides(&x.shape))
                    .zip(&x.shape)
                    .all(|((c, s), &n)| n == 1 || *c == s) =>
        {
            Some(*src)
        }
        _ => None,
    }
}

/// Lowers a model whose float64 values are all known at load.
fn lower(model: &pb::ModelProto, name: &str, dot_macs: usize) -> Result<Program, String> {
    let graph = model.graph.as_ref().ok_or("the model has no graph")?;
    let mut l = Lowering {
        buffers: vec![],
        ops: vec![],
        values: HashMap::new(),
        uses: HashMap::new(),
        seqs: HashMap::new(),
        dot_macs,
        fused_square_means: 0,
        fusions: Fusions::default(),
        siblings: HashMap::new(),
        groups: vec![],
        merged_weights: HashMap::new(),
    };
    let nodes = fuse_gelu(graph);
    for node in &nodes {
        for i in node.input.iter().filter(|i| !i.is_empty()) {
            *l.uses.entry(i.clone()).or_default() += 1;
        }
    }
    for o in &graph.output {
        *l.uses.entry(o.name.clone()).or_default() += 1;
    }
    for t in &graph.initializer {
        let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        if t.data_type == 11 {
            let v = crate::onnx::float_values(t)
                .ok_or_else(|| format!("initializer {}: float64 data not readable", t.name))?;
            let src = Source::F64(v);
            l.values.insert(
                t.name.clone(),
                Value {
                    shape,
                    dtype: DType::F32,
                    src,
                },
            );
            continue;
        }
        let (dtype, f, i) = tensor_data(t)?;
        let src = l.constant(dtype, f, i);
        l.values.insert(t.name.clone(), Value { shape, dtype, src });
    }
    l.groups = sibling_products(&nodes, &l);
    for (g, s) in l.groups.iter().enumerate() {
        for (out, _) in &s.members {
            l.siblings.insert(out.clone(), g);
        }
    }
    let mut inputs = vec![];
    for v in &graph.input {
        if l.values.contains_key(&v.name) {
            continue; // an initializer listed as input (older exporters)
        }
        let (shape, dtype) = value_shape(v)?;
        let held = if dtype == DType::Bool {
            DType::F32
        } else {
            dtype
        };
        let buf = l.buffer(shape.iter().product(), held, None);
        inputs.push(Port {
            name: v.name.clone(),
            buf,
            shape: shape.clone(),
            dtype,
        });
        l.values.insert(
            v.name.clone(),
            Value {
                shape,
                dtype,
                src: Source::Buf(buf),
            },
        );
    }
    for node in &nodes {
        l.node(node)
            .map_err(|e| format!("node {} ({}): {e}", node.name, node.op_type))?;
    }
    let mut outputs = vec![];
    for o in &graph.output {
        let v = l.get(&o.name)?;
        // A bool or int64 output computed at run time (a prefix's pad mask) is handed
        // over as floats, 0/1 or exact integers; an int64 input passed through stays int64.
        let buf = l.materialize(&v);
        outputs.push(Port {
            name: o.name.clone(),
            buf,
            shape: v.shape.clone(),
            dtype: match l.buffers[buf].dtype {
                DType::I64 => DType::I64,
                _ if v.dtype == DType::Bool
                    || value_shape(o).is_ok_and(|(_, d)| d == DType::Bool) =>
                {
                    DType::Bool
                }
                _ => DType::F32,
            },
        });
    }
    // Weights no op reads (each one's products merged into a GEMM over merged weights) are
    // not uploaded.
    let mut read = vec![false; l.buffers.len()];
    for op in &mut l.ops {
        op.for_each_buf(&mut |b, _| read[*b] = true);
    }
    for (b, buf) in l.buffers.iter_mut().enumerate() {
        if buf.init.is_some() && !read[b] && !outputs.iter().any(|o: &Port| o.buf == b) {
            buf.init = None;
            buf.len = 1;
        }
    }
    let p = Program {
        name: name.to_string(),
        buffers: l.buffers,
        inputs,
        outputs,
        ops: l.ops,
        nodes: graph.node.len(),
        fused_gelu: (graph.node.len() - nodes.len()) / 4,
        fused_square_means: l.fused_square_means,
        host: None,
        precision: Precision::F32,
        half_gemms: 0,
        half_copies: 0,
        fusions: l.fusions,
    };
    Ok(p)
}

impl Expr {
    /// Every buffer the expression reads.
    fn for_each_buf(&mut self, f: &mut dyn FnMut(&mut usize)) {
        match self {
            Expr::Load { src, .. } => f(src),
            Expr::Gather { table, index, .. } => {
                f(table);
                f(index);
            }
            Expr::Const(_) => {}
            Expr::Unary(_, x) => x.for_each_buf(f),
            Expr::Binary(_, a, b) | Expr::Dot { a, b, .. } => {
                a.for_each_buf(f);
                b.for_each_buf(f);
            }
            Expr::Where(c, a, b) => {
                c.for_each_buf(f);
                a.for_each_buf(f);
                b.for_each_buf(f);
            }
            Expr::Select { parts, .. } => parts.iter_mut().for_each(|e| e.for_each_buf(f)),
            Expr::Reshape { expr, .. } => expr.for_each_buf(f),
        }
    }
}

impl Op {
    /// The buffer the op writes (a step's x; its t is a one-value f32 buffer).
    pub fn output(&self) -> Option<usize> {
        match self {
            Op::Map { out, .. }
            | Op::LayerNorm { out, .. }
            | Op::Softmax { out, .. }
            | Op::SoftmaxOf { out, .. }
            | Op::Axis { out, .. }
            | Op::Fill { out, .. } => Some(*out),
            Op::Gemm(g) => Some(g.c),
            Op::Step { x, .. } => Some(*x),
        }
    }

    /// Every buffer the op touches: `f(buffer, written)`, reads first.
    fn for_each_buf(&mut self, f: &mut dyn FnMut(&mut usize, bool)) {
        match self {
            Op::Map { out, expr, .. } | Op::SoftmaxOf { out, expr, .. } => {
                expr.for_each_buf(&mut |b| f(b, false));
                f(out, true);
            }
            Op::Gemm(g) => {
                f(&mut g.a, false);
                f(&mut g.b, false);
                f(&mut g.c, true);
            }
            Op::LayerNorm {
                x,
                gamma,
                beta,
                out,
                ..
            } => {
                f(x, false);
                f(gamma, false);
                f(beta, false);
                f(out, true);
            }
            Op::Softmax { x, out, .. } | Op::Axis { x, out, .. } => {
                f(x, false);
                f(out, true);
            }
            Op::Fill { out, .. } => f(out, true),
            Op::Step { x, v, t, .. } => {
                f(v, false);
                f(x, true);
                f(t, true);
            }
        }
    }
}

/// Activation buffers share memory where their lives do not overlap: a buffer first written
/// by op i and last touched by op j can take the place of one last touched before i (same
/// element type; the larger size kept). Weights, graph inputs and outputs, and a buffer read
/// before anything writes it keep their own. Every op writes its whole output, so a reused
/// buffer's old contents are never read.
fn share_activations(p: &mut Program) {
    let n = p.buffers.len();
    let mut fixed = vec![false; n];
    for (b, buf) in p.buffers.iter().enumerate() {
        fixed[b] = buf.init.is_some();
    }
    for port in p.inputs.iter().chain(&p.outputs) {
        fixed[port.buf] = true;
    }
    let (mut first, mut last) = (vec![usize::MAX; n], vec![0usize; n]);
    for (i, op) in p.ops.iter_mut().enumerate() {
        op.for_each_buf(&mut |b, written| {
            if first[*b] == usize::MAX {
                first[*b] = i;
                if !written {
                    fixed[*b] = true;
                }
            }
            last[*b] = last[*b].max(i);
        });
    }
    // Largest first (TFLite's greedy-by-size): a slot takes the size of its first, largest
    // buffer, and a later one joins the first slot of its type whose buffers' lives it does
    // not overlap — a big buffer never lands in a small slot that then has to grow.
    let mut order: Vec<usize> = (0..n)
        .filter(|&b| !fixed[b] && first[b] != usize::MAX)
        .collect();
    order.sort_by_key(|&b| (std::cmp::Reverse(p.buffers[b].len), first[b]));
    // Slots: (the buffer standing for them, the lives of the buffers in it).
    let mut slots: Vec<(usize, Vec<(usize, usize)>)> = vec![];
    let mut rep: Vec<usize> = (0..n).collect();
    for b in order {
        let kind = (p.buffers[b].dtype, p.buffers[b].half);
        let life = (first[b], last[b]);
        let pick = slots.iter().position(|(r, lives)| {
            (p.buffers[*r].dtype, p.buffers[*r].half) == kind
                && lives.iter().all(|&(f, l)| l < life.0 || life.1 < f)
        });
        match pick {
            Some(s) => {
                rep[b] = slots[s].0;
                slots[s].1.push(life);
            }
            None => slots.push((b, vec![life])),
        }
    }
    for op in &mut p.ops {
        op.for_each_buf(&mut |b, _| *b = rep[*b]);
    }
    for (b, r) in rep.iter().enumerate() {
        if *r != b {
            // Its memory is its slot's now.
            p.buffers[b].len = 1;
        }
    }
}

impl Lowering {
    fn buffer(&mut self, len: usize, dtype: DType, init: Option<Vec<f32>>) -> usize {
        self.buffers.push(Buffer {
            len: len.max(1),
            dtype,
            init,
            half: false,
        });
        self.buffers.len() - 1
    }

    fn get(&self, name: &str) -> Result<Value, String> {
        self.values
            .get(name)
            .cloned()
            .ok_or_else(|| format!("input {name:?} is not produced by any earlier node"))
    }

    fn set(&mut self, name: &str, v: Value) {
        self.values.insert(name.to_string(), v);
    }

    /// The value as an expression over the output coordinates of `out`
    /// (which it broadcasts to).
    fn expr(&mut self, v: &Value, out: &[usize]) -> Expr {
        match &v.src {
            Source::Scalar(x) => Expr::Const(*x),
            Source::Pending(e) if v.shape == out => e.clone(),
            // A single-use small pointwise value (RMSNorm's 1/√(mean + ε) per row) is
            // computed again for each element it broadcasts to rather than stored.
            Source::Pending(e) if e.cheap() || e.small_pointwise() => rebroadcast(e, &v.shape, out),
            _ => {
                let src = self.materialize(v);
                Expr::Load {
                    src,
                    coefs: broadcast_coefs(&v.shape, out),
                    offset: 0,
                }
            }
        }
    }

    /// The value's buffer, writing it out first if it is pending or scalar.
    fn materialize(&mut self, v: &Value) -> usize {
        match &v.src {
            Source::Buf(b) => *b,
            Source::Pending(e) => self.emit_map(v.shape.clone(), e.clone()),
            Source::Scalar(x) => self.emit_map(v.shape.clone(), Expr::Const(*x)),
            Source::Ints(i) => {
                // Integer constants feed shapes; one read at run time gets a buffer of
                // its values cast, which no supported op needs today.
                let f = i.iter().map(|&x| x as f32).collect::<Vec<_>>();
                self.buffer(f.len(), DType::F32, Some(f))
            }
            // Every op that can meet a float64 value folds it or refuses it (`f32_value`,
            // the elementwise, Cast and Concat paths); not reached from a valid graph.
            Source::F64(v) => {
                let f = v.iter().map(|&x| x as f32).collect::<Vec<_>>();
                self.buffer(f.len(), DType::F32, Some(f))
            }
        }
    }

    fn emit_map(&mut self, shape: Vec<usize>, expr: Expr) -> usize {
        let out = self.buffer(shape.iter().product(), DType::F32, None);
        self.ops.push(Op::Map { out, shape, expr });
        out
    }

    /// A buffer and its load coefficients: a pending pure load (a transposed
    /// view) is read in place, anything else is stored first.
    fn view(&mut self, v: &Value) -> (usize, Vec<i64>, i64) {
        match &v.src {
            Source::Pending(Expr::Load { src, coefs, offset }) => (*src, coefs.clone(), *offset),
            _ => (self.materialize(v), strides(&v.shape), 0),
        }
    }

    /// A gemm operand read in place: a pending pure load at offset 0 whose batch axes all
    /// broadcast (coefficient 0 — an `Expand` of one KV head across the query heads) and whose
    /// matrix is its source stored row-major, or transposed (then the transpose flag flips).
    /// cuBLAS reads it with batch stride 0 instead of a materialised copy per head.
    fn broadcast_operand(&self, v: &Value, trans: bool) -> Option<(usize, bool)> {
        let Source::Pending(Expr::Load { src, coefs, offset }) = &v.src else {
            return None;
        };
        let r = v.shape.len();
        if *offset != 0 || r < 2 || coefs.len() != r || coefs[..r - 2].iter().any(|&c| c != 0) {
            return None;
        }
        let (rows, cols) = (v.shape[r - 2] as i64, v.shape[r - 1] as i64);
        let b = &self.buffers[*src];
        if b.dtype != DType::F32 || (b.len as i64) < rows * cols {
            return None;
        }
        if coefs[r - 2] == cols && coefs[r - 1] == 1 {
            Some((*src, trans))
        } else if coefs[r - 2] == 1 && coefs[r - 1] == rows {
            Some((*src, !trans))
        } else {
            None
        }
    }

    /// A broadcast view of one matrix that cuBLAS cannot read in place (a KV head that is a
    /// strided column range of a merged projection): the matrix is written once,
    /// contiguous, and read with batch stride 0 — not copied once per head.
    fn shared_matrix(&mut self, v: &Value) -> Option<usize> {
        let Source::Pending(Expr::Load { src, coefs, offset }) = &v.src else {
            return None;
        };
        let r = v.shape.len();
        if r < 3
            || coefs.len() != r
            || coefs[..r - 2].iter().any(|&c| c != 0)
            || v.shape[..r - 2].iter().product::<usize>() == 1
        {
            return None;
        }
        let matrix = Expr::Load {
            src: *src,
            coefs: coefs[r - 2..].to_vec(),
            offset: *offset,
        };
        Some(self.emit_map(v.shape[r - 2..].to_vec(), matrix))
    }

    /// A float32 buffer of the value: an int64 graph input is converted by a map.
    fn f32_buf(&mut self, v: &Value) -> usize {
        match &v.src {
            Source::Buf(b) if self.buffers[*b].dtype == DType::I64 => {
                let e = self.expr(v, &v.shape);
                self.emit_map(v.shape.clone(), e)
            }
            _ => self.materialize(v),
        }
    }

    /// [`Self::put_elementwise`] for a result that is not float32 (a mask, an int64 value
    /// computed at run time), held as floats all the same.
    fn put_typed(&mut self, name: &str, shape: Vec<usize>, dtype: DType, expr: Expr) {
        self.put_elementwise(name, shape, expr);
        if let Some(v) = self.values.get_mut(name) {
            v.dtype = dtype;
        }
    }

    /// Stores an elementwise result: pending when its one consumer can fuse it
    /// (or it is cheap enough to compute again in each).
    fn put_elementwise(&mut self, name: &str, shape: Vec<usize>, expr: Expr) {
        let uses = self.uses.get(name).copied().unwrap_or(0);
        let src = if uses == 1 || (uses > 1 && expr.cheap()) {
            Source::Pending(expr)
        } else {
            Source::Buf(self.emit_map(shape.clone(), expr))
        };
        self.set(
            name,
            Value {
                shape,
                dtype: DType::F32,
                src,
            },
        );
    }

    /// Group `g`'s products as one GEMM of the input by the weights side by side
    /// (`[k, Σn]`, built at load; a weight nothing else reads is not kept twice); each
    /// member's value is a view of its columns. False (and each product on its own) when
    /// the merged product is small enough to be fused dots.
    fn merge_siblings(&mut self, g: usize, a_name: &str) -> Result<bool, String> {
        let a = self.f32_value(a_name)?;
        let members = self.groups[g].members.clone();
        let k = *a.shape.last().ok_or("MatMul of a scalar")?;
        let mut weights = vec![];
        for (_, w) in &members {
            let v = self.get(w)?;
            let Source::Buf(b) = v.src else {
                return Err(format!("weight {w} is not a constant"));
            };
            if v.shape[0] != k {
                return Err(format!("MatMul of {:?} and {:?}", a.shape, v.shape));
            }
            weights.push((b, v.shape[1]));
        }
        let total: usize = weights.iter().map(|w| w.1).sum();
        let rows = a.shape.iter().product::<usize>() / k.max(1);
        if rows * k * total <= self.dot_macs {
            self.groups[g].state = SiblingState::Separate;
            return Ok(false);
        }
        // The baked loop multiplies by the same weights every step: merged once.
        let key: Vec<String> = members.iter().map(|(_, w)| w.clone()).collect();
        let wb = match self.merged_weights.get(&key) {
            Some(&b) => b,
            None => {
                let mut merged = vec![0f32; k * total];
                let mut col = 0;
                for &(b, n) in &weights {
                    let w = self.buffers[b]
                        .init
                        .as_ref()
                        .ok_or("weight without values")?;
                    for r in 0..k {
                        merged[r * total + col..r * total + col + n]
                            .copy_from_slice(&w[r * n..(r + 1) * n]);
                    }
                    col += n;
                }
                let b = self.buffer(k * total, DType::F32, Some(merged));
                self.merged_weights.insert(key, b);
                b
            }
        };
        let wv = Value {
            shape: vec![k, total],
            dtype: DType::F32,
            src: Source::Buf(wb),
        };
        let (shape, src) = self.product(&a, false, &wv, false, 1.0)?;
        let c = match src {
            Source::Buf(c) => c,
            Source::Pending(e) => self.emit_map(shape.clone(), e),
            _ => return Err("a product without a result".into()),
        };
        let coefs = strides(&shape);
        let mut col = 0i64;
        for ((out, _), &(_, n)) in members.iter().zip(&weights) {
            let mut s = shape.clone();
            *s.last_mut().expect("rank ≥ 2") = n;
            let view = Expr::Load {
                src: c,
                coefs: coefs.clone(),
                offset: col,
            };
            self.put_elementwise(out, s, view);
            col += n as i64;
        }
        self.fusions.merged_gemms += members.len() - 1;
        self.groups[g].state = SiblingState::Merged;
        Ok(true)
    }

    /// `product · s`, `s · product` or `product / s` for a constant `s` and a GEMM's result
    /// that nothing else reads (attention's `QKᵀ · 1/√d`): the GEMM's alpha takes the factor
    /// and its buffer is the result. Returns that buffer.
    fn scale_gemm(&mut self, op: BinOp, xn: &str, x: &Value, yn: &str, y: &Value) -> Option<usize> {
        let (name, product, factor) = match (op, &x.src, &y.src) {
            (BinOp::Mul, Source::Buf(c), Source::Scalar(s)) => (xn, *c, *s),
            (BinOp::Mul, Source::Scalar(s), Source::Buf(c)) => (yn, *c, *s),
            (BinOp::Div, Source::Buf(c), Source::Scalar(s)) if *s != 0.0 => (xn, *c, 1.0 / *s),
            _ => return None,
        };
        if self.uses.get(name).copied() != Some(1) || !factor.is_finite() {
            return None;
        }
        let gemm = self.ops.iter_mut().rev().find_map(|op| match op {
            Op::Gemm(g) if g.c == product => Some(g),
            _ => None,
        })?;
        gemm.alpha *= factor;
        self.fusions.scaled_gemms += 1;
        Some(product)
    }

    fn put_buf(&mut self, name: &str, shape: Vec<usize>, buf: usize) {
        self.set(
            name,
            Value {
                shape,
                dtype: DType::F32,
                src: Source::Buf(buf),
            },
        );
    }

    fn ints(&self, name: &str) -> Result<Vec<i64>, String> {
        match self.get(name)?.src {
            Source::Ints(v) => Ok(v),
            _ => Err(format!("{name} must be a constant int64 tensor")),
        }
    }

    fn node(&mut self, node: &pb::NodeProto) -> Result<(), String> {
        let input = |i: usize| -> Result<&str, String> {
            node.input
                .get(i)
                .map(String::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| format!("missing input {i}"))
        };
        let out = node.output.first().ok_or("no output")?.clone();
        let op = node.op_type.as_str();
        let unary = match op {
            "Erf" => Some(UnOp::Erf),
            "Gelu" => match attr(node, "approximate").map(|a| a.s.as_slice()) {
                None | Some(b"none") | Some(b"") => Some(UnOp::Gelu),
                Some(b"tanh") => Some(UnOp::GeluTanh),
                Some(other) => {
                    return Err(format!(
                        "Gelu approximate={:?}",
                        String::from_utf8_lossy(other)
                    ));
                }
            },
            "Sin" => Some(UnOp::Sin),
            "Cos" => Some(UnOp::Cos),
            "Exp" => Some(UnOp::Exp),
            "Tanh" => Some(UnOp::Tanh),
            "Sqrt" => Some(UnOp::Sqrt),
            "Neg" => Some(UnOp::Neg),
            "Relu" => Some(UnOp::Relu),
            "Sigmoid" => Some(UnOp::Sigmoid),
            "Reciprocal" => Some(UnOp::Reciprocal),
            "Not" => Some(UnOp::Not),
            _ => None,
        };
        let binary = match op {
            "Add" => Some(BinOp::Add),
            "Sub" => Some(BinOp::Sub),
            "Mul" => Some(BinOp::Mul),
            "Div" => Some(BinOp::Div),
            "Pow" => Some(BinOp::Pow),
            "Max" | "Min" if node.input.len() != 2 => {
                return Err(format!(
                    "{op} of {} inputs (two are supported)",
                    node.input.len()
                ));
            }
            "Max" => Some(BinOp::Max),
            "Min" => Some(BinOp::Min),
            "Equal" => Some(BinOp::Equal),
            "Less" => Some(BinOp::Less),
            "LessOrEqual" => Some(BinOp::LessOrEqual),
            "Greater" => Some(BinOp::Greater),
            "GreaterOrEqual" => Some(BinOp::GreaterOrEqual),
            "And" => Some(BinOp::And),
            "Or" => Some(BinOp::Or),
            _ => None,
        };
        if let Some(u) = unary {
            let x = self.get(input(0)?)?;
            if let Source::F64(v) = &x.src {
                let f = |a: f64| -> Result<f64, String> {
                    Ok(match u {
                        UnOp::Sin => a.sin(),
                        UnOp::Cos => a.cos(),
                        UnOp::Exp => a.exp(),
                        UnOp::Neg => -a,
                        UnOp::Sqrt => a.sqrt(),
                        UnOp::Tanh => a.tanh(),
                        UnOp::Reciprocal => 1.0 / a,
                        _ => return Err(format!("{op} of a float64 tensor")),
                    })
                };
                let r = v.iter().map(|&a| f(a)).collect::<Result<Vec<_>, _>>()?;
                let src = Source::F64(r);
                self.set(
                    &out,
                    Value {
                        shape: x.shape.clone(),
                        dtype: DType::F32,
                        src,
                    },
                );
                return Ok(());
            }
            if let Source::Ints(v) = &x.src {
                // Integer arithmetic known at load.
                let r: Vec<i64> = match u {
                    UnOp::Neg => v.iter().map(|a| -a).collect(),
                    UnOp::Not => v.iter().map(|&a| (a == 0) as i64).collect(),
                    _ => return Err(format!("{op} of a load-time int64 tensor")),
                };
                let dtype = if u == UnOp::Not {
                    DType::Bool
                } else {
                    DType::I64
                };
                self.set(
                    &out,
                    Value {
                        shape: x.shape.clone(),
                        dtype,
                        src: Source::Ints(r),
                    },
                );
                return Ok(());
            }
            let dtype = if u == UnOp::Not { DType::Bool } else { x.dtype };
            let e = self.expr(&x, &x.shape);
            self.put_typed(&out, x.shape.clone(), dtype, Expr::Unary(u, Box::new(e)));
            return Ok(());
        }
        if let Some(b) = binary {
            let x = self.get(input(0)?)?;
            let y = self.get(input(1)?)?;
            let shape = broadcast(&x.shape, &y.shape)?;
            let dtype = if b.is_predicate() {
                DType::Bool
            } else {
                x.dtype
            };
            if matches!(x.src, Source::F64(_)) || matches!(y.src, Source::F64(_)) {
                let (Some(p), Some(q)) = (load_time_f64(&x.src), load_time_f64(&y.src)) else {
                    return Err(float64_at_run_time(&out));
                };
                let v = fold_f64(b, &p, &x.shape, &q, &y.shape, &shape)?;
                self.set(
                    &out,
                    Value {
                        shape,
                        dtype: DType::F32,
                        src: Source::F64(v),
                    },
                );
                return Ok(());
            }
            if let (Source::Ints(p), Source::Ints(q)) = (&x.src, &y.src) {
                let v = fold_ints(b, p, &x.shape, q, &y.shape, &shape)?;
                self.set(
                    &out,
                    Value {
                        shape,
                        dtype,
                        src: Source::Ints(v),
                    },
                );
                return Ok(());
            }
            if let (Source::Scalar(p), Source::Scalar(q)) = (&x.src, &y.src) {
                let v = reference::binary(b, *p, *q);
                let src = Source::Scalar(v);
                self.set(&out, Value { shape, dtype, src });
                return Ok(());
            }
            if let Some(c) = self.scale_gemm(b, input(0)?, &x, input(1)?, &y) {
                self.put_buf(&out, shape, c);
                return Ok(());
            }
            let ex = self.expr(&x, &shape);
            if b == BinOp::Pow && matches!(y.src, Source::Scalar(e) if e == 2.0) {
                // x² as x·x: exact, and what RMSNorm's pow(2) needs.
                let sq = Expr::Binary(BinOp::Mul, Box::new(ex.clone()), Box::new(ex));
                self.put_elementwise(&out, shape, sq);
                return Ok(());
            }
            let ey = self.expr(&y, &shape);
            self.put_typed(
                &out,
                shape,
                dtype,
                Expr::Binary(b, Box::new(ex), Box::new(ey)),
            );
            return Ok(());
        }
        match op {
            "Identity" => {
                let v = self.get(input(0)?)?;
                self.set(&out, v);
            }
            "Reshape" => {
                let v = self.get(input(0)?)?;
                let spec = self.ints(input(1)?)?;
                let shape = reshape(&v.shape, &spec)?;
                self.put_reshaped(&out, &v, shape);
            }
            "Unsqueeze" | "Squeeze" => {
                let v = self.get(input(0)?)?;
                // Opset 13 moved the axes from an attribute to an optional input.
                let axes = match node.input.get(1).filter(|a| !a.is_empty()) {
                    Some(a) => Some(self.ints(a)?),
                    None => attr_ints(node, "axes"),
                };
                let shape = if op == "Unsqueeze" {
                    let axes = axes.ok_or("Unsqueeze without axes")?;
                    let rank = v.shape.len() + axes.len();
                    let mut axes: Vec<usize> = axes
                        .iter()
                        .map(|&a| norm_axis(a, rank))
                        .collect::<Result<_, _>>()?;
                    axes.sort_unstable();
                    axes.dedup();
                    if axes.len() + v.shape.len() != rank {
                        return Err(format!("repeated axes in {axes:?}"));
                    }
                    let mut dims = v.shape.iter();
                    (0..rank)
                        .map(|d| {
                            if axes.contains(&d) {
                                1
                            } else {
                                *dims.next().expect("rank counted")
                            }
                        })
                        .collect()
                } else {
                    let rank = v.shape.len();
                    let axes: Vec<usize> = match axes {
                        Some(a) => a
                            .iter()
                            .map(|&a| norm_axis(a, rank))
                            .collect::<Result<_, _>>()?,
                        None => (0..rank).filter(|&d| v.shape[d] == 1).collect(),
                    };
                    if let Some(&d) = axes.iter().find(|&&d| v.shape[d] != 1) {
                        return Err(format!("cannot squeeze axis {d} of shape {:?}", v.shape));
                    }
                    (0..rank)
                        .filter(|d| !axes.contains(d))
                        .map(|d| v.shape[d])
                        .collect()
                };
                self.put_reshaped(&out, &v, shape);
            }
            "Constant" => {
                let a = node
                    .attribute
                    .first()
                    .ok_or("Constant without a value attribute")?;
                let (shape, dtype, f, i) = match a.name.as_str() {
                    "value" => {
                        let t = a.t.as_ref().ok_or("Constant value without a tensor")?;
                        let (dtype, f, i) = tensor_data(t)?;
                        (t.dims.iter().map(|&d| d as usize).collect(), dtype, f, i)
                    }
                    "value_float" => (vec![], DType::F32, vec![a.f], vec![]),
                    "value_floats" => (vec![a.floats.len()], DType::F32, a.floats.clone(), vec![]),
                    "value_int" => (vec![], DType::I64, vec![], vec![a.i]),
                    "value_ints" => (vec![a.ints.len()], DType::I64, vec![], a.ints.clone()),
                    other => return Err(format!("Constant {other} is not supported")),
                };
                let src = self.constant(dtype, f, i);
                self.set(&out, Value { shape, dtype, src });
            }
            "Cast" if attr_int(node, "to", 0) == 11 => {
                // To float64: only a value known at load (see Source::F64).
                let v = self.get(input(0)?)?;
                let f = load_time_f64(&v.src).ok_or_else(|| float64_at_run_time(&out))?;
                self.set(&out, Value { shape: v.shape.clone(), dtype: DType::F32, src: Source::F64(f) });
            }
            "Cast" => {
                let v = self.get(input(0)?)?;
                let to = attr_int(node, "to", 0);
                let to_dtype = match to {
                    1 => DType::F32,
                    6 | 7 => DType::I64,
                    9 => DType::Bool,
                    other => {
                        return Err(format!(
                            "Cast to ONNX type {other}: the cuda engine computes in float32 (int64 and bool held as floats)"
                        ));
                    }
                };
                let shape = v.shape.clone();
                let value = |dtype, src| Value { shape: shape.clone(), dtype, src };
                let cast = match (&v.src, to_dtype) {
                    // Known at load: converted here.
                    (Source::Ints(i), DType::F32) => {
                        let f = i.iter().map(|&x| x as f32).collect();
                        value(DType::F32, self.constant(DType::F32, f, vec![]))
                    }
                    (Source::Ints(i), DType::I64) => value(DType::I64, Source::Ints(i.clone())),
                    (Source::Ints(i), _) => {
                        value(DType::Bool, Source::Ints(i.iter().map(|&x| (x != 0) as i64).collect()))
                    }
                    (Source::Scalar(x), DType::F32) => value(DType::F32, Source::Scalar(*x)),
                    (Source::Scalar(x), DType::I64) => value(DType::I64, Source::Ints(vec![x.trunc() as i64])),
                    (Source::Scalar(x), _) => value(DType::Bool, Source::Ints(vec![(*x != 0.0) as i64])),
                    // Float64 known at load (see Source::F64) back to float32 or int64.
                    (Source::F64(f), DType::F32) => {
                        let f32s = f.iter().map(|&x| x as f32).collect();
                        value(DType::F32, self.constant(DType::F32, f32s, vec![]))
                    }
                    (Source::F64(f), DType::I64) => {
                        value(DType::I64, Source::Ints(f.iter().map(|&x| x.trunc() as i64).collect()))
                    }
                    (Source::F64(_), _) => {
                        return Err(format!("Cast of a float64 tensor to ONNX type {to}"));
                    }
                    // The same type: the same value.
                    _ if v.dtype == to_dtype => v.clone(),
                    // At run time, as floats: bool → number and int64 → float keep their
                    // value; float → int64 truncates; anything → bool tests for non-zero.
                    _ => {
                        let e = self.expr(&v, &v.shape);
                        let e = match (v.dtype, to_dtype) {
                            (DType::F32, DType::I64) => Expr::Unary(UnOp::Trunc, Box::new(e)),
                            (_, DType::Bool) => Expr::Unary(UnOp::NonZero, Box::new(e)),
                            _ => e,
                        };
                        self.put_typed(&out, v.shape.clone(), to_dtype, e);
                        return Ok(());
                    }
                };
                self.set(&out, cast);
            }
            "Where" => {
                let c = self.get(input(0)?)?;
                let a = self.get(input(1)?)?;
                let b = self.get(input(2)?)?;
                let shape = broadcast(&broadcast(&c.shape, &a.shape)?, &b.shape)?;
                let ec = self.expr(&c, &shape);
                let ea = self.expr(&a, &shape);
                let eb = self.expr(&b, &shape);
                let e = Expr::Where(Box::new(ec), Box::new(ea), Box::new(eb));
                self.put_typed(&out, shape, a.dtype, e);
            }
            "CumSum" | "ReduceSum" => {
                let x = self.get(input(0)?)?;
                let rank = x.shape.len();
                let axes = match node.input.get(1).filter(|s| !s.is_empty()) {
                    Some(a) => self.ints(a)?,
                    None => attr_ints(node, "axes").unwrap_or_default(),
                };
                let [axis] = axes.as_slice() else {
                    return Err(format!("{op} over the axes {axes:?}: one axis is supported"));
                };
                let axis = norm_axis(*axis, rank)?;
                if op == "CumSum" && (attr_int(node, "exclusive", 0) != 0 || attr_int(node, "reverse", 0) != 0) {
                    return Err("CumSum with exclusive or reverse".into());
                }
                let outer: usize = x.shape[..axis].iter().product();
                let inner: usize = x.shape[axis + 1..].iter().product();
                let len = x.shape[axis];
                let (kind, mut shape) = if op == "CumSum" {
                    (AxisKind::CumSum, x.shape.clone())
                } else {
                    (AxisKind::Sum, x.shape.clone())
                };
                if kind == AxisKind::Sum {
                    if attr_int(node, "keepdims", 1) != 0 {
                        shape[axis] = 1;
                    } else {
                        shape.remove(axis);
                    }
                }
                let xb = self.f32_buf(&x);
                let o = self.buffer(shape.iter().product(), DType::F32, None);
                self.ops.push(Op::Axis {
                    kind,
                    x: xb,
                    out: o,
                    outer,
                    len,
                    inner,
                });
                self.set(&out, Value { shape, dtype: x.dtype, src: Source::Buf(o) });
            }
            "Shape" => {
                let v = self.get(input(0)?)?;
                let rank = v.shape.len() as i64;
                let clamp = |x: i64| {
                    if x < 0 {
                        (x + rank).max(0)
                    } else {
                        x.min(rank)
                    }
                };
                let start = clamp(attr_int(node, "start", 0)) as usize;
                let end = clamp(attr_int(node, "end", rank)) as usize;
                let dims: Vec<i64> = v.shape[start..end.max(start)]
                    .iter()
                    .map(|&d| d as i64)
                    .collect();
                self.set(
                    &out,
                    Value {
                        shape: vec![dims.len()],
                        dtype: DType::I64,
                        src: Source::Ints(dims),
                    },
                );
            }
            "Expand" => {
                let v = self.f32_value(input(0)?)?;
                let spec: Vec<usize> = self
                    .ints(input(1)?)?
                    .iter()
                    .map(|&d| usize::try_from(d).map_err(|_| format!("Expand to {d}")))
                    .collect::<Result<_, _>>()?;
                let shape = broadcast(&v.shape, &spec)?;
                let e = self.expr(&v, &shape);
                self.put_elementwise(&out, shape, e);
            }
            "Slice" => {
                let v = self.get(input(0)?)?;
                let rank = v.shape.len();
                let opt = |i: usize| node.input.get(i).filter(|a| !a.is_empty()).cloned();
                let (starts, ends, axes, steps) = match opt(1) {
                    Some(st) => (
                        self.ints(&st)?,
                        self.ints(&opt(2).ok_or("Slice without ends")?)?,
                        opt(3).map(|a| self.ints(&a)).transpose()?,
                        opt(4).map(|a| self.ints(&a)).transpose()?,
                    ),
                    // Before opset 10: attributes, step 1.
                    None => (
                        attr_ints(node, "starts").ok_or("Slice without starts")?,
                        attr_ints(node, "ends").ok_or("Slice without ends")?,
                        attr_ints(node, "axes"),
                        None,
                    ),
                };
                let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
                let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
                if ends.len() != starts.len()
                    || axes.len() != starts.len()
                    || steps.len() != starts.len()
                {
                    return Err("Slice starts/ends/axes/steps of different lengths".into());
                }
                let mut shape = v.shape.clone();
                let mut first = vec![0i64; rank];
                let mut step = vec![1i64; rank];
                for k in 0..starts.len() {
                    let d = norm_axis(axes[k], rank)?;
                    let (b, e, s) = slice_range(starts[k], ends[k], steps[k], v.shape[d] as i64)?;
                    first[d] = b;
                    step[d] = s;
                    shape[d] = e;
                }
                if let Source::Ints(vals) = &v.src {
                    // Shape arithmetic known at load: sliced here.
                    let picked = pick_strided(vals, &v.shape, &shape, &first, &step);
                    self.set(
                        &out,
                        Value {
                            shape,
                            dtype: DType::I64,
                            src: Source::Ints(picked),
                        },
                    );
                } else {
                    if v.dtype != DType::F32 {
                        return Err(format!("{} must be float32", input(0)?));
                    }
                    let (src, st, offset) = self.view(&v);
                    let offset = offset + (0..rank).map(|d| first[d] * st[d]).sum::<i64>();
                    let coefs = (0..rank).map(|d| st[d] * step[d]).collect();
                    self.put_elementwise(&out, shape, Expr::Load { src, coefs, offset });
                }
            }
            "Clip" => {
                let x = self.f32_value(input(0)?)?;
                let bound =
                    |this: &Self, i: usize, attr_name: &str| -> Result<Option<f32>, String> {
                        match node.input.get(i).filter(|n| !n.is_empty()) {
                            Some(n) => match this.get(n)?.src {
                                Source::Scalar(v) => Ok(Some(v)),
                                // An int64 bound (a clamp of positions at 0).
                                Source::Ints(v) if v.len() == 1 => Ok(Some(v[0] as f32)),
                                _ => Err(format!("Clip bound {n} must be a constant scalar")),
                            },
                            // Before opset 11: attributes.
                            None => Ok(attr(node, attr_name).map(|a| a.f)),
                        }
                    };
                let (lo, hi) = (bound(self, 1, "min")?, bound(self, 2, "max")?);
                let mut e = self.expr(&x, &x.shape);
                if let Some(lo) = lo {
                    e = Expr::Binary(BinOp::Max, Box::new(e), Box::new(Expr::Const(lo)));
                }
                if let Some(hi) = hi {
                    e = Expr::Binary(BinOp::Min, Box::new(e), Box::new(Expr::Const(hi)));
                }
                self.put_elementwise(&out, x.shape.clone(), e);
            }
            "Range" => {
                let (a, b, c) = (
                    self.get(input(0)?)?,
                    self.get(input(1)?)?,
                    self.get(input(2)?)?,
                );
                let value = match (&a.src, &b.src, &c.src) {
                    (Source::Ints(a), Source::Ints(b), Source::Ints(c))
                        if a.len() == 1 && b.len() == 1 && c.len() == 1 && c[0] != 0 =>
                    {
                        let (start, limit, delta) = (a[0], b[0], c[0]);
                        let n = ((limit - start) as f64 / delta as f64).ceil().max(0.0) as i64;
                        let v: Vec<i64> = (0..n).map(|k| start + k * delta).collect();
                        Value {
                            shape: vec![v.len()],
                            dtype: DType::I64,
                            src: Source::Ints(v),
                        }
                    }
                    (Source::Scalar(start), Source::Scalar(limit), Source::Scalar(delta))
                        if *delta != 0.0 =>
                    {
                        let n = ((limit - start) / delta).ceil().max(0.0) as usize;
                        let v: Vec<f32> = (0..n).map(|k| start + k as f32 * delta).collect();
                        let shape = vec![v.len()];
                        let src = self.constant(DType::F32, v, vec![]);
                        Value {
                            shape,
                            dtype: DType::F32,
                            src,
                        }
                    }
                    _ => {
                        return Err(
                            "Range of run-time values (load-time constants are supported)".into(),
                        );
                    }
                };
                self.set(&out, value);
            }
            "Split" | "SplitToSequence" => {
                let v = self.get(input(0)?)?;
                let rank = v.shape.len();
                let axis = norm_axis(attr_int(node, "axis", 0), rank)?;
                let len = v.shape[axis];
                let split = match node.input.get(1).filter(|n| !n.is_empty()) {
                    Some(n) => Some(self.ints(n)?),
                    None => attr_ints(node, "split"),
                };
                let outputs = node.output.iter().filter(|o| !o.is_empty()).count();
                let sizes: Vec<usize> = match split {
                    // SplitToSequence: a scalar split is a chunk size, the last chunk shorter.
                    Some(s) if s.len() == 1 && op == "SplitToSequence" && len > 0 => {
                        let c = usize::try_from(s[0])
                            .ok()
                            .filter(|&c| c > 0)
                            .ok_or("split size 0")?;
                        (0..len.div_ceil(c)).map(|k| c.min(len - k * c)).collect()
                    }
                    Some(s) => s
                        .iter()
                        .map(|&x| usize::try_from(x).map_err(|_| format!("split size {x}")))
                        .collect::<Result<_, _>>()?,
                    None if op == "SplitToSequence" => vec![1; len],
                    None => {
                        let n = usize::try_from(attr_int(node, "num_outputs", outputs as i64))
                            .ok()
                            .filter(|&n| n > 0)
                            .ok_or("Split into 0 outputs")?;
                        let c = len.div_ceil(n);
                        (0..n).map(|k| c.min(len.saturating_sub(k * c))).collect()
                    }
                };
                if sizes.iter().sum::<usize>() != len {
                    return Err(format!("split sizes {sizes:?} do not add up to {len}"));
                }
                // keepdims 0 (SplitToSequence without split): the axis goes.
                let drop_axis = op == "SplitToSequence"
                    && node.input.get(1).is_none_or(|n| n.is_empty())
                    && attr_int(node, "keepdims", 1) == 0;
                let pieces = self.split(v, axis, &sizes, drop_axis)?;
                if op == "Split" {
                    if pieces.len() != outputs {
                        return Err(format!("{} pieces for {outputs} outputs", pieces.len()));
                    }
                    for (name, p) in node.output.iter().zip(pieces) {
                        self.set(name, p);
                    }
                } else {
                    self.seqs.insert(out.clone(), pieces);
                }
            }
            "SequenceAt" => {
                let seq = self.seqs.get(input(0)?).ok_or_else(|| {
                    format!("{} is not a tensor sequence", input(0).unwrap_or(""))
                })?;
                let at = self.ints(input(1)?)?;
                let n = seq.len() as i64;
                let i = match at.as_slice() {
                    [i] if (-n..n).contains(i) => {
                        if *i < 0 {
                            i + n
                        } else {
                            *i
                        }
                    }
                    _ => {
                        return Err(format!(
                            "SequenceAt position {at:?} of a {n}-tensor sequence"
                        ));
                    }
                };
                let v = seq[i as usize].clone();
                self.set(&out, v);
            }
            "Transpose" => {
                let v = self.f32_value(input(0)?)?;
                let rank = v.shape.len();
                let perm = attr_ints(node, "perm")
                    .unwrap_or_else(|| (0..rank as i64).rev().collect::<Vec<_>>());
                if perm.len() != rank {
                    return Err(format!("perm {perm:?} for rank {rank}"));
                }
                // A view of a view is one load: compose instead of storing.
                let (src, st, offset) = self.view(&v);
                let perm: Vec<usize> = perm
                    .iter()
                    .map(|&p| norm_axis(p, rank))
                    .collect::<Result<_, _>>()?;
                let shape: Vec<usize> = perm.iter().map(|&p| v.shape[p]).collect();
                let coefs = perm.iter().map(|&p| st[p]).collect();
                let expr = Expr::Load { src, coefs, offset };
                self.put_elementwise(&out, shape, expr);
            }
            "Concat" if !node.input.is_empty() && node.input.iter().all(|n| {
                matches!(self.values.get(n), Some(Value { src: Source::Ints(_), shape, .. }) if shape.len() <= 1)
            }) =>
            {
                // Shape vectors joined at load.
                let mut v = vec![];
                for n in &node.input {
                    v.extend(self.ints(n)?);
                }
                let dtype = self.get(&node.input[0])?.dtype;
                self.set(&out, Value { shape: vec![v.len()], dtype, src: Source::Ints(v) });
            }
            "Concat" if node.input.iter().any(|n| matches!(self.values.get(n), Some(Value { src: Source::F64(_), .. }))) => {
                let vals: Vec<Value> = node.input.iter().map(|n| self.get(n)).collect::<Result<_, _>>()?;
                let parts: Vec<Vec<f64>> = vals
                    .iter()
                    .map(|v| load_time_f64(&v.src).ok_or_else(|| float64_at_run_time(&out)))
                    .collect::<Result<_, _>>()?;
                let rank = vals[0].shape.len();
                let axis = norm_axis(attr_int(node, "axis", 0), rank)?;
                let outer: usize = vals[0].shape[..axis].iter().product();
                let mut joined = vec![];
                for o in 0..outer {
                    for (v, p) in vals.iter().zip(&parts) {
                        let block: usize = v.shape[axis..].iter().product();
                        joined.extend_from_slice(&p[o * block..(o + 1) * block]);
                    }
                }
                let mut shape = vals[0].shape.clone();
                shape[axis] = vals.iter().map(|v| v.shape[axis]).sum();
                self.set(&out, Value { shape, dtype: DType::F32, src: Source::F64(joined) });
            }
            "Concat" => {
                let vals: Vec<Value> = node
                    .input
                    .iter()
                    .map(|n| self.f32_value(n))
                    .collect::<Result<_, _>>()?;
                let first = vals.first().ok_or("no inputs")?;
                let rank = first.shape.len();
                let axis = norm_axis(attr_int(node, "axis", 0), rank)?;
                let mut shape = first.shape.clone();
                shape[axis] = 0;
                for v in &vals {
                    if v.shape.len() != rank
                        || (0..rank).any(|d| d != axis && v.shape[d] != first.shape[d])
                    {
                        return Err(format!("concat of {:?} and {:?}", first.shape, v.shape));
                    }
                    shape[axis] += v.shape[axis];
                }
                let mut starts = vec![];
                let mut parts = vec![];
                let mut at = 0i64;
                for v in &vals {
                    let e = self.expr(v, &v.shape);
                    starts.push(at);
                    parts.push(e);
                    at += v.shape[axis] as i64;
                }
                let expr = Expr::Select {
                    axis,
                    starts,
                    parts,
                };
                self.put_elementwise(&out, shape, expr);
            }
            "Gather" => {
                let idx = self.get(input(1)?)?;
                if let (Source::Ints(t), Source::Ints(i)) = (&self.get(input(0)?)?.src, &idx.src) {
                    // Shape arithmetic (`Gather(Shape(x), 1)`): picked at load.
                    let n = t.len() as i64;
                    let picked = i
                        .iter()
                        .map(|&k| {
                            let k = if k < 0 { k + n } else { k };
                            t.get(usize::try_from(k).map_err(|_| "index out of range")?)
                                .copied()
                                .ok_or("index out of range")
                        })
                        .collect::<Result<Vec<i64>, _>>()?;
                    self.set(&out, Value { shape: idx.shape.clone(), dtype: DType::I64, src: Source::Ints(picked) });
                    return Ok(());
                }
                let data = self.get(input(0)?)?;
                if let Source::Ints(i) = &idx.src
                    && i.len() == 1
                    && data.dtype == DType::F32
                {
                    // One constant index along any axis (`vlm_k[i]` of a stacked KV): a view
                    // at an offset, the axis dropped (a rank-0 index) or kept as 1.
                    let rank = data.shape.len();
                    let axis = norm_axis(attr_int(node, "axis", 0), rank)?;
                    let n = data.shape[axis] as i64;
                    let k = if i[0] < 0 { i[0] + n } else { i[0] };
                    if !(0..n).contains(&k) {
                        return Err(format!("index {} out of range for axis {axis} of {n}", i[0]));
                    }
                    let (src, st, offset) = self.view(&data);
                    let offset = offset + k * st[axis];
                    let mut shape = data.shape[..axis].to_vec();
                    let mut coefs = st[..axis].to_vec();
                    shape.extend(idx.shape.iter().copied());
                    coefs.extend(idx.shape.iter().map(|_| 0));
                    shape.extend(data.shape[axis + 1..].iter().copied());
                    coefs.extend(st[axis + 1..].iter().copied());
                    self.put_elementwise(&out, shape, Expr::Load { src, coefs, offset });
                    return Ok(());
                }
                let table = self.f32_value(input(0)?)?;
                if attr_int(node, "axis", 0) != 0 || table.shape.len() != 2 {
                    return Err("only axis-0 gathers from a 2-D table are supported".into());
                }
                let Source::Buf(index) = idx.src else {
                    return Err("gather indices must be a graph input".into());
                };
                if idx.dtype != DType::I64 || self.buffers[index].dtype != DType::I64 {
                    return Err("gather indices must be an int64 graph input (indices computed at run time are not supported yet)".into());
                }
                let tbl = self.materialize(&table);
                let row_len = table.shape[1];
                let mut shape = idx.shape.clone();
                shape.push(row_len);
                let r = idx.shape.len();
                let mut index_coefs = strides(&idx.shape);
                index_coefs.push(0);
                let mut row_coefs = vec![0; r];
                row_coefs.push(1);
                let expr = Expr::Gather {
                    table: tbl,
                    rows: table.shape[0] as i64,
                    row_len: row_len as i64,
                    index,
                    index_coefs,
                    index_offset: 0,
                    row_coefs,
                    row_offset: 0,
                };
                self.put_elementwise(&out, shape, expr);
            }
            "MatMul" => {
                if let Some(&g) = self.siblings.get(&out) {
                    let state = self.groups[g].state;
                    match state {
                        // Computed with its first sibling: its value is a view already.
                        SiblingState::Merged => return Ok(()),
                        SiblingState::Waiting if self.merge_siblings(g, input(0)?)? => {
                            return Ok(());
                        }
                        _ => {}
                    }
                }
                let a = self.f32_value(input(0)?)?;
                let b = self.f32_value(input(1)?)?;
                let (shape, src) = self.product(&a, false, &b, false, 1.0)?;
                match src {
                    Source::Pending(e) => self.put_elementwise(&out, shape, e),
                    src => self.set(
                        &out,
                        Value {
                            shape,
                            dtype: DType::F32,
                            src,
                        },
                    ),
                }
            }
            "Gemm" => {
                let a = self.f32_value(input(0)?)?;
                let b = self.f32_value(input(1)?)?;
                if a.shape.len() != 2 || b.shape.len() != 2 {
                    return Err("Gemm takes 2-D operands".into());
                }
                let (ta, tb) = (
                    attr_int(node, "transA", 0) != 0,
                    attr_int(node, "transB", 0) != 0,
                );
                let (m, k) = if ta {
                    (a.shape[1], a.shape[0])
                } else {
                    (a.shape[0], a.shape[1])
                };
                let (k2, n) = if tb {
                    (b.shape[1], b.shape[0])
                } else {
                    (b.shape[0], b.shape[1])
                };
                if k != k2 {
                    return Err(format!("Gemm of {:?} and {:?}", a.shape, b.shape));
                }
                let alpha = attr_float(node, "alpha", 1.0);
                let beta = attr_float(node, "beta", 1.0);
                let (shape, src) = self.product(&a, ta, &b, tb, alpha)?;
                debug_assert_eq!(shape, vec![m, n]);
                let product = Value {
                    shape: shape.clone(),
                    dtype: DType::F32,
                    src,
                };

                match node.input.get(2).filter(|s| !s.is_empty()) {
                    None => {
                        let e = self.expr(&product, &shape);
                        self.put_elementwise(&out, shape, e);
                    }
                    Some(bias) => {
                        let bias = self.f32_value(bias)?;
                        broadcast(&bias.shape, &shape)?;
                        let mut eb = self.expr(&bias, &shape);
                        if beta != 1.0 {
                            eb =
                                Expr::Binary(BinOp::Mul, Box::new(Expr::Const(beta)), Box::new(eb));
                        }
                        let ec = self.expr(&product, &shape);
                        let e = Expr::Binary(BinOp::Add, Box::new(ec), Box::new(eb));
                        self.put_elementwise(&out, shape, e);
                    }
                }
            }
            "Conv" => self.conv(node, &out)?,
            "LayerNormalization" => {
                let x = self.f32_value(input(0)?)?;
                let rank = x.shape.len();
                if norm_axis(attr_int(node, "axis", -1), rank)? != rank - 1 {
                    return Err("only last-axis layer norm is supported".into());
                }
                let dim = x.shape[rank - 1];
                let g = self.f32_value(input(1)?)?;
                let gamma = self.vector(&g, dim)?;
                let beta = match node.input.get(2).filter(|s| !s.is_empty()) {
                    Some(b) => {
                        let b = self.f32_value(b)?;
                        self.vector(&b, dim)?
                    }
                    None => {
                        let zeros = vec![0.0; dim];
                        self.buffer(dim, DType::F32, Some(zeros))
                    }
                };
                let xb = self.materialize(&x);
                let o = self.buffer(x.shape.iter().product(), DType::F32, None);
                self.ops.push(Op::LayerNorm {
                    x: xb,
                    gamma,
                    beta,
                    out: o,
                    rows: x.shape.iter().product::<usize>() / dim,
                    dim,
                    eps: attr_float(node, "epsilon", 1e-5),
                });
                self.put_buf(&out, x.shape.clone(), o);
            }
            "Softmax" => {
                let x = self.f32_value(input(0)?)?;
                let rank = x.shape.len();
                if norm_axis(attr_int(node, "axis", -1), rank)? != rank - 1 {
                    return Err("only last-axis softmax is supported".into());
                }
                let dim = x.shape[rank - 1];
                let o = self.buffer(x.shape.iter().product(), DType::F32, None);
                // Scores + mask (or any pending elementwise input without a product in it):
                // read inside the softmax, three times per element, instead of stored.
                if let Source::Pending(e) = &x.src
                    && !e.has_dot()
                {
                    self.fusions.fused_softmax_inputs += 1;
                    self.ops.push(Op::SoftmaxOf {
                        out: o,
                        shape: x.shape.clone(),
                        expr: e.clone(),
                    });
                    self.put_buf(&out, x.shape.clone(), o);
                    return Ok(());
                }
                let xb = self.materialize(&x);
                self.ops.push(Op::Softmax {
                    x: xb,
                    out: o,
                    rows: x.shape.iter().product::<usize>() / dim,
                    dim,
                });
                self.put_buf(&out, x.shape.clone(), o);
            }
            "ReduceMean" => {
                let x = self.f32_value(input(0)?)?;
                let rank = x.shape.len();
                let axes = match node.input.get(1).filter(|s| !s.is_empty()) {
                    Some(a) => self.ints(a)?,
                    None => attr_ints(node, "axes").ok_or("ReduceMean over all axes")?,
                };
                if axes.len() != 1 {
                    return Err("only single-axis ReduceMean is supported".into());
                }
                let axis = norm_axis(axes[0], rank)?;
                let outer = x.shape[..axis].iter().product();
                let inner: usize = x.shape[axis + 1..].iter().product();
                // mean(x·x) over the last axis (RMSNorm): the square is read in the reduction.
                let squared = if inner == 1 { contiguous_square(&x) } else { None };
                let (kind, xb) = match squared {
                    Some(b) => {
                        self.fused_square_means += 1;
                        (AxisKind::MeanSquare, b)
                    }
                    None => (AxisKind::Mean, self.materialize(&x)),
                };
                let o = self.buffer(outer * inner, DType::F32, None);
                self.ops.push(Op::Axis {
                    kind,
                    x: xb,
                    out: o,
                    outer,
                    len: x.shape[axis],
                    inner,
                });
                let mut shape = x.shape.clone();
                if attr_int(node, "keepdims", 1) != 0 {
                    shape[axis] = 1;
                } else {
                    shape.remove(axis);
                }
                self.put_buf(&out, shape, o);
            }
            other => {
                return Err(format!(
                    "operator {other} is not supported by the cuda engine (use --engine cpu)"
                ));
            }
        }
        Ok(())
    }

    /// `v` with the same elements in the same order under `shape` (Reshape, Unsqueeze,
    /// Squeeze): a stored buffer or a constant is only renamed, a pending expression keeps
    /// its own coordinates.
    fn put_reshaped(&mut self, out: &str, v: &Value, shape: Vec<usize>) {
        let src = match &v.src {
            Source::Ints(i) => Source::Ints(i.clone()),
            Source::F64(f) => Source::F64(f.clone()),
            Source::Scalar(x) => Source::Scalar(*x),
            Source::Pending(Expr::Load { src, coefs, offset })
                if *offset == 0 && *coefs == strides(&v.shape) =>
            {
                Source::Buf(*src)
            }
            // A view whose axes split or merge where its strides allow (size-1 axes coming
            // or going: Unsqueeze, Squeeze; a column range of products computed side by side
            // split into heads): still a view.
            Source::Pending(Expr::Load { src, coefs, offset })
                if let Some(coefs) = reshape_view(&v.shape, coefs, &shape) =>
            {
                let e = Expr::Load {
                    src: *src,
                    coefs,
                    offset: *offset,
                };
                self.put_elementwise(out, shape, e);
                return;
            }
            Source::Pending(e) => {
                let e = Expr::Reshape {
                    from: v.shape.clone(),
                    expr: Box::new(e.clone()),
                };
                self.put_elementwise(out, shape, e);
                return;
            }
            Source::Buf(b) => Source::Buf(*b),
        };
        self.set(
            out,
            Value {
                shape,
                dtype: v.dtype,
                src,
            },
        );
    }

    /// A constant's source, as initializers are held: int64 at load, a one-element float
    /// inlined, any other float tensor a weight buffer.
    fn constant(&mut self, dtype: DType, f: Vec<f32>, i: Vec<i64>) -> Source {
        match dtype {
            DType::I64 | DType::Bool => Source::Ints(i),
            DType::F32 if f.len() == 1 => Source::Scalar(f[0]),
            DType::F32 => Source::Buf(self.buffer(f.len(), DType::F32, Some(f))),
        }
    }

    /// The pieces of `v` along `axis`. A concatenation (a pending [`Expr::Select`], as
    /// exports stack every layer's KV cache before splitting it per layer) gives back its
    /// parts where a piece is exactly one; any other pending value is written once and the
    /// pieces are views of it — never once per piece.
    fn split(
        &mut self,
        mut v: Value,
        axis: usize,
        sizes: &[usize],
        drop_axis: bool,
    ) -> Result<Vec<Value>, String> {
        // Which part each piece is, when every piece is exactly one part.
        let whole_parts = match &v.src {
            Source::Pending(Expr::Select {
                axis: a,
                starts,
                parts,
            }) if *a == axis && parts.iter().all(Expr::cheap) => {
                let mut at = 0i64;
                sizes
                    .iter()
                    .map(|&size| {
                        let j = starts.iter().position(|&s| s == at)?;
                        at += size as i64;
                        let end = starts.get(j + 1).copied().unwrap_or(v.shape[axis] as i64);
                        (end == at).then(|| parts[j].clone())
                    })
                    .collect::<Option<Vec<Expr>>>()
            }
            _ => None,
        };
        if let Some(parts) = whole_parts {
            let mut pieces = vec![];
            for (&size, part) in sizes.iter().zip(parts) {
                let mut shape = v.shape.clone();
                shape[axis] = size;
                let (shape, expr) = match (drop_axis, part) {
                    (false, e) => (shape, e),
                    (
                        true,
                        Expr::Load {
                            src,
                            mut coefs,
                            offset,
                        },
                    ) => {
                        coefs.remove(axis);
                        shape.remove(axis);
                        (shape, Expr::Load { src, coefs, offset })
                    }
                    (true, e) => {
                        let mut to = shape.clone();
                        to.remove(axis);
                        let e = Expr::Reshape {
                            from: shape,
                            expr: Box::new(e),
                        };
                        (to, e)
                    }
                };
                pieces.push(Value {
                    shape,
                    dtype: v.dtype,
                    src: Source::Pending(expr),
                });
            }
            self.fusions.split_parts += pieces.len();
            return Ok(pieces);
        }
        if let Source::Pending(e) = &v.src
            && !matches!(e, Expr::Load { .. })
        {
            v.src = Source::Buf(self.emit_map(v.shape.clone(), e.clone()));
        }
        let (mut at, mut pieces) = (0, vec![]);
        for &size in sizes {
            pieces.push(self.piece(&v, axis, at, size, drop_axis)?);
            at += size;
        }
        Ok(pieces)
    }

    /// `v[.., at..at+size, ..]` along `axis` (dropped when `drop_axis`, size 1): a view of
    /// a float value, or the integers themselves at load.
    fn piece(
        &mut self,
        v: &Value,
        axis: usize,
        at: usize,
        size: usize,
        drop_axis: bool,
    ) -> Result<Value, String> {
        let mut shape = v.shape.clone();
        shape[axis] = size;
        let src = match &v.src {
            Source::Ints(vals) => {
                let mut first = vec![0i64; shape.len()];
                first[axis] = at as i64;
                let step = vec![1i64; shape.len()];
                Source::Ints(pick_strided(vals, &v.shape, &shape, &first, &step))
            }
            Source::Buf(b) if self.buffers[*b].dtype == DType::I64 => {
                return Err("a split of an int64 graph input".into());
            }
            _ => {
                let (src, st, offset) = self.view(v);
                let mut coefs = st.clone();
                let offset = offset + at as i64 * st[axis];
                if drop_axis {
                    coefs.remove(axis);
                }
                Source::Pending(Expr::Load { src, coefs, offset })
            }
        };
        if drop_axis {
            shape.remove(axis);
        }
        Ok(Value {
            shape,
            dtype: v.dtype,
            src,
        })
    }

    /// A value computed in float32 maps: a float, or a bool/int64 held as floats. An int64
    /// graph input (token ids) is not: it feeds gathers, or a Cast first.
    fn f32_value(&self, name: &str) -> Result<Value, String> {
        let v = self.get(name)?;
        match &v.src {
            Source::Buf(b) if self.buffers[*b].dtype == DType::I64 => Err(format!(
                "{name} is an int64 graph input; only Gather and Cast read one"
            )),
            Source::Ints(_) if v.dtype != DType::Bool => Err(format!(
                "{name} is an int64 constant where a float is expected"
            )),
            Source::F64(_) => Err(float64_at_run_time(name)),
            _ => Ok(v),
        }
    }

    /// A per-channel vector of `dim` values as a buffer (broadcast if scalar).
    fn vector(&mut self, v: &Value, dim: usize) -> Result<usize, String> {
        match (&v.src, v.shape.iter().product::<usize>()) {
            (Source::Scalar(x), _) => Ok(self.buffer(dim, DType::F32, Some(vec![*x; dim]))),
            (_, n) if n == dim => Ok(self.materialize(v)),
            (_, n) => Err(format!("scale/bias of {n} values for a dimension of {dim}")),
        }
    }

    /// `alpha · op(a) · op(b)` with numpy batch broadcasting (`*_trans`:
    /// the last two axes swapped). Small products become a pending
    /// [`Expr::Dot`] that reads transposed views in place; large ones a
    /// cuBLAS gemm into a new buffer.
    fn product(
        &mut self,
        a: &Value,
        a_trans: bool,
        b: &Value,
        b_trans: bool,
        alpha: f32,
    ) -> Result<(Vec<usize>, Source), String> {
        let (ra, rb) = (a.shape.len(), b.shape.len());
        if ra < 2 || rb < 2 {
            return Err("MatMul needs operands of rank 2 or more".into());
        }
        let logical = |shape: &[usize], t: bool| {
            let mut s = shape.to_vec();
            if t {
                let n = s.len();
                s.swap(n - 2, n - 1);
            }
            s
        };
        let (al, bl) = (logical(&a.shape, a_trans), logical(&b.shape, b_trans));
        let (m, k) = (al[ra - 2], al[ra - 1]);
        let (k2, n) = (bl[rb - 2], bl[rb - 1]);
        if k != k2 {
            return Err(format!("MatMul of {:?} and {:?}", a.shape, b.shape));
        }
        let batch_shape = broadcast(&al[..ra - 2], &bl[..rb - 2])?;
        let batch: usize = batch_shape.iter().product();
        let mut shape = batch_shape.clone();
        shape.extend([m, n]);
        let r = shape.len();

        if batch * m * n * k <= self.dot_macs {
            // Coefficients over (batch…, i, j, p) for an operand whose last two logical
            // axes are (row, col) = (i, p) for a and (p, j) for b.
            let operand = |this: &mut Self, v: &Value, l: &[usize], t: bool, is_a: bool| {
                let (src, mut co, offset) = this.view(v);
                let rank = co.len();
                if t {
                    co.swap(rank - 2, rank - 1);
                }
                let mut coefs = vec![0i64; r + 1];
                let lead = r - 2 - (rank - 2);
                for d in 0..rank - 2 {
                    if l[d] != 1 {
                        coefs[lead + d] = co[d];
                    }
                }
                if is_a {
                    coefs[r - 2] = co[rank - 2];
                    coefs[r] = co[rank - 1];
                } else {
                    coefs[r] = co[rank - 2];
                    coefs[r - 1] = co[rank - 1];
                }
                Expr::Load { src, coefs, offset }
            };
            let ea = operand(self, a, &al, a_trans, true);
            let eb = operand(self, b, &bl, b_trans, false);
            let mut e = Expr::Dot {
                len: k as i64,
                a: Box::new(ea),
                b: Box::new(eb),
            };
            if alpha != 1.0 {
                e = Expr::Binary(BinOp::Mul, Box::new(Expr::Const(alpha)), Box::new(e));
            }
            return Ok((shape, Source::Pending(e)));
        }

        let stride = |shape: &[usize], rank: usize, mat: usize| -> Result<usize, String> {
            let own: usize = shape[..rank - 2].iter().product();
            if own == 1 {
                Ok(0)
            } else if own == batch && shape[..rank - 2].len() <= batch_shape.len() {
                Ok(mat)
            } else {
                Err(format!(
                    "MatMul batch broadcast of {shape:?} to {batch_shape:?}"
                ))
            }
        };
        // An operand cuBLAS can read where it lies (a KV head shared across query heads,
        // transposed or not) is not copied: batch stride 0.
        let (abuf, a_trans, a_stride) = match self.broadcast_operand(a, a_trans) {
            Some((buf, t)) => (buf, t, 0),
            None => match self.shared_matrix(a) {
                Some(buf) => (buf, a_trans, 0),
                None => (self.materialize(a), a_trans, stride(&a.shape, ra, m * k)?),
            },
        };
        let (bbuf, b_trans, b_stride) = match self.broadcast_operand(b, b_trans) {
            Some((buf, t)) => (buf, t, 0),
            None => match self.shared_matrix(b) {
                Some(buf) => (buf, b_trans, 0),
                None => (self.materialize(b), b_trans, stride(&b.shape, rb, k * n)?),
            },
        };
        let c = self.buffer(batch * m * n, DType::F32, None);
        self.ops.push(Op::Gemm(Gemm {
            batch,
            m,
            n,
            k,
            a: abuf,
            a_trans,
            a_stride,
            b: bbuf,
            b_trans,
            b_stride,
            c,
            alpha,
            c_ld: n,
            c_stride: m * n,
        }));
        Ok((shape, Source::Buf(c)))
    }

    /// 2-D convolution without padding or dilation, group 1: im2col (a map)
    /// then one gemm per image, then the bias as a pending add.
    fn conv(&mut self, node: &pb::NodeProto, out: &str) -> Result<(), String> {
        let x = self.f32_value(node.input.first().ok_or("no input")?)?;
        let w = self.f32_value(node.input.get(1).ok_or("no weight")?)?;
        if x.shape.len() != 4 || w.shape.len() != 4 {
            return Err("only 2-D convolutions are supported".into());
        }
        let zero = |name: &str| attr_ints(node, name).is_none_or(|v| v.iter().all(|&p| p == 0));
        let one = |name: &str| attr_ints(node, name).is_none_or(|v| v.iter().all(|&p| p == 1));
        if !zero("pads") || !one("dilations") || attr_int(node, "group", 1) != 1 {
            return Err(
                "only convolutions without padding, dilation or groups are supported".into(),
            );
        }
        if attr(node, "auto_pad").is_some_and(|a| !a.s.is_empty() && a.s != b"NOTSET") {
            return Err("auto_pad is not supported".into());
        }
        let (nb, c, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
        let (mo, cw, kh, kw) = (w.shape[0], w.shape[1], w.shape[2], w.shape[3]);
        if cw != c {
            return Err(format!("weight {:?} for input {:?}", w.shape, x.shape));
        }
        let st = attr_ints(node, "strides").unwrap_or(vec![1, 1]);
        let (sh, sw) = (st[0] as usize, st[1] as usize);
        if h < kh || wd < kw {
            return Err("kernel larger than the image".into());
        }
        let (oh, ow) = ((h - kh) / sh + 1, (wd - kw) / sw + 1);
        let xb = self.materialize(&x);
        let (hw, w_) = ((h * wd) as i64, wd as i64);
        let col_shape = vec![nb, c, kh, kw, oh, ow];
        let col = self.emit_map(
            col_shape,
            Expr::Load {
                src: xb,
                coefs: vec![c as i64 * hw, hw, w_, 1, sh as i64 * w_, sw as i64],
                offset: 0,
            },
        );
        let wb = self.materialize(&w);
        let (kk, pp) = (c * kh * kw, oh * ow);
        let y = self.buffer(nb * mo * pp, DType::F32, None);
        self.ops.push(Op::Gemm(Gemm {
            batch: nb,
            m: mo,
            n: pp,
            k: kk,
            a: wb,
            a_trans: false,
            a_stride: 0,
            b: col,
            b_trans: false,
            b_stride: kk * pp,
            c: y,
            alpha: 1.0,
            c_ld: pp,
            c_stride: mo * pp,
        }));
        let shape = vec![nb, mo, oh, ow];
        match node.input.get(2).filter(|s| !s.is_empty()) {
            None => self.put_buf(out, shape, y),
            Some(b) => {
                let b = self.f32_value(b)?;
                let bias = self.vector(&b, mo)?;
                let ey = Expr::Load {
                    src: y,
                    coefs: strides(&shape),
                    offset: 0,
                };
                let eb = Expr::Load {
                    src: bias,
                    coefs: vec![0, 1, 0, 0],
                    offset: 0,
                };
                self.put_elementwise(
                    out,
                    shape,
                    Expr::Binary(BinOp::Add, Box::new(ey), Box::new(eb)),
                );
            }
        }
        Ok(())
    }
}

/// The load coefficients of a strided view of `from` (coefficients `coefs`) reshaped to `to`,
/// when no copy is needed: each run of axes merged into one must be contiguous with respect
/// to each other, as numpy's reshape without a copy.
fn reshape_view(from: &[usize], coefs: &[i64], to: &[usize]) -> Option<Vec<i64>> {
    if from.iter().product::<usize>() != to.iter().product::<usize>() {
        return None;
    }
    let fa: Vec<usize> = (0..from.len()).filter(|&d| from[d] != 1).collect();
    let ta: Vec<usize> = (0..to.len()).filter(|&d| to[d] != 1).collect();
    let mut out = vec![0i64; to.len()];
    let (mut i, mut j) = (0, 0);
    while i < fa.len() && j < ta.len() {
        // One group: the fewest axes on each side with equal products.
        let (i0, j0) = (i, j);
        let (mut pf, mut pt) = (from[fa[i]], to[ta[j]]);
        i += 1;
        j += 1;
        while pf != pt {
            if pf < pt {
                pf *= *from.get(*fa.get(i)?)?;
                i += 1;
            } else {
                pt *= *to.get(*ta.get(j)?)?;
                j += 1;
            }
        }
        // The merged input axes must be one strided run.
        for k in i0..i - 1 {
            if coefs[fa[k]] != coefs[fa[k + 1]] * from[fa[k + 1]] as i64 {
                return None;
            }
        }
        let mut c = coefs[fa[i - 1]];
        for k in (j0..j).rev() {
            out[ta[k]] = c;
            c *= to[ta[k]] as i64;
        }
    }
    (i == fa.len() && j == ta.len()).then_some(out)
}

/// ONNX Slice on one axis of length `len`: (first index, element count, step), with
/// negative indices counted from the end and out-of-range ones clamped as the spec says.
fn slice_range(start: i64, end: i64, step: i64, len: i64) -> Result<(i64, usize, i64), String> {
    if step == 0 {
        return Err("Slice step 0".into());
    }
    let norm = |x: i64| if x < 0 { x.saturating_add(len) } else { x };
    let (s, e) = (norm(start), norm(end));
    let (first, count) = if step > 0 {
        let (s, e) = (s.clamp(0, len), e.clamp(0, len));
        (s, if e > s { (e - s + step - 1) / step } else { 0 })
    } else {
        let (s, e) = (s.clamp(0, len - 1), e.clamp(-1, len - 1));
        (
            s,
            if s > e {
                (s - e + (-step) - 1) / (-step)
            } else {
                0
            },
        )
    };
    Ok((first, count as usize, step))
}

/// ONNX Reshape's shape argument (0 copies, -1 infers) applied to `from`.
fn reshape(from: &[usize], spec: &[i64]) -> Result<Vec<usize>, String> {
    let total: usize = from.iter().product();
    let mut shape = vec![];
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        match d {
            0 => shape.push(*from.get(i).ok_or("reshape 0 beyond the input rank")?),
            -1 if infer.is_none() => {
                infer = Some(i);
                shape.push(1);
            }
            d if d > 0 => shape.push(d as usize),
            d => return Err(format!("reshape dimension {d}")),
        }
    }
    let known: usize = shape.iter().product();
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot reshape {from:?} to {spec:?}"));
        }
        shape[i] = total / known;
    }
    if shape.iter().product::<usize>() != total {
        return Err(format!("cannot reshape {from:?} to {spec:?}"));
    }
    Ok(shape)
}

#[cfg(test)]
pub(crate) mod tests;
