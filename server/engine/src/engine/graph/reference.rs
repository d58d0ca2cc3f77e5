//! Runs a [`Program`] on the CPU with the CUDA kernels' semantics: maps
//! evaluate their expression per output element, gemms go through a
//! column-major sgemm with exactly the arguments handed to cuBLAS. It is
//! slow and exists to test the compiler where no GPU is.

use super::{
    AxisKind, BinOp, Buffer, CublasCall, DType, DeviceLoop, Expr, Op, Precision, Program, UnOp,
    cublas_call,
};

/// A value fed to or read from a whole program on the host, row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum HostValue {
    F32(Vec<f32>),
    /// Int64, and float64 host inputs as their values.
    F64(Vec<f64>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

impl HostValue {
    pub fn len(&self) -> usize {
        match self {
            HostValue::F32(v) => v.len(),
            HostValue::F64(v) => v.len(),
            HostValue::I64(v) => v.len(),
            HostValue::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f64, whatever their kind (the host island's view).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            HostValue::F32(v) => v.iter().map(|&x| x as f64).collect(),
            HostValue::F64(v) => v.clone(),
            HostValue::I64(v) => v.iter().map(|&x| x as f64).collect(),
            HostValue::Bool(v) => v.iter().map(|&x| x as u8 as f64).collect(),
        }
    }

    /// The values as int64, for an int64 buffer (floats truncated).
    pub fn into_i64(self) -> Vec<i64> {
        match self {
            HostValue::I64(v) => v,
            other => other.to_f64().iter().map(|&x| x as i64).collect(),
        }
    }

    /// The values as f32 (bools 0/1, integers rounded to the nearest float).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            HostValue::F32(v) => v.clone(),
            HostValue::F64(v) => v.iter().map(|&x| x as f32).collect(),
            HostValue::I64(v) => v.iter().map(|&x| x as f32).collect(),
            HostValue::Bool(v) => v.iter().map(|&x| x as u8 as f32).collect(),
        }
    }
}

/// `feed` with the program's host island evaluated from it (in double, [`super::host`]): the
/// island's results answer for the program inputs they fill, every other name is asked of
/// `feed`. How both executors stage a whole program's inputs.
pub fn with_host_island<'a>(
    p: &Program,
    feed: &'a dyn Fn(&str) -> Option<HostValue>,
) -> Result<impl Fn(&str) -> Option<HostValue> + 'a, String> {
    let mut island: Vec<(String, Vec<f32>)> = vec![];
    if let Some(h) = &p.host {
        let vals = h
            .inputs
            .iter()
            .map(|i| {
                feed(&i.name)
                    .map(|v| v.to_f64())
                    .ok_or_else(|| format!("no value for input {}", i.name))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&[f64]> = vals.iter().map(Vec::as_slice).collect();
        island = h
            .outputs
            .iter()
            .map(|(name, _)| name.clone())
            .zip(h.eval(&refs)?)
            .collect();
    }
    Ok(move |name: &str| {
        island
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| HostValue::F32(v.clone()))
            .or_else(|| feed(name))
    })
}

/// Stages every program input not `skip`ped from `feed` into `m`.
fn stage_inputs(
    p: &Program,
    m: &mut Memory,
    feed: &dyn Fn(&str) -> Option<HostValue>,
    skip: &dyn Fn(&super::Port) -> bool,
) -> Result<(), String> {
    for port in p.inputs.iter().filter(|q| !skip(q)) {
        let n: usize = port.shape.iter().product();
        let v = feed(&port.name).ok_or_else(|| format!("no value for input {}", port.name))?;
        if v.len() != n {
            return Err(format!(
                "input {} takes {n} values, got {}",
                port.name,
                v.len()
            ));
        }
        match p.buffers[port.buf].dtype {
            DType::I64 => m.i[port.buf] = v.into_i64(),
            _ => m.f[port.buf][..n].copy_from_slice(&v.to_f32()),
        }
    }
    Ok(())
}

