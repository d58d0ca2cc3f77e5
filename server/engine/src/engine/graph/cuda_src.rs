//! CUDA C for a program's kernels, compiled at load by NVRTC.
//!
//! Every [`Op::Map`] becomes its own kernel with shapes and offsets as
//! literals (one thread per output element); the reductions and the denoise
//! loop's steps share fixed kernels in [`FIXED`]. Reductions sum in a fixed
//! tree order, so a run gives the same bits every time.

use std::fmt::Write;

use super::{BinOp, DType, Expr, Op, Precision, Program, UnOp};

/// Threads per block for maps and the elementwise fixed kernels.
pub const MAP_BLOCK: u32 = 256;
/// Threads per block for row reductions (a power of two).
pub const ROW_BLOCK: u32 = 128;

/// Kernels every program uses; argument order is the launch order in the engine.
pub const FIXED: &str = r#"
// Half storage (`--precision f16|bf16`): 2-byte values, computed in f32. Conversions round
// to nearest even, as the reference executor's (the `half` crate's) do.
struct rf_f16 { unsigned short x; };
struct rf_bf16 { unsigned short x; };
__device__ __forceinline__ float rf_ld(float v) { return v; }
__device__ __forceinline__ float rf_ld(rf_f16 v) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x)); return f;
}
__device__ __forceinline__ float rf_ld(rf_bf16 v) {
    return __uint_as_float(((unsigned)v.x) << 16);
}
__device__ __forceinline__ rf_f16 rf_to_f16(float f) {
    rf_f16 r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.x) : "f"(f)); return r;
}
__device__ __forceinline__ rf_bf16 rf_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    rf_bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) { r.x = (unsigned short)((u >> 16) | 0x40u); return r; }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.x = (unsigned short)(u >> 16);
    return r;
}
__device__ __forceinline__ void rf_st(float* p, float v) { *p = v; }
__device__ __forceinline__ void rf_st(rf_f16* p, float v) { *p = rf_to_f16(v); }
__device__ __forceinline__ void rf_st(rf_bf16* p, float v) { *p = rf_to_bf16(v); }

// The row kernels write their output in its buffer's storage (float, or half under
// `--precision`): one template, an instantiation per storage.
template <typename T>
__device__ __forceinline__ void rf_layernorm_t(const float* __restrict__ x, const float* __restrict__ g,
        const float* __restrict__ b, T* __restrict__ y, int dim, float eps) {
    __shared__ float sh[128];
    const float* row = x + (long long)blockIdx.x * dim;
    T* out = y + (long long)blockIdx.x * dim;
    float s = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += row[i];
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    const float mean = sh[0] / dim;
    __syncthreads();
    float v = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) { float d = row[i] - mean; v += d * d; }
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    const float inv = 1.f / sqrtf(sh[0] / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        rf_st(out + i, (row[i] - mean) * inv * g[i] + b[i]);
}

// Softmax of row blockIdx.x, its elements read through `ld(flat index)`: a stored tensor, or
// an expression computed as it is read (a generated kernel, Op::SoftmaxOf).
template <typename T, typename F>
__device__ __forceinline__ void rf_softmax_f(F ld, T* __restrict__ y, int dim) {
    __shared__ float sh[128];
    const long long base = (long long)blockIdx.x * dim;
    T* out = y + base;
    float m = -__int_as_float(0x7f800000);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) m = fmaxf(m, ld(base + i));
    sh[threadIdx.x] = m;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + o]);
        __syncthreads();
    }
    const float mx = sh[0];
    __syncthreads();
    float s = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += expf(ld(base + i) - mx);
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    const float inv = 1.f / sh[0];
    for (int i = threadIdx.x; i < dim; i += blockDim.x) rf_st(out + i, expf(ld(base + i) - mx) * inv);
}

template <typename T>
__device__ __forceinline__ void rf_softmax_t(const float* __restrict__ x, T* __restrict__ y, int dim) {
    rf_softmax_f<T>([=](long long i) { return x[i]; }, y, dim);
}

