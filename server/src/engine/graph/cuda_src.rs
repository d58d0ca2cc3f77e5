//! CUDA C for a program's kernels, compiled at load by NVRTC.
//!
//! Every [`Op::Map`] becomes its own kernel with shapes and offsets as
//! literals (one thread per output element); the reductions and the denoise
//! loop's steps share fixed kernels in [`FIXED`]. Reductions sum in a fixed
//! tree order, so a run gives the same bits every time.

use std::fmt::Write;

use super::{BinOp, DType, Expr, Op, Program, UnOp};

/// Threads per block for maps and the elementwise fixed kernels.
pub const MAP_BLOCK: u32 = 256;
/// Threads per block for row reductions (a power of two).
pub const ROW_BLOCK: u32 = 128;

/// Kernels every program uses; argument order is the launch order in the engine.
pub const FIXED: &str = r#"
extern "C" __global__ void rf_layernorm(const float* __restrict__ x, const float* __restrict__ g,
        const float* __restrict__ b, float* __restrict__ y, int dim, float eps) {
    __shared__ float sh[128];
    const float* row = x + (long long)blockIdx.x * dim;
    float* out = y + (long long)blockIdx.x * dim;
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
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[i] = (row[i] - mean) * inv * g[i] + b[i];
}

extern "C" __global__ void rf_softmax(const float* __restrict__ x, float* __restrict__ y, int dim) {
    __shared__ float sh[128];
    const float* row = x + (long long)blockIdx.x * dim;
    float* out = y + (long long)blockIdx.x * dim;
    float m = -__int_as_float(0x7f800000);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) m = fmaxf(m, row[i]);
    sh[threadIdx.x] = m;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + o]);
        __syncthreads();
    }
    const float mx = sh[0];
    __syncthreads();
    float s = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += expf(row[i] - mx);
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    const float inv = 1.f / sh[0];
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[i] = expf(row[i] - mx) * inv;
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

extern "C" __global__ void rf_fill(float* __restrict__ y, int n, float v) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) y[t] = v;
}

extern "C" __global__ void rf_axpy(float* __restrict__ x, const float* __restrict__ v, int n, float a) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) x[t] += a * v[t];
}

__device__ __forceinline__ long long rf_row(long long r, long long rows) {
    if (r < 0) r += rows;
    return r < 0 ? 0 : (r >= rows ? rows - 1 : r);
}
"#;

/// One map kernel: its name, source and the buffers it takes after `out`.
#[derive(Debug, Clone)]
pub struct MapKernel {
    pub name: String,
    pub source: String,
    pub params: Vec<usize>,
    pub elements: usize,
}

fn collect_bufs(e: &Expr, out: &mut Vec<usize>) {
    let mut add = |b: usize| {
        if !out.contains(&b) {
            out.push(b);
        }
    };
    match e {
        Expr::Load { src, .. } => add(*src),
        Expr::Gather { table, index, .. } => {
            add(*table);
            add(*index);
        }
        Expr::Const(_) => {}
        Expr::Unary(_, x) => collect_bufs(x, out),
        Expr::Binary(_, a, b) => {
            collect_bufs(a, out);
            collect_bufs(b, out);
        }
        Expr::Select { parts, .. } => parts.iter().for_each(|p| collect_bufs(p, out)),
    }
}

fn index(coefs: &[i64], offset: i64) -> String {
    let mut s = format!("{offset}LL");
    for (d, &c) in coefs.iter().enumerate() {
        if c != 0 {
            let _ = write!(s, " + c{d} * {c}LL");
        }
    }
    s
}

fn print(e: &Expr, names: &dyn Fn(usize) -> String) -> String {
    match e {
        Expr::Load { src, coefs, offset } => format!("{}[{}]", names(*src), index(coefs, *offset)),
        Expr::Gather {
            table,
            rows,
            row_len,
            index: idx,
            index_coefs,
            index_offset,
            row_coefs,
            row_offset,
        } => format!(
            "{}[rf_row({}[{}], {rows}LL) * {row_len}LL + {}]",
            names(*table),
            names(*idx),
            index(index_coefs, *index_offset),
            index(row_coefs, *row_offset)
        ),
        // Exact bits, whatever the value.
        Expr::Const(c) => format!("__int_as_float({:#010x})", c.to_bits()),
        Expr::Unary(op, x) => {
            let x = print(x, names);
            match op {
                UnOp::Erf => format!("erff({x})"),
                UnOp::Sin => format!("sinf({x})"),
                UnOp::Cos => format!("cosf({x})"),
                UnOp::Exp => format!("expf({x})"),
                UnOp::Tanh => format!("tanhf({x})"),
                UnOp::Sqrt => format!("sqrtf({x})"),
                UnOp::Neg => format!("(-({x}))"),
                UnOp::Relu => format!("fmaxf({x}, 0.f)"),
                UnOp::Sigmoid => format!("(1.f / (1.f + expf(-({x}))))"),
            }
        }
        Expr::Binary(op, a, b) => {
            let sym = match op {
                BinOp::Add => "+",
                BinOp::Sub => "-",
                BinOp::Mul => "*",
                BinOp::Div => "/",
            };
            format!("({} {sym} {})", print(a, names), print(b, names))
        }
        Expr::Select {
            axis,
            starts,
            parts,
        } => {
            let mut s = print(&parts[0], names);
            for j in 1..parts.len() {
                s = format!(
                    "(c{axis} >= {}LL ? {} : {s})",
                    starts[j],
                    print(&parts[j], names)
                );
            }
            s
        }
    }
}

/// The kernel of one map op, named `{prefix}_{op index}`.
pub fn map_kernel(p: &Program, name: &str, shape: &[usize], expr: &Expr) -> MapKernel {
    let mut params = vec![];
    collect_bufs(expr, &mut params);
    let arg = |b: usize| format!("b{b}");
    let mut src = format!("extern \"C\" __global__ void {name}(float* __restrict__ out");
    for &b in &params {
        let ty = match p.buffers[b].dtype {
            DType::F32 => "float",
            DType::I64 => "long long",
        };
        let _ = write!(src, ", const {ty}* __restrict__ {}", arg(b));
    }
    let n: usize = shape.iter().product();
    let _ = write!(
        src,
        ") {{\n    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n    if (i >= {n}LL) return;\n    long long r = i;\n"
    );
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
    let _ = writeln!(src, "    out[i] = {};\n}}", print(expr, &arg));
    MapKernel {
        name: name.to_string(),
        source: src,
        params,
        elements: n,
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
            Op::Map { shape, expr, .. } => {
                let k = map_kernel(p, &format!("{prefix}_{i}"), shape, expr);
                src.push_str(&k.source);
                Some(k)
            }
            _ => None,
        })
        .collect();
    (kernels, src)
}