/// A per-step expert's whole loop ([`DeviceLoop`]) from `x0`, as the device runs it: the
/// other inputs staged once, the tables in buffers of their own. Returns x after the last step.
pub fn run_loop(
    p: &Program,
    l: &DeviceLoop,
    x0: &[f32],
    feed: &dyn Fn(&str) -> Option<HostValue>,
) -> Result<Vec<f32>, String> {
    let mut q = p.clone();
    q.host = None;
    let mut table_bufs = vec![];
    for (_, vals) in &l.tables {
        q.buffers.push(Buffer {
            len: vals.len(),
            dtype: DType::F32,
            init: Some(vals.clone()),
            half: false,
        });
        table_bufs.push(q.buffers.len() - 1);
    }
    q.buffers.push(Buffer {
        len: 1,
        dtype: DType::F32,
        init: None,
        half: false,
    });
    let t_buf = l.t.as_ref().map_or(q.buffers.len() - 1, |t| t.buf);
    q.ops = l.ops(&p.ops, &table_bufs, t_buf);
    let mut m = Memory::new(&q);
    stage_inputs(&q, &mut m, feed, &|port| l.fills(&port.name))?;
    let n: usize = l.x.shape.iter().product();
    if x0.len() != n {
        return Err(format!("x takes {n} values, got {}", x0.len()));
    }
    m.f[l.x.buf][..n].copy_from_slice(x0);
    run_ops(&q.ops, &mut m);
    Ok(m.f[l.x.buf][..n].to_vec())
}

/// Runs a whole program the way an executor does: the host island from its scalar inputs,
/// its results and the other inputs staged into the program's buffers, then the ops.
/// `feed` gives each of [`Program::feeds`] by name; outputs come back in the program's
/// output order (bool outputs as bools, int64 buffers as int64, the rest as f32).
pub fn run_program(
    p: &Program,
    feed: &dyn Fn(&str) -> Option<HostValue>,
) -> Result<Vec<HostValue>, String> {
    let mut m = Memory::new(p);
    let feed = with_host_island(p, feed)?;
    stage_inputs(p, &mut m, &feed, &|_| false)?;
    run_ops(&p.ops, &mut m);
    Ok(p.outputs
        .iter()
        .map(|o| match (o.dtype, p.buffers[o.buf].dtype) {
            (_, DType::I64) => HostValue::I64(m.i[o.buf].clone()),
            (DType::Bool, _) => HostValue::Bool(m.f[o.buf].iter().map(|&x| x != 0.0).collect()),
            _ => HostValue::F32(m.f[o.buf][..o.shape.iter().product::<usize>()].to_vec()),
        })
        .collect())
}

pub fn unary(op: UnOp, x: f32) -> f32 {
    match op {
        UnOp::Gelu => x * (erf(x / std::f32::consts::SQRT_2) + 1.0) * 0.5,
        UnOp::GeluTanh => {
            let k = (2.0 / std::f32::consts::PI).sqrt();
            0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
        }
        UnOp::Erf => erf(x),
        UnOp::Sin => x.sin(),
        UnOp::Cos => x.cos(),
        UnOp::Exp => x.exp(),
        UnOp::Tanh => x.tanh(),
        UnOp::Sqrt => x.sqrt(),
        UnOp::Neg => -x,
        UnOp::Relu => x.max(0.0),
        UnOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnOp::Reciprocal => 1.0 / x,
        UnOp::Not => (x == 0.0) as u8 as f32,
        UnOp::NonZero => (x != 0.0) as u8 as f32,
        UnOp::Trunc => x.trunc(),
    }
}

pub fn binary(op: BinOp, a: f32, b: f32) -> f32 {
    match op {
        BinOp::Add => a + b,
        BinOp::Sub => a - b,
        BinOp::Mul => a * b,
        BinOp::Div => a / b,
        BinOp::Pow => a.powf(b),
        BinOp::Max => a.max(b),
        BinOp::Min => a.min(b),
        BinOp::Equal => (a == b) as u8 as f32,
        BinOp::Less => (a < b) as u8 as f32,
        BinOp::LessOrEqual => (a <= b) as u8 as f32,
        BinOp::Greater => (a > b) as u8 as f32,
        BinOp::GreaterOrEqual => (a >= b) as u8 as f32,
        BinOp::And => (a != 0.0 && b != 0.0) as u8 as f32,
        BinOp::Or => (a != 0.0 || b != 0.0) as u8 as f32,
    }
}

/// erf as musl computes it (CUDA's erff agrees to a couple of ulp).
fn erf(x: f32) -> f32 {
    libm::erff(x)
}

/// Program memory: one vector per buffer (i64 buffers hold their values as i64).
pub struct Memory {
    pub f: Vec<Vec<f32>>,
    pub i: Vec<Vec<i64>>,
    /// Per buffer: the half precision it is stored in (values rounded on every store, as
    /// the device's conversions do), if any.
    pub half: Vec<Option<Precision>>,
}