#define RF_ROWS(SUFFIX, T) \
extern "C" __global__ void rf_layernorm##SUFFIX(const float* __restrict__ x, \
        const float* __restrict__ g, const float* __restrict__ b, T* __restrict__ y, int dim, \
        float eps) { rf_layernorm_t<T>(x, g, b, y, dim, eps); } \
extern "C" __global__ void rf_softmax##SUFFIX(const float* __restrict__ x, T* __restrict__ y, \
        int dim) { rf_softmax_t<T>(x, y, dim); }
RF_ROWS(, float)
RF_ROWS(_f16, rf_f16)
RF_ROWS(_bf16, rf_bf16)

// The mean or sum of each contiguous row (an axis with nothing inside it: RMSNorm's mean of
// squares, a pooling): a block per row, the same tree as the norms, so a long row is read by
// all the block's threads instead of one thread walking it.
template <bool SQUARE>
__device__ __forceinline__ float rf_row_total(const float* __restrict__ row, int len) {
    __shared__ float sh[128];
    float s = 0.f;
    for (int i = threadIdx.x; i < len; i += blockDim.x) { const float v = row[i]; s += SQUARE ? v * v : v; }
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    return sh[0];
}

extern "C" __global__ void rf_row_mean(const float* __restrict__ x, float* __restrict__ y, int len) {
    const float t = rf_row_total<false>(x + (long long)blockIdx.x * len, len);
    if (threadIdx.x == 0) y[blockIdx.x] = t / len;
}

// RMSNorm's statistic: the square read in the reduction (AxisKind::MeanSquare).
extern "C" __global__ void rf_row_mean_sq(const float* __restrict__ x, float* __restrict__ y, int len) {
    const float t = rf_row_total<true>(x + (long long)blockIdx.x * len, len);
    if (threadIdx.x == 0) y[blockIdx.x] = t / len;
}

extern "C" __global__ void rf_row_sum(const float* __restrict__ x, float* __restrict__ y, int len) {
    const float t = rf_row_total<false>(x + (long long)blockIdx.x * len, len);
    if (threadIdx.x == 0) y[blockIdx.x] = t;
}

extern "C" __global__ void rf_mean(const float* __restrict__ x, float* __restrict__ y,
        int outer, int len, int inner) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= outer * inner) return;
    const int o = t / inner, i = t % inner;
    float s = 0.f;
    for (int l = 0; l < len; ++l) s += x[((long long)o * len + l) * inner + i];
    y[t] = s / len;
}

// The sum along the middle axis of x[outer, len, inner], in index order (ReduceSum).
extern "C" __global__ void rf_sum(const float* __restrict__ x, float* __restrict__ y,
        int outer, int len, int inner) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= outer * inner) return;
    const int o = t / inner, i = t % inner;
    float s = 0.f;
    for (int l = 0; l < len; ++l) s += x[((long long)o * len + l) * inner + i];
    y[t] = s;
}

// The running sum along the middle axis (CumSum), one thread per (outer, inner) column.
extern "C" __global__ void rf_cumsum(const float* __restrict__ x, float* __restrict__ y,
        int outer, int len, int inner) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= outer * inner) return;
    const int o = t / inner, i = t % inner;
    float s = 0.f;
    for (int l = 0; l < len; ++l) {
        const long long at = ((long long)o * len + l) * inner + i;
        s += x[at];
        y[at] = s;
    }
}

extern "C" __global__ void rf_fill(float* __restrict__ y, int n, float v) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) y[t] = v;
}

extern "C" __global__ void rf_step(float* __restrict__ x, const float* __restrict__ v, int n,
        float dt, float* __restrict__ t, float t_next) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += dt * v[i];
    if (i == 0) *t = t_next;
}

// Camera frames (HWC RGB bytes) → normalised CHW floats, p·scale + offset rounded as the
// host rounds it (no fused multiply-add); an absent camera is its blank value.
extern "C" __global__ void rf_frames(const unsigned char* __restrict__ hwc,
        const int* __restrict__ present, float* __restrict__ chw, int cams, int plane,
        float s0, float s1, float s2, float o0, float o1, float o2, float k0, float k1, float k2) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= cams * 3 * plane) return;
    const int cam = i / (3 * plane), c = (i / plane) % 3, px = i % plane;
    const float s = c == 0 ? s0 : (c == 1 ? s1 : s2);
    const float o = c == 0 ? o0 : (c == 1 ? o1 : o2);
    const float k = c == 0 ? k0 : (c == 1 ? k1 : k2);
    chw[i] = present[cam]
        ? __fadd_rn(__fmul_rn((float)hwc[((long long)cam * plane + px) * 3 + c], s), o)
        : k;
}