impl Memory {
    pub fn new(p: &Program) -> Memory {
        let mut f = vec![];
        let mut i = vec![];
        let mut half = vec![];
        for b in &p.buffers {
            let h = (b.half && p.precision != Precision::F32).then_some(p.precision);
            match b.dtype {
                DType::F32 | DType::Bool => {
                    let mut v = b.init.clone().unwrap_or_else(|| vec![0.0; b.len]);
                    if let Some(h) = h {
                        v.iter_mut().for_each(|x| *x = h.round(*x));
                    }
                    f.push(v);
                    i.push(vec![]);
                }
                DType::I64 => {
                    f.push(vec![]);
                    i.push(vec![0; b.len]);
                }
            }
            half.push(h);
        }
        Memory { f, i, half }
    }
}

/// One element of `e` at `coords` of `shape` (the shape matters to reshapes).
fn eval(e: &Expr, coords: &[i64], shape: &[usize], m: &Memory) -> f32 {
    let dot = |coefs: &[i64], offset: i64| -> usize {
        (offset + coefs.iter().zip(coords).map(|(c, x)| c * x).sum::<i64>()) as usize
    };
    match e {
        // An int64 buffer (a graph input) read into a float expression, as CUDA converts.
        Expr::Load { src, coefs, offset } if m.f[*src].is_empty() => {
            m.i[*src][dot(coefs, *offset)] as f32
        }
        Expr::Load { src, coefs, offset } => m.f[*src][dot(coefs, *offset)],
        Expr::Gather {
            table,
            rows,
            row_len,
            index,
            index_coefs,
            index_offset,
            row_coefs,
            row_offset,
        } => {
            let mut r = m.i[*index][dot(index_coefs, *index_offset)];
            if r < 0 {
                r += rows;
            }
            let r = r.clamp(0, rows - 1);
            m.f[*table][(r * row_len) as usize + dot(row_coefs, *row_offset)]
        }
        Expr::Const(c) => *c,
        Expr::Unary(op, x) => unary(*op, eval(x, coords, shape, m)),
        Expr::Binary(op, a, b) => binary(*op, eval(a, coords, shape, m), eval(b, coords, shape, m)),
        Expr::Where(c, a, b) => {
            if eval(c, coords, shape, m) != 0.0 {
                eval(a, coords, shape, m)
            } else {
                eval(b, coords, shape, m)
            }
        }
        Expr::Select {
            axis,
            starts,
            parts,
        } => {
            let c = coords[*axis];
            let j = starts.iter().rposition(|&s| c >= s).unwrap_or(0);
            let end = starts.get(j + 1).copied().unwrap_or(shape[*axis] as i64);
            let mut local = coords.to_vec();
            local[*axis] -= starts[j];
            let mut part_shape = shape.to_vec();
            part_shape[*axis] = (end - starts[j]) as usize;
            eval(&parts[j], &local, &part_shape, m)
        }
        Expr::Dot { len, a, b } => {
            let mut c = coords.to_vec();
            c.push(0);
            let mut sh = shape.to_vec();
            sh.push(*len as usize);
            let mut acc = 0.0f32;
            for p in 0..*len {
                *c.last_mut().unwrap() = p;
                acc += eval(a, &c, &sh, m) * eval(b, &c, &sh, m);
            }
            acc
        }
        Expr::Reshape { from, expr } => {
            let mut flat = 0i64;
            for (c, d) in coords.iter().zip(shape) {
                flat = flat * *d as i64 + c;
            }
            let mut inner = vec![0i64; from.len()];
            for d in (0..from.len()).rev() {
                inner[d] = flat % from[d] as i64;
                flat /= from[d] as i64;
            }
            eval(expr, &inner, from, m)
        }
    }
}

/// Column-major `C = alpha·op(first)·op(second)` per batch, as cuBLAS does.
fn sgemm(call: &CublasCall, alpha: f32, m: &mut Memory) {
    let (mm, nn, kk) = (call.m as usize, call.n as usize, call.k as usize);
    for b in 0..call.batch as usize {
        let fa = b * call.stride_first as usize;
        let fb = b * call.stride_second as usize;
        let fc = b * call.stride_c as usize;
        let mut out = vec![0.0f32; mm * nn];
        for j in 0..nn {
            for i in 0..mm {
                let mut acc = 0.0f32;
                for p in 0..kk {
                    let x = if call.trans_first {
                        m.f[call.first][fa + p + i * call.ld_first as usize]
                    } else {
                        m.f[call.first][fa + i + p * call.ld_first as usize]
                    };
                    let y = if call.trans_second {
                        m.f[call.second][fb + j + p * call.ld_second as usize]
                    } else {
                        m.f[call.second][fb + p + j * call.ld_second as usize]
                    };
                    acc += x * y;
                }
                out[i + j * mm] = alpha * acc;
            }
        }
        for j in 0..nn {
            for i in 0..mm {
                m.f[call.c][fc + i + j * call.ldc as usize] = out[i + j * mm];
            }
        }
    }
}

pub fn run_ops(ops: &[Op], m: &mut Memory) {
    for op in ops {
        run_op(op, m);
        // A half buffer holds what the device stores: the result rounded.
        if let Some(out) = op.output()
            && let Some(h) = m.half[out]
        {
            m.f[out].iter_mut().for_each(|x| *x = h.round(*x));
        }
    }
}

/// Every element of `e` over `shape`, in row-major order.
fn eval_all(e: &Expr, shape: &[usize], m: &Memory) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let mut coords = vec![0i64; shape.len()];
    let mut vals = Vec::with_capacity(n);
    for idx in 0..n {
        let mut r = idx;
        for d in (0..shape.len()).rev() {
            coords[d] = (r % shape[d]) as i64;
            r /= shape[d];
        }
        vals.push(eval(e, &coords, shape, m));
    }
    vals
}

/// Softmax of each `dim`-long row of `x` into `out`.
fn softmax_rows(x: &[f32], out: &mut [f32], dim: usize) {
    for (row, o) in x.chunks(dim).zip(out.chunks_mut(dim)) {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
        let s: f32 = e.iter().sum();
        for (o, v) in o.iter_mut().zip(&e) {
            *o = v / s;
        }
    }
}

fn run_op(op: &Op, m: &mut Memory) {
    match op {
        Op::Map { out, shape, expr } => {
            let vals = eval_all(expr, shape, m);
            m.f[*out][..vals.len()].copy_from_slice(&vals);
        }
        Op::Gemm(g) => sgemm(&cublas_call(g), g.alpha, m),
        Op::LayerNorm {
            x,
            gamma,
            beta,
            out,
            rows,
            dim,
            eps,
        } => {
            for r in 0..*rows {
                let row = &m.f[*x][r * dim..(r + 1) * dim];
                let mean = row.iter().sum::<f32>() / *dim as f32;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / *dim as f32;
                let inv = 1.0 / (var + eps).sqrt();
                let vals: Vec<f32> = (0..*dim)
                    .map(|i| (row[i] - mean) * inv * m.f[*gamma][i] + m.f[*beta][i])
                    .collect();
                m.f[*out][r * dim..(r + 1) * dim].copy_from_slice(&vals);
            }
        }
        Op::Softmax { x, out, rows, dim } => {
            let x = m.f[*x][..rows * dim].to_vec();
            softmax_rows(&x, &mut m.f[*out], *dim);
        }
        Op::SoftmaxOf { out, shape, expr } => {
            let x = eval_all(expr, shape, m);
            softmax_rows(&x, &mut m.f[*out], *shape.last().unwrap_or(&1));
        }
        Op::Axis {
            kind,
            x,
            out,
            outer,
            len,
            inner,
        } => {
            for o in 0..*outer {
                for i in 0..*inner {
                    let mut s = 0.0f32;
                    for l in 0..*len {
                        let v = m.f[*x][(o * len + l) * inner + i];
                        s += if *kind == AxisKind::MeanSquare {
                            v * v
                        } else {
                            v
                        };
                        if *kind == AxisKind::CumSum {
                            m.f[*out][(o * len + l) * inner + i] = s;
                        }
                    }
                    match kind {
                        AxisKind::Sum => m.f[*out][o * inner + i] = s,
                        AxisKind::Mean | AxisKind::MeanSquare => {
                            m.f[*out][o * inner + i] = s / *len as f32
                        }
                        AxisKind::CumSum => {}
                    }
                }
            }
        }
        Op::Fill { out, len, value } => m.f[*out][..*len].fill(*value),
        Op::Step {
            x,
            v,
            len,
            dt,
            t,
            t_next,
        } => {
            for i in 0..*len {
                let d = dt * m.f[*v][i];
                m.f[*x][i] += d;
            }
            m.f[*t][0] = *t_next;
        }
    }
}