__device__ __forceinline__ float rf_gelu(float x) {
    return x * (erff(x / 1.41421356237309504880f) + 1.f) * 0.5f;
}

__device__ __forceinline__ float rf_gelu_tanh(float x) {
    return 0.5f * x * (1.f + tanhf(0.79788456080286535588f * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ long long rf_row(long long r, long long rows) {
    if (r < 0) r += rows;
    return r < 0 ? 0 : (r >= rows ? rows - 1 : r);
}
"#;

/// One generated kernel (a map, or a softmax of an expression): its name, source, the
/// buffers it takes after `out`, and its launch shape.
#[derive(Debug, Clone)]
pub struct MapKernel {
    pub name: String,
    pub source: String,
    pub params: Vec<usize>,
    /// Blocks and threads per block: a map's threads cover its elements (a warp per element
    /// for long dot products, [`MAP_BLOCK`] per block); a softmax runs a block per row.
    pub grid: u32,
    pub block: u32,
}

/// Dots at least this long are summed by a whole warp per output element
/// (lanes take every 32nd term, then a fixed butterfly): one thread walking
/// a long row is latency-bound.
pub const WARP_DOT_LEN: i64 = 32;

fn longest_dot(e: &Expr) -> i64 {
    match e {
        Expr::Load { .. } | Expr::Gather { .. } | Expr::Const(_) => 0,
        Expr::Unary(_, x) => longest_dot(x),
        Expr::Binary(_, a, b) => longest_dot(a).max(longest_dot(b)),
        Expr::Where(c, a, b) => longest_dot(c).max(longest_dot(a)).max(longest_dot(b)),
        Expr::Select { parts, .. } => parts.iter().map(longest_dot).max().unwrap_or(0),
        Expr::Dot { len, a, b } => (*len).max(longest_dot(a)).max(longest_dot(b)),
        Expr::Reshape { expr, .. } => longest_dot(expr),
    }
}

fn collect_bufs(e: &Expr, out: &mut Vec<usize>) {
    super::visit_reads(e, &mut |b, _| {
        if !out.contains(&b) {
            out.push(b);
        }
    });
}

/// Names of the coordinates in scope and the shape they index.
struct Scope {
    vars: Vec<String>,
    shape: Vec<usize>,
}

struct Printer<'a> {
    /// Fresh-name counter for loop variables and reshape scopes.
    next: usize,
    /// A warp per output element: dots are shared by the lanes.
    warp: bool,
    /// The program (which buffers are stored in half).
    program: &'a Program,
}

/// The C type of a buffer's elements.
fn c_type(p: &Program, b: usize) -> &'static str {
    let buf = &p.buffers[b];
    match buf.dtype {
        DType::I64 => "long long",
        _ if buf.half => match p.precision {
            Precision::F16 => "rf_f16",
            Precision::BF16 => "rf_bf16",
            Precision::F32 => "float",
        },
        _ => "float",
    }
}

fn index(coefs: &[i64], offset: i64, vars: &[String]) -> String {
    let mut s = format!("{offset}LL");
    for (v, &c) in vars.iter().zip(coefs) {
        if c != 0 {
            let _ = write!(s, " + {v} * {c}LL");
        }
    }
    s
}

impl Printer<'_> {
    fn fresh(&mut self, stem: &str) -> String {
        self.next += 1;
        format!("{stem}{}", self.next)
    }

    /// An expression; loops (dots) and re-indexing (reshapes) are
    /// immediately-invoked lambdas, so a select evaluates only its branch.
    fn print(&mut self, e: &Expr, sc: &Scope) -> String {
        let buf = |b: usize| format!("b{b}");
        // A half buffer's element is read as f32 through rf_ld.
        let read = |b: usize, at: String| {
            if c_type(self.program, b).starts_with("rf_") {
                format!("rf_ld({at})")
            } else {
                at
            }
        };
        match e {
            Expr::Load { src, coefs, offset } => read(
                *src,
                format!("{}[{}]", buf(*src), index(coefs, *offset, &sc.vars)),
            ),
            Expr::Gather {
                table,
                rows,
                row_len,
                index: idx,
                index_coefs,
                index_offset,
                row_coefs,
                row_offset,
            } => read(
                *table,
                format!(
                    "{}[rf_row({}[{}], {rows}LL) * {row_len}LL + {}]",
                    buf(*table),
                    buf(*idx),
                    index(index_coefs, *index_offset, &sc.vars),
                    index(row_coefs, *row_offset, &sc.vars)
                ),
            ),
            // Exact bits, whatever the value.
            Expr::Const(c) => format!("__int_as_float({:#010x})", c.to_bits()),
            Expr::Unary(op, x) => {
                let x = self.print(x, sc);
                match op {
                    UnOp::Gelu => format!("rf_gelu({x})"),
                    UnOp::GeluTanh => format!("rf_gelu_tanh({x})"),
                    UnOp::Erf => format!("erff({x})"),
                    UnOp::Sin => format!("sinf({x})"),
                    UnOp::Cos => format!("cosf({x})"),
                    UnOp::Exp => format!("expf({x})"),
                    UnOp::Tanh => format!("tanhf({x})"),
                    UnOp::Sqrt => format!("sqrtf({x})"),
                    UnOp::Neg => format!("(-({x}))"),
                    UnOp::Relu => format!("fmaxf({x}, 0.f)"),
                    UnOp::Sigmoid => format!("(1.f / (1.f + expf(-({x}))))"),
                    UnOp::Reciprocal => format!("(1.f / ({x}))"),
                    UnOp::Not => format!("(({x}) == 0.f ? 1.f : 0.f)"),
                    UnOp::NonZero => format!("(({x}) != 0.f ? 1.f : 0.f)"),
                    UnOp::Trunc => format!("truncf({x})"),
                }
            }
            Expr::Binary(op @ (BinOp::Pow | BinOp::Max | BinOp::Min), a, b) => {
                let f = match op {
                    BinOp::Pow => "powf",
                    BinOp::Max => "fmaxf",
                    _ => "fminf",
                };
                format!("{f}({}, {})", self.print(a, sc), self.print(b, sc))
            }
            Expr::Binary(op, a, b) if op.is_predicate() => {
                let (a, b) = (self.print(a, sc), self.print(b, sc));
                let test = match op {
                    BinOp::Equal => format!("({a}) == ({b})"),
                    BinOp::Less => format!("({a}) < ({b})"),
                    BinOp::LessOrEqual => format!("({a}) <= ({b})"),
                    BinOp::Greater => format!("({a}) > ({b})"),
                    BinOp::GreaterOrEqual => format!("({a}) >= ({b})"),
                    BinOp::And => format!("({a}) != 0.f && ({b}) != 0.f"),
                    _ => format!("({a}) != 0.f || ({b}) != 0.f"),
                };
                format!("(({test}) ? 1.f : 0.f)")
            }
            Expr::Where(c, a, b) => format!(
                "(({}) != 0.f ? ({}) : ({}))",
                self.print(c, sc),
                self.print(a, sc),
                self.print(b, sc)
            ),
            Expr::Binary(op, a, b) => {
                let sym = match op {
                    BinOp::Add => "+",
                    BinOp::Sub => "-",
                    BinOp::Mul => "*",
                    BinOp::Div => "/",
                    _ => unreachable!("printed as calls or predicates above"),
                };
                format!("({} {sym} {})", self.print(a, sc), self.print(b, sc))
            }
            Expr::Select {
                axis,
                starts,
                parts,
            } => {
                // Each part sees its own coordinates (the axis one shifted) and shape.
                let part = |this: &mut Self, j: usize| {
                    let end = starts.get(j + 1).copied().unwrap_or(sc.shape[*axis] as i64);
                    let mut local = Scope {
                        vars: sc.vars.clone(),
                        shape: sc.shape.clone(),
                    };
                    if starts[j] != 0 {
                        local.vars[*axis] = format!("({} - {}LL)", sc.vars[*axis], starts[j]);
                    }
                    local.shape[*axis] = (end - starts[j]) as usize;
                    this.print(&parts[j], &local)
                };
                let mut s = part(self, 0);
                for (j, start) in starts.iter().enumerate().skip(1) {
                    s = format!(
                        "({} >= {start}LL ? {} : {s})",
                        sc.vars[*axis],
                        part(self, j)
                    );
                }
                s
            }
            Expr::Dot { len, a, b } => {
                let p = self.fresh("p");
                let acc = self.fresh("acc");
                let mut inner = Scope {
                    vars: sc.vars.clone(),
                    shape: sc.shape.clone(),
                };
                inner.vars.push(p.clone());
                inner.shape.push(*len as usize);
                let (a, b) = (self.print(a, &inner), self.print(b, &inner));
                if self.warp {
                    // Every lane of the warp is here (the element, hence any select
                    // branch, is the warp's): lanes split the terms, a butterfly sums.
                    format!(
                        "([&]() -> float {{ float {acc} = 0.f; \
                         for (long long {p} = lane; {p} < {len}LL; {p} += 32) {acc} += {a} * {b}; \
                         for (int o = 16; o > 0; o >>= 1) {acc} += __shfl_xor_sync(0xffffffffu, {acc}, o); \
                         return {acc}; }}())"
                    )
                } else {
                    format!(
                        "([&]() -> float {{ float {acc} = 0.f; \
                         for (long long {p} = 0; {p} < {len}LL; ++{p}) {acc} += {a} * {b}; \
                         return {acc}; }}())"
                    )
                }
            }
            Expr::Reshape { from, expr } => {
                let f = self.fresh("f");
                let mut flat = String::from("0LL");
                for (v, d) in sc.vars.iter().zip(&sc.shape) {
                    flat = format!("({flat} * {d}LL + {v})");
                }
                let stem = self.fresh("q");
                let vars: Vec<String> = (0..from.len()).map(|d| format!("{stem}_{d}")).collect();
                let mut body = format!("long long {f} = {flat}; ");
                for d in (0..from.len()).rev() {
                    let _ = write!(
                        body,
                        "const long long {} = {f} % {}LL; {f} /= {}LL; ",
                        vars[d], from[d], from[d]
                    );
                }
                let inner = Scope {
                    vars,
                    shape: from.clone(),
                };
                let x = self.print(expr, &inner);
                format!("([&]() -> float {{ {body}return {x}; }}())")
            }
        }
    }
}

/// The body's index arithmetic in `int`: `long long` → `int`, `123LL` → `123`.
fn narrow_ints(body: &str) -> String {
    let s = body.replace("long long", "int");
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'L' && i + 1 < b.len() && b[i + 1] == b'L' && i > 0 && b[i - 1].is_ascii_digit()
        {
            i += 2;
            continue;
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// Writes the coordinates of flat index `r` over `shape` (`c0`, `c1`, …) and returns the C
/// expression of `expr`'s value there.
fn element(p: &Program, shape: &[usize], expr: &Expr, warp: bool, src: &mut String) -> String {
    for d in (0..shape.len()).rev() {
        if d == 0 {
            let _ = writeln!(src, "    const long long c0 = r;");
        } else {
            let _ = writeln!(
                src,
                "    const long long c{d} = r % {0}LL; r /= {0}LL;",
                shape[d]
            );
        }
    }
    if shape.is_empty() {
        let _ = writeln!(src, "    (void)r;");
    }
    let scope = Scope {
        vars: (0..shape.len()).map(|d| format!("c{d}")).collect(),
        shape: shape.to_vec(),
    };
    Printer {
        next: 0,
        warp,
        program: p,
    }
    .print(expr, &scope)
}

/// A generated kernel's signature up to its last parameter: the output, then every buffer
/// `expr` reads (returned, in order), each in its storage type (also returned for the output).
fn kernel_head(
    p: &Program,
    name: &str,
    out: usize,
    expr: &Expr,
) -> (Vec<usize>, &'static str, String) {
    let mut params = vec![];
    collect_bufs(expr, &mut params);
    let out_ty = c_type(p, out);
    let mut head = format!("extern \"C\" __global__ void {name}({out_ty}* __restrict__ out");
    for &b in &params {
        let _ = write!(head, ", const {}* __restrict__ b{b}", c_type(p, b));
    }
    (params, out_ty, head)
}

/// The kernel of an [`Op::SoftmaxOf`]: a block per row ([`ROW_BLOCK`] threads), each element
/// of the input computed from `expr` where the softmax reads it.
pub fn softmax_kernel(
    p: &Program,
    name: &str,
    out: usize,
    shape: &[usize],
    expr: &Expr,
) -> MapKernel {
    let (params, out_ty, head) = kernel_head(p, name, out, expr);
    let n: usize = shape.iter().product();
    let dim = shape.last().copied().unwrap_or(1);
    let mut src =
        String::from(") {\n    auto ld = [&](long long i) -> float {\n    long long r = i;\n");
    let value = element(p, shape, expr, false, &mut src);
    let _ = writeln!(
        src,
        "    return {value};\n    }};\n    rf_softmax_f<{out_ty}>(ld, out, {dim});\n}}"
    );
    let fits = |x: usize| x < (1usize << 31);
    let narrow = fits(n) && params.iter().all(|&b| fits(p.buffers[b].len));
    let body = if narrow { narrow_ints(&src) } else { src };
    MapKernel {
        name: name.to_string(),
        source: head + &body,
        params,
        grid: (n / dim.max(1)) as u32,
        block: ROW_BLOCK,
    }
}

/// The kernel of one map op, named `{prefix}_{op index}`.
pub fn map_kernel(p: &Program, name: &str, out: usize, shape: &[usize], expr: &Expr) -> MapKernel {
    let (params, out_ty, head) = kernel_head(p, name, out, expr);
    let store = |v: &str| match out_ty {
        "rf_f16" => format!("rf_to_f16({v})"),
        "rf_bf16" => format!("rf_to_bf16({v})"),
        _ => v.to_string(),
    };
    let n: usize = shape.iter().product();
    let mut src = String::new();
    let warp = longest_dot(expr) >= WARP_DOT_LEN;
    if warp {
        let _ = write!(
            src,
            ") {{\n    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;\n    const int lane = threadIdx.x & 31;\n    if (i >= {n}LL) return;\n    long long r = i;\n"
        );
    } else {
        let _ = write!(
            src,
            ") {{\n    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n    if (i >= {n}LL) return;\n    long long r = i;\n"
        );
    }
    let value = element(p, shape, expr, warp, &mut src);
    if warp {
        let _ = writeln!(
            src,
            "    const float v = {value};\n    if (lane == 0) out[i] = {};\n}}",
            store("v")
        );
    } else {
        let _ = writeln!(src, "    out[i] = {};\n}}", store(&format!("({value})")));
    }
    // 64-bit division is emulated on the GPU: index in 32 bits when everything fits.
    let fits = |x: usize| x < (1usize << 31);
    let narrow = fits(n * 32) && params.iter().all(|&b| fits(p.buffers[b].len));
    let body = if narrow { narrow_ints(&src) } else { src };
    MapKernel {
        name: name.to_string(),
        source: head + &body,
        params,
        grid: (n * if warp { 32 } else { 1 }).div_ceil(MAP_BLOCK as usize) as u32,
        block: MAP_BLOCK,
    }
}

/// All map kernels of a program, by op index, and the module's source.
pub fn program_source(p: &Program, prefix: &str) -> (Vec<Option<MapKernel>>, String) {
    let mut src = String::from(FIXED);
    let kernels: Vec<Option<MapKernel>> = p
        .ops
        .iter()
        .enumerate()
        .map(|(i, op)| match op {
            Op::Map { out, shape, expr } => {
                let k = map_kernel(p, &format!("{prefix}_{i}"), *out, shape, expr);
                src.push_str(&k.source);
                Some(k)
            }
            Op::SoftmaxOf { out, shape, expr } => {
                let k = softmax_kernel(p, &format!("{prefix}_{i}"), *out, shape, expr);
                src.push_str(&k.source);
                Some(k)
            }
            _ => None,
        })
        .collect();
    (kernels, src)
}
