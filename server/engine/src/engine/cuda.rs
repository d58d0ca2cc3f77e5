//! The `cuda` engine: the export's graphs compiled by [`super::graph`] and
//! run on an NVIDIA GPU through cudarc — cuBLAS for the products, NVRTC-built
//! kernels for the rest, weights uploaded once, and the prefix and the whole
//! denoise loop (host copies included) each captured as one CUDA graph that a
//! call replays.
//!
//! Nothing CUDA is linked: cudarc loads libcuda, libnvrtc and libcublas at
//! run time (CUDA 13 names), so this builds and starts anywhere; where a
//! library or the GPU is missing, [`CudaEngine::load`] says which.
//!
//! One stream per engine, serialised by a mutex: graphs are not thread-safe,
//! and one small policy keeps a GPU busy from one stream anyway.

use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{
    self, CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PinnedHostSlice, PushKernelArg, sys,
};
use cudarc::nvrtc;

use super::graph::cuda_src::{self, MAP_BLOCK, ROW_BLOCK};
use super::graph::{self, CublasCall, DType, Op, Port, Program};
use super::{Engine, EngineError, Frames, PixelNorm};

/// The cuBLAS workspace (set before capture, as graphs require).
const CUBLAS_WORKSPACE: usize = 32 << 20;

fn unavailable(reason: impl Into<String>) -> EngineError {
    EngineError::Unavailable {
        engine: "cuda",
        reason: reason.into(),
    }
}

fn run_err(graph: &'static str) -> impl Fn(String) -> EngineError {
    move |message| EngineError::Run { graph, message }
}

/// Checks for the three libraries before any call that would load them
/// (cudarc panics on a missing library; we want a sentence).
pub fn check_libraries() -> Result<(), EngineError> {
    // SAFETY: these only try dlopen on the candidate names.
    let (drv, rtc, blas) = unsafe {
        (
            driver::sys::is_culib_present(),
            nvrtc::sys::is_culib_present(),
            cublas::sys::is_culib_present(),
        )
    };
    if !drv {
        return Err(unavailable(
            "the NVIDIA driver library libcuda.so.1 was not found — is an NVIDIA GPU and its \
             driver installed on this machine?",
        ));
    }
    let mut missing = vec![];
    if !rtc {
        missing.push("libnvrtc.so.13 (CUDA 13 NVRTC)");
    }
    if !blas {
        missing.push("libcublas.so.13 (CUDA 13 cuBLAS)");
    }
    if !missing.is_empty() {
        return Err(unavailable(format!(
            "{} not found; install the CUDA 13 runtime libraries (e.g. the cuda-libraries-13-0 \
             package) or add their directory to LD_LIBRARY_PATH \
             (/usr/local/cuda-13.0/targets/x86_64-linux/lib)",
            missing.join(" and ")
        )));
    }
    Ok(())
}

#[derive(Clone)]
enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
}

#[derive(Clone)]
enum Step {
    Kernel {
        func: CudaFunction,
        grid: u32,
        block: u32,
        args: Vec<Arg>,
    },
    Gemm {
        call: CublasCall,
        alpha: f32,
        first: u64,
        second: u64,
        c: u64,
        /// Half operands (`GemmEx`, f32 accumulation): their type and the result's; `None`
        /// for f32 (`sgemm`).
        half: Option<(cublas::sys::cudaDataType, cublas::sys::cudaDataType)>,
    },
    /// Pinned host → device.
    CopyIn { dst: u64, src: usize, bytes: usize },
    /// Device → pinned host.
    CopyOut { dst: usize, src: u64, bytes: usize },
    /// Device → device (a loop's per-step table row into a program input).
    CopyDtoD { dst: u64, src: u64, bytes: usize },
}

enum Alloc {
    F32(#[allow(dead_code)] CudaSlice<f32>),
    I64(#[allow(dead_code)] CudaSlice<i64>),
    /// f16 or bf16 bits.
    Half(#[allow(dead_code)] CudaSlice<u16>),
}

/// A program on the device: its buffers and, per op, the launch.
struct Loaded {
    program: Program,
    _allocs: Vec<Alloc>,
    ptrs: Vec<u64>,
    steps: Vec<Step>,
    fill: CudaFunction,
    step: CudaFunction,
    frames: CudaFunction,
}

/// Page-locked host memory for the inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staging {
    /// Ordinary cached pinned memory (the default): the host's copy in runs at
    /// memcpy speed.
    Cached,
    /// Write-combined: cheaper for the device to read over PCIe, slower for
    /// the host to fill.
    WriteCombined,
}

/// Page-locked staging for one port.
struct Stage {
    _mem: PinnedHostSlice<u8>,
    ptr: usize,
    bytes: usize,
}

impl Stage {
    /// `bytes` of page-locked host memory (`flags`: `cuMemHostAlloc`'s, e.g. write-combined).
    fn new(ctx: &Arc<CudaContext>, bytes: usize, flags: u32) -> Result<Stage, String> {
        // SAFETY: bytes of u8, written by the host before any read.
        let mut mem = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, flags) }.map_err(drv)?;
        let ptr = mem.as_mut_ptr().map_err(drv)? as usize;
        Ok(Stage {
            _mem: mem,
            ptr,
            bytes,
        })
    }
}

struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
    prefix: Loaded,
    expert: Loaded,
    den: graph::DenoisePorts,
    staging: HashMap<&'static str, Stage>,
    use_graphs: bool,
    prefix_graph: Option<CudaGraph>,
    /// The frames path: raw bytes and presence flags on the device, and its
    /// graph (captured for one normalisation, the export's).
    frames_dev: CudaSlice<u8>,
    present_dev: CudaSlice<i32>,
    frames_graph: Option<(PixelNorm, CudaGraph)>,
    denoise_graphs: HashMap<u32, CudaGraph>,
}

// SAFETY: every CUDA object is used only under the engine's mutex, with the
// context bound to the calling thread first.
unsafe impl Send for Inner {}

pub struct CudaEngine {
    inner: Mutex<Inner>,
    hardware: BTreeMap<String, String>,
}

fn drv(e: driver::DriverError) -> String {
    format!("{e:?}")
}

impl CudaEngine {
    /// Compiles both graphs, builds the kernels, uploads the weights and
    /// captures the prefix graph. `use_graphs: false` launches op by op
    /// (for comparison; the results are the same).
    pub fn load(prefix: &Path, expert: &Path, use_graphs: bool) -> Result<Self, EngineError> {
        Self::load_with(prefix, expert, use_graphs, Staging::Cached)
    }

    /// [`CudaEngine::load`] with a choice of input staging memory (the bench compares them).
    pub fn load_with(
        prefix: &Path,
        expert: &Path,
        use_graphs: bool,
        staging: Staging,
    ) -> Result<Self, EngineError> {
        check_libraries()?;
        let prefix_p = graph::compile_file(prefix)?;
        let expert_p = graph::compile_file(expert)?;
        // cudarc panics where a symbol is missing (a driver older than CUDA 13):
        // keep that a start-up error too.
        catch_load("", || {
            Self::load_device(prefix_p, expert_p, use_graphs, staging)
        })
    }

    fn load_device(
        prefix_p: Program,
        expert_p: Program,
        use_graphs: bool,
        staging_kind: Staging,
    ) -> Result<Self, EngineError> {
        let Device {
            ctx,
            stream,
            blas,
            workspace,
            arch,
            hardware,
        } = open_device()?;

        let err = |g: &'static str| run_err(g);
        let prefix = load_program(&ctx, &stream, prefix_p, "p", arch).map_err(err("prefix"))?;
        let expert = load_program(&ctx, &stream, expert_p, "e", arch).map_err(err("expert"))?;
        let den = graph::denoise_ports(&expert.program).map_err(err("expert"))?;

        let mut staging = HashMap::new();
        let mut stage = |key: &'static str, bytes: usize| -> Result<(), EngineError> {
            let flags = match staging_kind {
                Staging::WriteCombined if !key.ends_with("_out") => {
                    sys::CU_MEMHOSTALLOC_WRITECOMBINED
                }
                _ => 0,
            };
            staging.insert(key, Stage::new(&ctx, bytes, flags).map_err(unavailable)?);
            Ok(())
        };
        let pin = |p: &Program, name: &str| -> Result<usize, EngineError> {
            p.input(name)
                .map(|port| p.port_bytes(port))
                .ok_or_else(|| EngineError::Load {
                    graph: p.name.clone(),
                    message: format!("no input named {name:?}"),
                })
        };
        stage("pixels", pin(&prefix.program, "pixels")?)?;
        stage("tokens", pin(&prefix.program, "tokens")?)?;
        stage(
            "prefix_out",
            prefix.program.port_bytes(&prefix.program.outputs[0]),
        )?;
        let pixel_port = prefix.program.input("pixels").cloned();
        let (cams, frame_bytes) = match &pixel_port {
            Some(p) if p.shape.len() == 4 => (p.shape[0], p.shape.iter().product::<usize>()),
            _ => (1, 3),
        };
        stage("frames", frame_bytes)?;
        stage("present", cams * 4)?;
        stage("x", expert.program.port_bytes(&den.x))?;
        stage("t", 4)?;
        stage("prefix", pin(&expert.program, "prefix")?)?;
        stage("state", pin(&expert.program, "state")?)?;
        stage("x_out", expert.program.port_bytes(&den.x))?;

        let frames_dev = stream
            .alloc_zeros::<u8>(frame_bytes)
            .map_err(|e| unavailable(drv(e)))?;
        let present_dev = stream
            .alloc_zeros::<i32>(cams)
            .map_err(|e| unavailable(drv(e)))?;
        let mut inner = Inner {
            frames_dev,
            present_dev,
            frames_graph: None,
            ctx,
            stream,
            blas,
            _workspace: workspace,
            prefix,
            expert,
            den,
            staging,
            use_graphs,
            prefix_graph: None,
            denoise_graphs: HashMap::new(),
        };
        if use_graphs {
            let steps = inner.prefix_steps().map_err(err("prefix"))?;
            inner.prefix_graph = Some(inner.capture(&steps).map_err(err("prefix"))?);
        }
        Ok(CudaEngine {
            inner: Mutex::new(inner),
            hardware,
        })
    }
}

/// Runs a device load, turning a cudarc panic (a symbol missing from an older driver) into
/// a start-up error; `what` follows "failed to load" in the message.
fn catch_load<T>(
    what: &str,
    load: impl FnOnce() -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(unavailable(format!(
            "the CUDA libraries failed to load{what}: {msg}"
        )))
    })
}

/// The GPU: its context, one stream, and cuBLAS on that stream with its workspace set (as
/// graph capture requires).
struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    workspace: CudaSlice<u8>,
    arch: &'static str,
    hardware: BTreeMap<String, String>,
}

fn open_device() -> Result<Device, EngineError> {
    driver::result::init().map_err(|e| unavailable(format!("cuInit failed: {}", drv(e))))?;
    let count = CudaContext::device_count().map_err(|e| unavailable(drv(e)))?;
    if count < 1 {
        return Err(unavailable("the driver found no CUDA device"));
    }
    let ctx = CudaContext::new(0).map_err(|e| unavailable(drv(e)))?;
    // One stream, and graphs capture raw pointers: cudarc's per-buffer
    // events would only add work (and break capture).
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().map_err(|e| unavailable(drv(e)))?;
    let blas = CudaBlas::new(stream.clone()).map_err(|e| unavailable(format!("{e:?}")))?;
    let workspace = stream
        .alloc_zeros::<u8>(CUBLAS_WORKSPACE)
        .map_err(|e| unavailable(drv(e)))?;
    let (ws_ptr, _sync) = workspace.device_ptr(&stream);
    unsafe {
        cublas::sys::cublasSetWorkspace_v2(*blas.handle(), ws_ptr as *mut c_void, CUBLAS_WORKSPACE)
            .result()
            .map_err(|e| unavailable(format!("cublasSetWorkspace: {e:?}")))?;
    }
    drop(_sync);

    let (major, minor) = ctx.compute_capability().map_err(|e| unavailable(drv(e)))?;
    let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
    let hardware = hardware(&ctx, &blas, arch);
    Ok(Device {
        ctx,
        stream,
        blas,
        workspace,
        arch,
        hardware,
    })
}

/// Enqueues the steps on the stream (or into a capture).
fn exec(stream: &Arc<CudaStream>, blas: &CudaBlas, steps: &[Step]) -> Result<(), String> {
    let cu_stream = stream.cu_stream();
    for s in steps {
        match s {
            Step::Kernel {
                func,
                grid,
                block,
                args,
            } => {
                let mut b = stream.launch_builder(func);
                for a in args {
                    match a {
                        Arg::Ptr(p) => b.arg(p),
                        Arg::I32(v) => b.arg(v),
                        Arg::F32(v) => b.arg(v),
                    };
                }
                let cfg = LaunchConfig {
                    grid_dim: (*grid, 1, 1),
                    block_dim: (*block, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: arguments match the kernel's parameters by construction
                // (cuda_src prints both from the same op).
                unsafe { b.launch(cfg) }.map_err(drv)?;
            }
            Step::Gemm {
                call,
                alpha,
                first,
                second,
                c,
                half,
            } => {
                use cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
                let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
                let beta = 0.0f32;
                if let Some((ab, c_type)) = half {
                    // SAFETY: as below; the types are the buffers' storage, set by the compiler.
                    unsafe {
                        cublas::result::gemm_strided_batched_ex(
                            *blas.handle(),
                            op(call.trans_first),
                            op(call.trans_second),
                            call.m,
                            call.n,
                            call.k,
                            alpha as *const f32 as *const c_void,
                            *first as *const c_void,
                            *ab,
                            call.ld_first,
                            call.stride_first,
                            *second as *const c_void,
                            *ab,
                            call.ld_second,
                            call.stride_second,
                            &beta as *const f32 as *const c_void,
                            *c as *mut c_void,
                            *c_type,
                            call.ldc,
                            call.stride_c,
                            call.batch,
                            cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                            cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                        )
                    }
                    .map_err(|e| format!("cuBLAS GemmEx: {e:?}"))?;
                    continue;
                }
                // SAFETY: pointers are this engine's live buffers, sized by the compiler.
                unsafe {
                    cublas::result::sgemm_strided_batched(
                        *blas.handle(),
                        op(call.trans_first),
                        op(call.trans_second),
                        call.m,
                        call.n,
                        call.k,
                        alpha,
                        *first as *const f32,
                        call.ld_first,
                        call.stride_first,
                        *second as *const f32,
                        call.ld_second,
                        call.stride_second,
                        &beta,
                        *c as *mut f32,
                        call.ldc,
                        call.stride_c,
                        call.batch,
                    )
                }
                .map_err(|e| format!("cuBLAS sgemm: {e:?}"))?;
            }
            // SAFETY: staging memory is pinned, owned by this engine, and not
            // touched by the host while work is in flight (calls sync under the mutex).
            Step::CopyIn { dst, src, bytes } => unsafe {
                let host = std::slice::from_raw_parts(*src as *const u8, *bytes);
                driver::result::memcpy_htod_async(*dst, host, cu_stream).map_err(drv)?;
            },
            Step::CopyOut { dst, src, bytes } => unsafe {
                let host = std::slice::from_raw_parts_mut(*dst as *mut u8, *bytes);
                driver::result::memcpy_dtoh_async(host, *src, cu_stream).map_err(drv)?;
            },
            // SAFETY: both are this engine's live device buffers, `bytes` long.
            Step::CopyDtoD { dst, src, bytes } => unsafe {
                driver::result::memcpy_dtod_async(*dst, *src, *bytes, cu_stream).map_err(drv)?;
            },
        }
    }
    Ok(())
}

/// Captures the steps as one CUDA graph, uploaded and ready to launch.
fn capture(stream: &Arc<CudaStream>, blas: &CudaBlas, steps: &[Step]) -> Result<CudaGraph, String> {
    use sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    stream
        .begin_capture(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(drv)?;
    let enqueued = exec(stream, blas, steps);
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    enqueued?;
    let graph = graph.map_err(drv)?.ok_or("the capture recorded nothing")?;
    graph.upload().map_err(drv)?;
    Ok(graph)
}

fn hardware(ctx: &Arc<CudaContext>, blas: &CudaBlas, arch: &str) -> BTreeMap<String, String> {
    let mut m = super::cpu_hardware();
    m.insert(
        "engine".into(),
        "reflex-cuda (cuBLAS + NVRTC, CUDA graphs)".into(),
    );
    if let Ok(name) = ctx.name() {
        m.insert("gpu".into(), name);
    }
    m.insert("gpu_arch".into(), arch.to_string());
    if let Ok(mem) = ctx.total_mem() {
        m.insert("gpu_memory_mb".into(), (mem >> 20).to_string());
    }
    let mut v = 0i32;
    if unsafe { driver::sys::cuDriverGetVersion(&mut v) } == driver::sys::CUresult::CUDA_SUCCESS {
        m.insert(
            "cuda_driver_api".into(),
            format!("{}.{}", v / 1000, (v % 1000) / 10),
        );
    }
    if let Some(version) = std::fs::read_to_string("/proc/driver/nvidia/version")
        .ok()
        .and_then(|s| nvidia_driver_version(&s))
    {
        m.insert("nvidia_driver".into(), version);
    }
    let (mut major, mut minor) = (0i32, 0i32);
    if unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        == nvrtc::sys::nvrtcResult::NVRTC_SUCCESS
    {
        m.insert("nvrtc".into(), format!("{major}.{minor}"));
    }
    let mut bv = 0i32;
    if unsafe { cublas::sys::cublasGetVersion_v2(*blas.handle(), &mut bv) }
        == cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
    {
        m.insert(
            "cublas".into(),
            format!("{}.{}.{}", bv / 10000, (bv % 10000) / 100, bv % 100),
        );
    }
    m
}

/// "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05  Thu ..." → "580.95.05".
pub fn nvidia_driver_version(proc_text: &str) -> Option<String> {
    let line = proc_text.lines().find(|l| l.starts_with("NVRM version"))?;
    line.split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
        .map(str::to_string)
}

/// The program's kernels as PTX for `arch`, from the kernel cache when it has them.
fn compile(program: &Program, tag: &str, arch: &'static str) -> Result<nvrtc::Ptx, String> {
    let (_, src) = cuda_src::program_source(program, tag);
    let t0 = std::time::Instant::now();
    let dir = kernel_cache_dir();
    let (ptx, hit) = compile_cached(&src, arch, dir.as_deref())?;
    tracing::info!(
        program = %program.name,
        ms = t0.elapsed().as_millis() as u64,
        cache = %dir.as_ref().map_or("off".to_string(), |d| d.display().to_string()),
        "kernels {}",
        if hit { "read from the kernel cache" } else { "compiled by NVRTC" }
    );
    Ok(ptx)
}

/// NVRTC's options for every program: IEEE division and square root, no flush-to-zero (close
/// to the CPU).
fn nvrtc_options(arch: &'static str) -> nvrtc::CompileOptions {
    nvrtc::CompileOptions {
        arch: Some(arch),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        ..Default::default()
    }
}

/// Where compiled kernels are kept between starts, so a restart skips NVRTC:
/// `REFLEX_KERNEL_CACHE` (a folder, or `off`), else `$XDG_CACHE_HOME/reflex/kernels`, else
/// `$HOME/.cache/reflex/kernels`. The systemd units set it under `CacheDirectory=`.
pub fn kernel_cache_dir() -> Option<PathBuf> {
    match std::env::var_os("REFLEX_KERNEL_CACHE") {
        Some(v) if v == "off" || v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("reflex").join("kernels")),
    }
}

/// Whether `path` is ours and only ours to write (owned by this process's user, not group or
/// world writable): a cached kernel runs on the GPU, so a file anyone could have written is
/// not read.
fn private_to_us(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Ok(m)) = (
        std::fs::metadata("/proc/self"),
        std::fs::symlink_metadata(path),
    ) else {
        return false;
    };
    m.uid() == me.uid() && m.mode() & 0o022 == 0 && !m.file_type().is_symlink()
}

/// PTX for `src` on `arch`: the copy in `dir` when it holds one for this source, arch, NVRTC
/// version and options (SHA-256 of all four names the file), else NVRTC's, then stored there
/// (0600 in a 0700 folder, written whole and renamed into place). A cache that cannot be
/// written is logged, not an error. The bool: whether it came from the cache.
pub fn compile_cached(
    src: &str,
    arch: &'static str,
    dir: Option<&Path>,
) -> Result<(nvrtc::Ptx, bool), String> {
    use sha2::{Digest, Sha256};
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters; NVRTC is loaded (check_libraries, or the caller's test).
    unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    let opts = nvrtc_options(arch);
    let key = {
        let mut h = Sha256::new();
        h.update(format!(
            "reflex-kernels v1\n{arch}\nnvrtc {major}.{minor}\n{opts:?}\n"
        ));
        h.update(src.as_bytes());
        crate::config::hex(&h.finalize())
    };
    let file = dir.map(|d| d.join(format!("{key}.ptx")));
    if let (Some(d), Some(f)) = (dir, &file)
        && private_to_us(d)
        && private_to_us(f)
        && let Ok(text) = std::fs::read_to_string(f)
        && text.contains(".entry")
    {
        return Ok((nvrtc::Ptx::from_src(text), true));
    }
    let ptx = nvrtc::compile_ptx_with_opts(src, opts)
        .map_err(|e| format!("NVRTC could not compile the kernels: {e:?}"))?;
    if let (Some(d), Some(f)) = (dir, &file) {
        let store = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)?;
            if !private_to_us(d) {
                return Err(std::io::Error::other(
                    "the folder is not ours alone (owner, or group/world writable)",
                ));
            }
            let tmp = d.join(format!("{key}.ptx.{}.tmp", std::process::id()));
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            out.write_all(ptx.to_src().as_bytes())?;
            out.sync_all()?;
            std::fs::rename(&tmp, f)
        };
        if let Err(e) = store() {
            tracing::warn!(cache = %d.display(), "kernel cache not written: {e}");
        }
    }
    Ok((ptx, false))
}

fn load_program(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    program: Program,
    tag: &str,
    arch: &'static str,
) -> Result<Loaded, String> {
    let (kernels, _) = cuda_src::program_source(&program, tag);
    let module = ctx
        .load_module(compile(&program, tag, arch)?)
        .map_err(drv)?;
    let f = |name: &str| module.load_function(name).map_err(drv);

    let mut allocs = vec![];
    let mut ptrs = vec![];
    for b in &program.buffers {
        match b.dtype {
            DType::F32 if b.half => {
                let s = match &b.init {
                    Some(v) => {
                        let bits: Vec<u16> = v.iter().map(|&x| program.precision.bits(x)).collect();
                        stream.clone_htod(&bits).map_err(drv)?
                    }
                    None => stream.alloc_zeros::<u16>(b.len).map_err(drv)?,
                };
                ptrs.push(s.device_ptr(stream).0);
                allocs.push(Alloc::Half(s));
            }
            DType::F32 | DType::Bool => {
                let s = match &b.init {
                    Some(v) => stream.clone_htod(v).map_err(drv)?,
                    None => stream.alloc_zeros::<f32>(b.len).map_err(drv)?,
                };
                ptrs.push(s.device_ptr(stream).0);
                allocs.push(Alloc::F32(s));
            }
            DType::I64 => {
                let s = stream.alloc_zeros::<i64>(b.len).map_err(drv)?;
                ptrs.push(s.device_ptr(stream).0);
                allocs.push(Alloc::I64(s));
            }
        }
    }
    stream.synchronize().map_err(drv)?;

    // The row kernels, one instantiation per output storage (f32, f16, bf16), loaded once.
    let row = |name: &str| -> Result<[CudaFunction; 3], String> {
        Ok([
            f(name)?,
            f(&format!("{name}_f16"))?,
            f(&format!("{name}_bf16"))?,
        ])
    };
    let (layernorm, softmax) = (row("rf_layernorm")?, row("rf_softmax")?);
    let storage = |out: usize| match (program.buffers[out].half, program.precision) {
        (true, graph::Precision::F16) => 1,
        (true, graph::Precision::BF16) => 2,
        _ => 0,
    };
    let blocks = |n: usize| n.div_ceil(MAP_BLOCK as usize) as u32;
    let along_axis =
        |func, x: usize, out: usize, outer: usize, len: usize, inner: usize| Step::Kernel {
            func,
            grid: blocks(outer * inner),
            block: MAP_BLOCK,
            args: vec![
                Arg::Ptr(ptrs[x]),
                Arg::Ptr(ptrs[out]),
                Arg::I32(outer as i32),
                Arg::I32(len as i32),
                Arg::I32(inner as i32),
            ],
        };
    let mut steps = vec![];
    for (i, op) in program.ops.iter().enumerate() {
        let p = |b: usize| Arg::Ptr(ptrs[b]);
        steps.push(match op {
            // Generated kernels: the output, then the buffers the expression reads.
            Op::Map { out, .. } | Op::SoftmaxOf { out, .. } => {
                let k = kernels[i]
                    .as_ref()
                    .expect("a kernel for every generated op");
                let mut args = vec![p(*out)];
                args.extend(k.params.iter().map(|&b| p(b)));
                Step::Kernel {
                    func: f(&k.name)?,
                    grid: k.grid,
                    block: k.block,
                    args,
                }
            }
            Op::Gemm(g) => {
                use cublas::sys::cudaDataType::{CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F};
                let call = graph::cublas_call(g);
                let bufs = &program.buffers;
                let half_type = match program.precision {
                    graph::Precision::BF16 => CUDA_R_16BF,
                    _ => CUDA_R_16F,
                };
                let half = match (bufs[g.a].half, bufs[g.b].half) {
                    (true, true) => Some((
                        half_type,
                        if bufs[g.c].half {
                            half_type
                        } else {
                            CUDA_R_32F
                        },
                    )),
                    (false, false) if !bufs[g.c].half => None,
                    _ => return Err(format!("op {i}: a GEMM mixes half and f32 operands")),
                };
                Step::Gemm {
                    call,
                    alpha: g.alpha,
                    first: ptrs[call.first],
                    second: ptrs[call.second],
                    c: ptrs[call.c],
                    half,
                }
            }
            Op::LayerNorm {
                x,
                gamma,
                beta,
                out,
                rows,
                dim,
                eps,
            } => Step::Kernel {
                func: layernorm[storage(*out)].clone(),
                grid: *rows as u32,
                block: ROW_BLOCK,
                args: vec![
                    p(*x),
                    p(*gamma),
                    p(*beta),
                    p(*out),
                    Arg::I32(*dim as i32),
                    Arg::F32(*eps),
                ],
            },
            Op::Softmax { x, out, rows, dim } => Step::Kernel {
                func: softmax[storage(*out)].clone(),
                grid: *rows as u32,
                block: ROW_BLOCK,
                args: vec![p(*x), p(*out), Arg::I32(*dim as i32)],
            },
            // One thread per (outer, inner) column along the middle axis: the same
            // arguments for the mean, the sum and the running sum.
            Op::Axis {
                kind,
                x,
                out,
                outer,
                len,
                inner,
            } => {
                use graph::AxisKind;
                if *inner == 1 && *kind != AxisKind::CumSum {
                    // Contiguous rows: a block per row.
                    Step::Kernel {
                        func: f(match kind {
                            AxisKind::Mean => "rf_row_mean",
                            AxisKind::MeanSquare => "rf_row_mean_sq",
                            _ => "rf_row_sum",
                        })?,
                        grid: *outer as u32,
                        block: ROW_BLOCK,
                        args: vec![p(*x), p(*out), Arg::I32(*len as i32)],
                    }
                } else {
                    let func = f(match kind {
                        AxisKind::Sum => "rf_sum",
                        AxisKind::CumSum => "rf_cumsum",
                        // MeanSquare is only made for contiguous rows.
                        _ => "rf_mean",
                    })?;
                    along_axis(func, *x, *out, *outer, *len, *inner)
                }
            }
            Op::Fill { .. } | Op::Step { .. } => {
                return Err("a graph program holds no loop steps".into());
            }
        });
    }
    Ok(Loaded {
        program,
        _allocs: allocs,
        ptrs,
        steps,
        fill: f("rf_fill")?,
        frames: f("rf_frames")?,
        step: f("rf_step")?,
    })
}

impl Inner {
    fn stage(&self, key: &str) -> &Stage {
        &self.staging[key]
    }

    /// Staging `key` → the device memory at `dst`.
    fn stage_in(&self, key: &str, dst: u64) -> Step {
        let s = self.stage(key);
        Step::CopyIn {
            dst,
            src: s.ptr,
            bytes: s.bytes,
        }
    }

    fn copy_in(&self, key: &str, buf: usize, prog: &Loaded) -> Step {
        self.stage_in(key, prog.ptrs[buf])
    }

    fn copy_out(&self, key: &str, buf: usize, prog: &Loaded) -> Step {
        let s = self.stage(key);
        Step::CopyOut {
            dst: s.ptr,
            src: prog.ptrs[buf],
            bytes: s.bytes,
        }
    }

    fn prefix_steps(&self) -> Result<Vec<Step>, String> {
        let p = &self.prefix;
        let port = |n: &str| {
            p.program
                .input(n)
                .map(|x| x.buf)
                .ok_or(format!("no input {n}"))
        };
        let mut steps = vec![
            self.copy_in("pixels", port("pixels")?, p),
            self.copy_in("tokens", port("tokens")?, p),
        ];
        steps.extend(p.steps.iter().cloned());
        steps.push(self.copy_out("prefix_out", p.program.outputs[0].buf, p));
        Ok(steps)
    }

    /// Bytes in, normalised on the device into the prefix's `pixels`, then the prefix.
    fn frames_steps(&self, norm: &PixelNorm) -> Result<Vec<Step>, String> {
        let p = &self.prefix;
        let port = p.program.input("pixels").ok_or("no input pixels")?;
        let (cams, plane) = (port.shape[0], port.shape[2] * port.shape[3]);
        let frames = self.frames_dev.device_ptr(&self.stream).0;
        let present = self.present_dev.device_ptr(&self.stream).0;
        let n = cams * 3 * plane;
        let mut args = vec![
            Arg::Ptr(frames),
            Arg::Ptr(present),
            Arg::Ptr(p.ptrs[port.buf]),
            Arg::I32(cams as i32),
            Arg::I32(plane as i32),
        ];
        args.extend(norm.scale.iter().map(|v| Arg::F32(*v)));
        args.extend(norm.offset.iter().map(|v| Arg::F32(*v)));
        args.extend(norm.blank.iter().map(|v| Arg::F32(*v)));
        let mut steps = vec![
            self.stage_in("frames", frames),
            self.stage_in("present", present),
            Step::Kernel {
                func: p.frames.clone(),
                grid: (n as u32).div_ceil(MAP_BLOCK),
                block: MAP_BLOCK,
                args,
            },
        ];
        let port = |n: &str| {
            p.program
                .input(n)
                .map(|x| x.buf)
                .ok_or(format!("no input {n}"))
        };
        steps.push(self.copy_in("tokens", port("tokens")?, p));
        steps.extend(p.steps.iter().cloned());
        steps.push(self.copy_out("prefix_out", p.program.outputs[0].buf, p));
        Ok(steps)
    }

    fn denoise_steps(&self, n: u32) -> Vec<Step> {
        let e = &self.expert;
        let d = &self.den;
        let port = |name: &str| e.program.input(name).map(|p| p.buf).unwrap_or(0);
        let len = d.x.shape.iter().product::<usize>() as i32;
        let mut steps = vec![
            self.copy_in("x", d.x.buf, e),
            self.copy_in("prefix", port("prefix"), e),
            self.copy_in("state", port("state"), e),
        ];
        steps.extend(graph::unroll(
            &e.steps,
            n,
            |t| Step::Kernel {
                func: e.fill.clone(),
                grid: 1,
                block: 32,
                args: vec![Arg::Ptr(e.ptrs[d.t.buf]), Arg::I32(1), Arg::F32(t)],
            },
            |dt, t_next| Step::Kernel {
                func: e.step.clone(),
                grid: (len as u32).div_ceil(MAP_BLOCK),
                block: MAP_BLOCK,
                args: vec![
                    Arg::Ptr(e.ptrs[d.x.buf]),
                    Arg::Ptr(e.ptrs[d.v.buf]),
                    Arg::I32(len),
                    Arg::F32(dt),
                    Arg::Ptr(e.ptrs[d.t.buf]),
                    Arg::F32(t_next),
                ],
            },
        ));
        steps.push(self.copy_out("x_out", d.x.buf, e));
        steps
    }

    fn expert_step_steps(&self) -> Vec<Step> {
        let e = &self.expert;
        let d = &self.den;
        let port = |name: &str| e.program.input(name).map(|p| p.buf).unwrap_or(0);
        let mut steps = vec![
            self.copy_in("x", d.x.buf, e),
            self.copy_in("t", d.t.buf, e),
            self.copy_in("prefix", port("prefix"), e),
            self.copy_in("state", port("state"), e),
        ];
        steps.extend(e.steps.iter().cloned());
        steps.push(self.copy_out("x_out", d.v.buf, e));
        steps
    }

    fn exec(&self, steps: &[Step]) -> Result<(), String> {
        exec(&self.stream, &self.blas, steps)
    }

    fn capture(&self, steps: &[Step]) -> Result<CudaGraph, String> {
        capture(&self.stream, &self.blas, steps)
    }

    /// Runs steps (or their graph) and waits for them.
    fn run(&mut self, which: Which) -> Result<(), String> {
        self.ctx.bind_to_thread().map_err(drv)?;
        match which {
            Which::Prefix if self.use_graphs => {
                if self.prefix_graph.is_none() {
                    let g = self.capture(&self.prefix_steps()?)?;
                    self.prefix_graph = Some(g);
                }
                self.prefix_graph.as_ref().unwrap().launch().map_err(drv)?;
            }
            Which::Prefix => self.exec(&self.prefix_steps()?)?,
            Which::Frames(norm) if self.use_graphs => {
                if self.frames_graph.as_ref().is_none_or(|(n, _)| *n != norm) {
                    let g = self.capture(&self.frames_steps(&norm)?)?;
                    self.frames_graph = Some((norm, g));
                }
                let (_, g) = self.frames_graph.as_ref().unwrap();
                g.launch().map_err(drv)?;
            }
            Which::Frames(norm) => self.exec(&self.frames_steps(&norm)?)?,
            Which::Denoise(n) if self.use_graphs => {
                if !self.denoise_graphs.contains_key(&n) {
                    let g = self.capture(&self.denoise_steps(n))?;
                    self.denoise_graphs.insert(n, g);
                }
                self.denoise_graphs[&n].launch().map_err(drv)?;
            }
            Which::Denoise(n) => self.exec(&self.denoise_steps(n))?,
            Which::Step => self.exec(&self.expert_step_steps())?,
        }
        self.stream.synchronize().map_err(drv)
    }

    fn put_f32(&mut self, key: &str, data: &[f32]) -> Result<(), String> {
        let s = &self.staging[key];
        if data.len() * 4 != s.bytes {
            return Err(format!(
                "{key}: {} values, expected {}",
                data.len(),
                s.bytes / 4
            ));
        }
        // SAFETY: the staging block is `bytes` long, page-aligned, and idle.
        unsafe { std::slice::from_raw_parts_mut(s.ptr as *mut f32, data.len()) }
            .copy_from_slice(data);
        Ok(())
    }

    fn put_i64(&mut self, key: &str, data: &[i64]) -> Result<(), String> {
        let s = &self.staging[key];
        if data.len() * 8 != s.bytes {
            return Err(format!(
                "{key}: {} values, expected {}",
                data.len(),
                s.bytes / 8
            ));
        }
        // SAFETY: as in put_f32.
        unsafe { std::slice::from_raw_parts_mut(s.ptr as *mut i64, data.len()) }
            .copy_from_slice(data);
        Ok(())
    }

    fn put_bytes(&mut self, key: &str, data: &[u8]) -> Result<(), String> {
        let s = &self.staging[key];
        if data.len() != s.bytes {
            return Err(format!("{key}: {} bytes, expected {}", data.len(), s.bytes));
        }
        // SAFETY: as in put_f32.
        unsafe { std::slice::from_raw_parts_mut(s.ptr as *mut u8, data.len()) }
            .copy_from_slice(data);
        Ok(())
    }

    fn get_f32(&self, key: &str) -> Vec<f32> {
        let s = &self.staging[key];
        // SAFETY: written by the device copy that `run` waited for.
        unsafe { std::slice::from_raw_parts(s.ptr as *const f32, s.bytes / 4) }.to_vec()
    }
}

#[derive(Clone, Copy)]
enum Which {
    Prefix,
    Frames(PixelNorm),
    Denoise(u32),
    Step,
}

impl CudaEngine {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Engine for CudaEngine {
    fn mode(&self) -> &'static str {
        "cuda"
    }

    fn hardware(&self) -> BTreeMap<String, String> {
        self.hardware.clone()
    }

    fn prefix(&self, pixels: &[f32], tokens: &[i64]) -> Result<Vec<f32>, EngineError> {
        let mut g = self.lock();
        let run = |g: &mut Inner| -> Result<Vec<f32>, String> {
            g.put_f32("pixels", pixels)?;
            g.put_i64("tokens", tokens)?;
            g.run(Which::Prefix)?;
            Ok(g.get_f32("prefix_out"))
        };
        run(&mut g).map_err(run_err("prefix"))
    }

    fn prefix_frames(
        &self,
        frames: &Frames<'_>,
        norm: &PixelNorm,
        tokens: &[i64],
    ) -> Result<Vec<f32>, EngineError> {
        let mut g = self.lock();
        let run = |g: &mut Inner| -> Result<Vec<f32>, String> {
            g.put_bytes("frames", frames.hwc)?;
            let present: Vec<u8> = frames
                .present
                .iter()
                .flat_map(|p| (*p as i32).to_ne_bytes())
                .collect();
            g.put_bytes("present", &present)?;
            g.put_i64("tokens", tokens)?;
            g.run(Which::Frames(*norm))?;
            Ok(g.get_f32("prefix_out"))
        };
        run(&mut g).map_err(run_err("prefix"))
    }

    fn expert_step(
        &self,
        x: &[f32],
        t: f32,
        prefix: &[f32],
        state: &[f32],
    ) -> Result<Vec<f32>, EngineError> {
        let mut g = self.lock();
        let run = |g: &mut Inner| -> Result<Vec<f32>, String> {
            g.put_f32("x", x)?;
            g.put_f32("t", &[t])?;
            g.put_f32("prefix", prefix)?;
            g.put_f32("state", state)?;
            g.run(Which::Step)?;
            Ok(g.get_f32("x_out"))
        };
        run(&mut g).map_err(run_err("expert"))
    }

    fn denoise(
        &self,
        noise: Vec<f32>,
        prefix: &[f32],
        state: &[f32],
        steps: u32,
    ) -> Result<Vec<f32>, EngineError> {
        let mut g = self.lock();
        let run = |g: &mut Inner| -> Result<Vec<f32>, String> {
            g.put_f32("x", &noise)?;
            g.put_f32("prefix", prefix)?;
            g.put_f32("state", state)?;
            g.run(Which::Denoise(steps))?;
            Ok(g.get_f32("x_out"))
        };
        run(&mut g).map_err(run_err("expert"))
    }
}

/// One compiled graph of a real VLA export on the GPU, run with host inputs and outputs: the
/// host island (the float64 time embedding) evaluated per call and staged like any input,
/// copies in, the program's launches, copies out, all replayed as one CUDA graph when
/// `graphs` is on. The prefix's outputs come back to the host and go in again as the
/// expert's inputs (issue 14 item 3 keeps them on the device).
pub struct CudaProgram {
    inner: Mutex<ProgramInner>,
    /// The program as compiled, without its weights (they live on the device).
    program: Program,
}

struct ProgramInner {
    dev: Device,
    loaded: Loaded,
    /// Per program input: its staging (bytes as the buffer holds them).
    ins: Vec<Stage>,
    outs: Vec<Stage>,
    graphs: bool,
    /// Captured graphs by which inputs come from kept device tensors (copied device to
    /// device before the launch, so not staged) and which outputs go to the host.
    captured: HashMap<(Vec<bool>, Vec<bool>), CudaGraph>,
    /// A per-step expert's device loops, by their step times and dt (bits) and the inputs
    /// fed from kept tensors.
    loops: HashMap<Vec<u32>, LoopState>,
}

/// One device loop of a per-step expert ([`graph::DeviceLoop`]): its tables on the device,
/// x's staging, and its captured graph.
struct LoopState {
    dl: graph::DeviceLoop,
    _tables: Vec<CudaSlice<f32>>,
    table_ptrs: Vec<u64>,
    x_stage: Stage,
    _t_spare: CudaSlice<f32>,
    t_spare: u64,
    graph: Option<CudaGraph>,
}

/// Kept tensors are laid out at offsets aligned to this (cuBLAS and vector loads like it).
const KEPT_ALIGN: usize = 256;

/// One tensor in a [`DeviceKept`] block.
struct KeptPart {
    offset: usize,
    bytes: usize,
    /// The buffer's element type (bools are float32 on the device) and the port's.
    buf: DType,
    port: DType,
}

/// Tensors kept on the device between graphs (a prefix's handoff: the KV cache): one
/// allocation, freed when the last holder drops it. What a prefix-cache entry holds.
struct DeviceKept {
    ctx: Arc<CudaContext>,
    ptr: u64,
    parts: Vec<KeptPart>,
}

// SAFETY: a plain device allocation; every use binds the context first, and the runtime only
// reads it (copies) after the call that wrote it has synchronised.
unsafe impl Send for DeviceKept {}
unsafe impl Sync for DeviceKept {}

impl Drop for DeviceKept {
    fn drop(&mut self) {
        // SAFETY: allocated by `malloc_sync` in this context; no work reads it any more (every
        // call synchronises before returning, and a holder is what is being dropped).
        unsafe {
            if self.ctx.bind_to_thread().is_ok() {
                let _ = driver::result::free_sync(self.ptr);
            }
        }
    }
}

impl crate::vla::Kept for DeviceKept {
    fn to_host(&self) -> Result<Vec<graph::reference::HostValue>, String> {
        self.ctx.bind_to_thread().map_err(drv)?;
        self.parts
            .iter()
            .map(|part| {
                let mut raw = vec![0u8; part.bytes];
                // SAFETY: the part lies inside this live allocation.
                unsafe {
                    driver::result::memcpy_dtoh_sync(&mut raw, self.ptr + part.offset as u64)
                }
                .map_err(drv)?;
                Ok(host_value(&raw, part.buf, part.port))
            })
            .collect()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A port's values as the host takes them, from the bytes its buffer holds (`buf`): int64,
/// bools (0/1 floats on the device) as the port declares them (`port`), or f32.
fn host_value(raw: &[u8], buf: DType, port: DType) -> graph::reference::HostValue {
    use graph::reference::HostValue;
    if buf == DType::I64 {
        return HostValue::I64(
            raw.chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
        );
    }
    let v = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")));
    if port == DType::Bool {
        HostValue::Bool(v.map(|x| x != 0.0).collect())
    } else {
        HostValue::F32(v.collect())
    }
}

/// A host value into a port's pinned staging, in the buffer's element type.
fn stage_value(
    p: &Program,
    port: &Port,
    s: &Stage,
    value: graph::reference::HostValue,
) -> Result<(), String> {
    let n: usize = port.shape.iter().product();
    if value.len() != n {
        return Err(format!(
            "input {} takes {n} values, got {}",
            port.name,
            value.len()
        ));
    }
    // SAFETY: the staging block holds n values of the buffer's width, and the device is
    // idle (every call waits for its work under the mutex).
    if p.buffers[port.buf].dtype == DType::I64 {
        let v = value.into_i64();
        unsafe { std::slice::from_raw_parts_mut(s.ptr as *mut i64, n) }.copy_from_slice(&v);
    } else {
        unsafe { std::slice::from_raw_parts_mut(s.ptr as *mut f32, n) }
            .copy_from_slice(&value.to_f32());
    }
    Ok(())
}

/// The whole loop: the other inputs copied in once (those `fed` from kept tensors are on the
/// device already), x in, per step the table rows (device to device) or the time, the
/// expert's launches and the Euler update; x out.
fn loop_steps(e: &Loaded, ins: &[Stage], fed: &[bool], l: &LoopState) -> Vec<Step> {
    let p = &e.program;
    let dl = &l.dl;
    let mut steps: Vec<Step> = p
        .inputs
        .iter()
        .zip(ins)
        .zip(fed)
        .filter(|((port, _), fed)| !**fed && !dl.fills(&port.name))
        .map(|((port, s), _)| Step::CopyIn {
            dst: e.ptrs[port.buf],
            src: s.ptr,
            bytes: s.bytes,
        })
        .collect();
    steps.push(Step::CopyIn {
        dst: e.ptrs[dl.x.buf],
        src: l.x_stage.ptr,
        bytes: l.x_stage.bytes,
    });
    let len = dl.x.shape.iter().product::<usize>();
    for (k, &tk) in dl.times.iter().enumerate() {
        for ((port, _), &table) in dl.tables.iter().zip(&l.table_ptrs) {
            let bytes = port.shape.iter().product::<usize>() * 4;
            steps.push(Step::CopyDtoD {
                dst: e.ptrs[port.buf],
                src: table + (k * bytes) as u64,
                bytes,
            });
        }
        if let Some(t) = &dl.t {
            steps.push(Step::Kernel {
                func: e.fill.clone(),
                grid: 1,
                block: 32,
                args: vec![
                    Arg::Ptr(e.ptrs[t.buf]),
                    Arg::I32(t.shape.iter().product::<usize>() as i32),
                    Arg::F32(tk),
                ],
            });
        }
        steps.extend(e.steps.iter().cloned());
        steps.push(Step::Kernel {
            func: e.step.clone(),
            grid: (len as u32).div_ceil(MAP_BLOCK),
            block: MAP_BLOCK,
            args: vec![
                Arg::Ptr(e.ptrs[dl.x.buf]),
                Arg::Ptr(e.ptrs[dl.v.buf]),
                Arg::I32(len as i32),
                Arg::F32(dl.dt),
                Arg::Ptr(l.t_spare),
                Arg::F32(0.0),
            ],
        });
    }
    steps.push(Step::CopyOut {
        dst: l.x_stage.ptr,
        src: e.ptrs[dl.x.buf],
        bytes: l.x_stage.bytes,
    });
    steps
}

// SAFETY: as for `Inner`: every CUDA object is used under the mutex, the context bound first.
unsafe impl Send for ProgramInner {}

impl CudaProgram {
    pub fn load(program: Program, graphs: bool) -> Result<CudaProgram, EngineError> {
        check_libraries()?;
        let name = format!(" ({})", program.name);
        catch_load(&name, || Self::load_device(program, graphs))
    }

    fn load_device(program: Program, graphs: bool) -> Result<CudaProgram, EngineError> {
        let dev = open_device()?;
        let name = program.name.clone();
        let err = |m: String| EngineError::Load {
            graph: name.clone(),
            message: m,
        };
        let loaded = load_program(&dev.ctx, &dev.stream, program, "g", dev.arch).map_err(err)?;
        let p = &loaded.program;
        let stage = |port: &Port| -> Result<Stage, EngineError> {
            let bytes = p.port_bytes(port).max(4);
            // Cached pinned memory (flags 0), as `Staging::Cached`: the host reads the
            // outputs back, and reads of write-combined memory are uncached and slow.
            Stage::new(&dev.ctx, bytes, 0).map_err(unavailable)
        };
        let ins = p.inputs.iter().map(stage).collect::<Result<_, _>>()?;
        let outs = p.outputs.iter().map(stage).collect::<Result<_, _>>()?;
        // Uploaded: the host keeps each weight's size only (a plan counts a weight by its
        // `init`), not a second copy of the model.
        let mut loaded = loaded;
        for b in &mut loaded.program.buffers {
            if b.init.is_some() {
                b.init = Some(vec![]);
            }
        }
        let shown = loaded.program.clone();
        Ok(CudaProgram {
            program: shown,
            inner: Mutex::new(ProgramInner {
                dev,
                loaded,
                ins,
                outs,
                graphs,
                captured: HashMap::new(),
                loops: HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProgramInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ProgramInner {
    /// Copies in (inputs not `fed` from kept tensors), the launches, copies out (outputs
    /// `to_host`).
    fn steps(&self, fed: &[bool], to_host: &[bool]) -> Vec<Step> {
        let p = &self.loaded.program;
        let mut steps: Vec<Step> = p
            .inputs
            .iter()
            .zip(&self.ins)
            .zip(fed)
            .filter(|(_, fed)| !**fed)
            .map(|((port, s), _)| Step::CopyIn {
                dst: self.loaded.ptrs[port.buf],
                src: s.ptr,
                bytes: s.bytes,
            })
            .collect();
        steps.extend(self.loaded.steps.iter().cloned());
        steps.extend(
            p.outputs
                .iter()
                .zip(&self.outs)
                .zip(to_host)
                .filter(|(_, out)| **out)
                .map(|((port, s), _)| Step::CopyOut {
                    dst: s.ptr,
                    src: self.loaded.ptrs[port.buf],
                    bytes: s.bytes,
                }),
        );
        steps
    }

    /// Stages every input: from `kept` (a device-to-device copy, returned to be enqueued
    /// before the launch) or from the host feed (into its pinned staging). Returns which
    /// inputs are fed from kept tensors, and their copies.
    fn stage_inputs(
        &self,
        feed: &dyn Fn(&str) -> Option<graph::reference::HostValue>,
        kept: Option<&crate::vla::KeptFeed<'_>>,
        in_loop: Option<&graph::DeviceLoop>,
    ) -> Result<(Vec<bool>, Vec<Step>), String> {
        let p = &self.loaded.program;
        let held = kept
            .map(|k| {
                let on_device = k.held::<DeviceKept>(
                    "these tensors were not kept on the device by the cuda engine",
                )?;
                Ok::<_, String>((k, on_device))
            })
            .transpose()?;
        // A device loop tables the host island per step itself; a run evaluates it here.
        let island;
        let feed: &dyn Fn(&str) -> Option<graph::reference::HostValue> = match in_loop {
            Some(_) => feed,
            None => {
                island = graph::reference::with_host_island(p, feed)?;
                &island
            }
        };
        let mut fed = vec![false; p.inputs.len()];
        let mut copies = vec![];
        for (i, (port, s)) in p.inputs.iter().zip(&self.ins).enumerate() {
            if in_loop.is_some_and(|l| l.fills(&port.name)) {
                continue;
            }
            if let Some((k, dk)) = held
                && let Some(j) = k.index(&port.name)
            {
                let part = dk
                    .parts
                    .get(j)
                    .ok_or_else(|| format!("input {}: no kept tensor {j}", port.name))?;
                let want = p.port_bytes(port);
                if part.bytes != want || part.buf != p.buffers[port.buf].dtype {
                    return Err(format!(
                        "input {} takes {want} bytes of {:?}, the kept tensor has {} of {:?}",
                        port.name, p.buffers[port.buf].dtype, part.bytes, part.buf
                    ));
                }
                fed[i] = true;
                copies.push(Step::CopyDtoD {
                    dst: self.loaded.ptrs[port.buf],
                    src: dk.ptr + part.offset as u64,
                    bytes: part.bytes,
                });
                continue;
            }
            let value =
                feed(&port.name).ok_or_else(|| format!("no value for input {}", port.name))?;
            stage_value(p, port, s, value)?;
        }
        Ok((fed, copies))
    }

    /// Enqueues `before` (not captured: kept tensors' addresses differ per call), then the
    /// program's steps, replayed from a captured graph when graphs are on; waits.
    fn launch(
        &mut self,
        before: &[Step],
        fed: Vec<bool>,
        to_host: Vec<bool>,
    ) -> Result<(), String> {
        self.dev.ctx.bind_to_thread().map_err(drv)?;
        exec(&self.dev.stream, &self.dev.blas, before)?;
        if self.graphs {
            let key = (fed, to_host);
            if !self.captured.contains_key(&key) {
                let g = capture(
                    &self.dev.stream,
                    &self.dev.blas,
                    &self.steps(&key.0, &key.1),
                )?;
                self.captured.insert(key.clone(), g);
            }
            self.captured[&key].launch().map_err(drv)?;
        } else {
            exec(
                &self.dev.stream,
                &self.dev.blas,
                &self.steps(&fed, &to_host),
            )?;
        }
        self.dev.stream.synchronize().map_err(drv)
    }

    fn run(
        &mut self,
        feed: &dyn Fn(&str) -> Option<graph::reference::HostValue>,
        kept: Option<&crate::vla::KeptFeed<'_>>,
    ) -> Result<Vec<graph::reference::HostValue>, String> {
        let (fed, copies) = self.stage_inputs(feed, kept, None)?;
        let outs = vec![true; self.loaded.program.outputs.len()];
        self.launch(&copies, fed, outs)?;
        let p = &self.loaded.program;
        Ok(p.outputs
            .iter()
            .zip(&self.outs)
            .map(|(port, s)| {
                // SAFETY: written by the copy out that the synchronise above waited for; the
                // staging holds at least the port's bytes.
                let raw =
                    unsafe { std::slice::from_raw_parts(s.ptr as *const u8, p.port_bytes(port)) };
                host_value(raw, p.buffers[port.buf].dtype, port.dtype)
            })
            .collect())
    }

    /// Runs, and copies the outputs `keep` device to device into one new allocation that
    /// outlives the call; nothing comes back to the host.
    fn run_kept(
        &mut self,
        feed: &dyn Fn(&str) -> Option<graph::reference::HostValue>,
        keep: &[usize],
    ) -> Result<DeviceKept, String> {
        let p = &self.loaded.program;
        let mut parts = vec![];
        let mut total = 0usize;
        for &i in keep {
            let port = p
                .outputs
                .get(i)
                .ok_or_else(|| format!("no output {i} to keep"))?;
            let bytes = p.port_bytes(port);
            parts.push(KeptPart {
                offset: total,
                bytes,
                buf: p.buffers[port.buf].dtype,
                port: port.dtype,
            });
            total += bytes.div_ceil(KEPT_ALIGN) * KEPT_ALIGN;
        }
        let srcs: Vec<u64> = keep
            .iter()
            .map(|&i| self.loaded.ptrs[p.outputs[i].buf])
            .collect();
        let (fed, copies) = self.stage_inputs(feed, None, None)?;
        let outs = vec![false; p.outputs.len()];
        self.launch(&copies, fed, outs)?;
        // SAFETY: a fresh allocation, owned by the returned value (freed on its drop).
        let ptr = unsafe { driver::result::malloc_sync(total.max(KEPT_ALIGN)) }
            .map_err(|e| format!("keeping {total} bytes of prefix on the device: {}", drv(e)))?;
        let kept = DeviceKept {
            ctx: self.dev.ctx.clone(),
            ptr,
            parts,
        };
        let copies: Vec<Step> = kept
            .parts
            .iter()
            .zip(srcs)
            .map(|(part, src)| Step::CopyDtoD {
                dst: ptr + part.offset as u64,
                src,
                bytes: part.bytes,
            })
            .collect();
        exec(&self.dev.stream, &self.dev.blas, &copies)?;
        self.dev.stream.synchronize().map_err(drv)?;
        Ok(kept)
    }
}

impl ProgramInner {
    fn denoise(
        &mut self,
        ports: (&str, &str, &str),
        x0: &[f32],
        times: &[f32],
        dt: f32,
        feed: &dyn Fn(&str) -> Option<graph::reference::HostValue>,
        kept: Option<&crate::vla::KeptFeed<'_>>,
    ) -> Result<Vec<f32>, String> {
        self.dev.ctx.bind_to_thread().map_err(drv)?;
        // Which inputs come from kept tensors: part of the key (the graph copies the others in).
        let from_kept = self
            .loaded
            .program
            .inputs
            .iter()
            .map(|port| kept.is_some_and(|k| k.index(&port.name).is_some()));
        let key: Vec<u32> = times
            .iter()
            .chain(std::iter::once(&dt))
            .map(|v| v.to_bits())
            .chain(from_kept.map(u32::from))
            .collect();
        if !self.loops.contains_key(&key) {
            let dl = graph::DeviceLoop::new(&self.loaded.program, ports, times, dt)?;
            let stream = &self.dev.stream;
            let mut tables = vec![];
            let mut table_ptrs = vec![];
            for (_, vals) in &dl.tables {
                let t = stream.clone_htod(vals).map_err(drv)?;
                table_ptrs.push(t.device_ptr(stream).0);
                tables.push(t);
            }
            let spare = stream.alloc_zeros::<f32>(1).map_err(drv)?;
            let t_spare = spare.device_ptr(stream).0;
            // Cached: x comes back to the host (see `CudaProgram::load_device`).
            let x_stage = Stage::new(&self.dev.ctx, dl.x.shape.iter().product::<usize>() * 4, 0)?;
            stream.synchronize().map_err(drv)?;
            self.loops.insert(
                key.clone(),
                LoopState {
                    dl,
                    _tables: tables,
                    table_ptrs,
                    x_stage,
                    _t_spare: spare,
                    t_spare,
                    graph: None,
                },
            );
        }
        let l = self.loops.get(&key).expect("inserted above");
        let (fed, copies) = self.stage_inputs(feed, kept, Some(&l.dl))?;
        if x0.len() * 4 != l.x_stage.bytes {
            return Err(format!(
                "x takes {} values, got {}",
                l.x_stage.bytes / 4,
                x0.len()
            ));
        }
        // SAFETY: x's staging is `bytes` long and idle.
        unsafe { std::slice::from_raw_parts_mut(l.x_stage.ptr as *mut f32, x0.len()) }
            .copy_from_slice(x0);
        exec(&self.dev.stream, &self.dev.blas, &copies)?;
        if !self.graphs {
            exec(
                &self.dev.stream,
                &self.dev.blas,
                &loop_steps(&self.loaded, &self.ins, &fed, l),
            )?;
        } else {
            if l.graph.is_none() {
                let g = capture(
                    &self.dev.stream,
                    &self.dev.blas,
                    &loop_steps(&self.loaded, &self.ins, &fed, l),
                )?;
                self.loops.get_mut(&key).expect("inserted above").graph = Some(g);
            }
            self.loops[&key]
                .graph
                .as_ref()
                .expect("captured")
                .launch()
                .map_err(drv)?;
        }
        self.dev.stream.synchronize().map_err(drv)?;
        let l = &self.loops[&key];
        // SAFETY: written by the copy out that the synchronise above waited for.
        Ok(unsafe { std::slice::from_raw_parts(l.x_stage.ptr as *const f32, x0.len()) }.to_vec())
    }
}

impl crate::vla::RunProgram for CudaProgram {
    fn run(
        &self,
        feed: &dyn Fn(&str) -> Option<graph::reference::HostValue>,
        kept: Option<&crate::vla::KeptFeed<'_>>,
    ) -> Result<Vec<graph::reference::HostValue>, String> {
        self.lock().run(feed, kept)
    }
    fn run_kept(
        &self,
        feed: &dyn Fn(&str) -> Option<graph::reference::HostValue>,
        keep: &[usize],
    ) -> Result<Box<dyn crate::vla::Kept>, String> {
        Ok(Box::new(self.lock().run_kept(feed, keep)?))
    }
    fn program(&self) -> &Program {
        &self.program
    }
    fn denoise(
        &self,
        ports: (&str, &str, &str),
        x0: &[f32],
        times: &[f32],
        dt: f32,
        feed: &dyn Fn(&str) -> Option<graph::reference::HostValue>,
        kept: Option<&crate::vla::KeptFeed<'_>>,
    ) -> Option<Result<Vec<f32>, String>> {
        Some(self.lock().denoise(ports, x0, times, dt, feed, kept))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC compiles without a GPU. CI installs it from PyPI
    /// (`nvidia-cuda-nvrtc`, see deploy/ci-setup.sh); the library is loaded
    /// by path first so cudarc's load by soname finds it.
    fn load_nvrtc() -> Vec<libloading::Library> {
        let dir = std::env::var("REFLEX_NVRTC_DIR").ok().or_else(|| {
            let out = std::process::Command::new("python3")
                .args([
                    "-c",
                    "import nvidia.cu13, os; print(os.path.join(list(nvidia.cu13.__path__)[0], 'lib'))",
                ])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        });
        let dir = dir.expect(
            "libnvrtc.so.13 not found: `python3 -m pip install nvidia-cuda-nvrtc==13.0.*` \
             (deploy/ci-setup.sh does) or set REFLEX_NVRTC_DIR",
        );
        // NVRTC opens its builtins by soname at the first compile: load that first.
        ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"]
            .iter()
            .map(|name| {
                let path = std::path::Path::new(&dir).join(name);
                // SAFETY: loading NVRTC runs no untrusted initialisers.
                unsafe { libloading::Library::new(&path) }
                    .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
            })
            .collect()
    }

    /// Every kernel the reference export needs, for the Hopper arch, through
    /// the same NVRTC options the engine uses.
    #[test]
    fn nvrtc_compiles_every_kernel_of_the_reference_export() {
        let _lib = load_nvrtc();
        assert!(unsafe { nvrtc::sys::is_culib_present() });
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::export::write_reference_export(dir.path(), 0).unwrap();
        for (file, tag) in [(&cfg.graphs.prefix, "p"), (&cfg.graphs.expert, "e")] {
            let p = graph::compile_file(&dir.path().join(file)).unwrap();
            let (kernels, _) = cuda_src::program_source(&p, tag);
            let (_, src) = cuda_src::program_source(&p, tag);
            let (ptx, _) =
                compile_cached(&src, "sm_90", None).unwrap_or_else(|e| panic!("{file}: {e}"));
            let text = ptx.to_src();
            for k in kernels.iter().flatten() {
                assert!(
                    text.contains(&format!(".entry {}(", k.name)),
                    "{} missing",
                    k.name
                );
            }
            for k in [
                "rf_layernorm",
                "rf_softmax",
                "rf_mean",
                "rf_fill",
                "rf_step",
            ] {
                assert!(text.contains(&format!(".entry {k}(")), "{k} missing");
            }
        }
    }

    /// The kernel cache: NVRTC once, then the stored PTX (the same text) on the next start;
    /// keyed by source and arch; files 0600 in a 0700 folder; a file others could have
    /// written is not read but compiled again and replaced; no folder, no cache.
    #[test]
    fn kernels_are_compiled_once_and_read_from_the_cache_after() {
        use std::os::unix::fs::PermissionsExt;
        let _lib = load_nvrtc();
        let dir = tempfile::tempdir().unwrap();
        crate::fixtures::write(crate::fixtures::Kind::Pi05, dir.path(), 1).unwrap();
        let p = graph::compile_file(&dir.path().join("expert_denoise.onnx")).unwrap();
        let (_, src) = cuda_src::program_source(&p, "e");
        let cache = dir.path().join("cache").join("kernels");
        let t0 = std::time::Instant::now();
        let (cold, hit) = compile_cached(&src, "sm_90", Some(&cache)).unwrap();
        let cold_ms = t0.elapsed().as_secs_f64() * 1e3;
        assert!(!hit);
        let files: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&cache), mode(&files[0])), (0o700, 0o600));
        let t0 = std::time::Instant::now();
        let (warm, hit) = compile_cached(&src, "sm_90", Some(&cache)).unwrap();
        let warm_ms = t0.elapsed().as_secs_f64() * 1e3;
        assert!(hit);
        assert_eq!(warm.to_src(), cold.to_src());
        eprintln!(
            "{} kernels: NVRTC {cold_ms:.0} ms, from the cache {warm_ms:.1} ms",
            p.ops.len()
        );
        // Another arch is another entry.
        let (_, hit) = compile_cached(&src, "sm_80", Some(&cache)).unwrap();
        assert!(!hit);
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
        // A cached file made writable by others is not trusted: compiled again, replaced.
        std::fs::set_permissions(&files[0], std::fs::Permissions::from_mode(0o666)).unwrap();
        let (_, hit) = compile_cached(&src, "sm_90", Some(&cache)).unwrap();
        assert!(!hit);
        assert_eq!(mode(&files[0]), 0o600);
        assert!(compile_cached(&src, "sm_90", Some(&cache)).unwrap().1);
        // Nor is a folder others can write to.
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(!compile_cached(&src, "sm_90", Some(&cache)).unwrap().1);
        // No folder: compiled every time, nothing written.
        assert!(!compile_cached(&src, "sm_90", None).unwrap().1);
    }

    /// `--precision`: programs with half buffers compile, their maps loading and storing half
    /// and the row kernels in every storage.
    #[test]
    fn nvrtc_compiles_half_precision_programs() {
        use crate::fixtures::Kind;
        use graph::Precision;
        let _lib = load_nvrtc();
        // Decomposed pi0.5 in bf16, the per-step expert (host island, loop) in f16: every
        // map kernel reading and writing half buffers, and the fixed ones.
        for (kind, precision, store) in [
            (Kind::Pi05, Precision::BF16, "rf_to_bf16("),
            (Kind::Pi05PerStep, Precision::F16, "rf_to_f16("),
        ] {
            let d = tempfile::tempdir().unwrap();
            crate::fixtures::write(kind, d.path(), 5).unwrap();
            let mut files: Vec<_> = std::fs::read_dir(d.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|f| f.extension().is_some_and(|x| x == "onnx"))
                .collect();
            files.sort();
            assert!(files.len() >= 2);
            for path in files {
                let file = path.display().to_string();
                let mut model = graph::read_model(&path).unwrap();
                crate::onnx::inline_external(&mut model, d.path()).unwrap();
                // Every product a GEMM (as at full size), so most buffers are half.
                let p = &graph::compile_with(&model, "h.onnx", precision, 0).unwrap();
                let (kernels, src) = cuda_src::program_source(p, "h");
                assert!(p.half_gemms > 0, "{file}");
                assert!(src.contains("rf_ld(b") && src.contains(store), "{file}");
                // Attention's softmax reads scores + mask in a generated kernel.
                assert!(
                    p.fusions.fused_softmax_inputs > 0 && src.contains("rf_softmax_f<"),
                    "{file}"
                );
                let (ptx, _) = compile_cached(&src, "sm_90", None)
                    .unwrap_or_else(|e| panic!("{kind} {precision} {file}: {e}"));
                let text = ptx.to_src();
                for k in kernels.iter().flatten() {
                    assert!(text.contains(&format!(".entry {}(", k.name)), "{}", k.name);
                }
                for k in ["rf_softmax", "rf_layernorm"] {
                    for suffix in ["", "_f16", "_bf16"] {
                        assert!(
                            text.contains(&format!(".entry {k}{suffix}(")),
                            "{k}{suffix}"
                        );
                    }
                }
            }
        }
    }

    /// The kernels of the view and shape operators (Slice with negative steps, Pow as
    /// powf, Reciprocal, broadcasts) and of the run-time masks (comparisons, logic, Where,
    /// CumSum, ReduceSum) compile too.
    #[test]
    fn nvrtc_compiles_the_view_and_mask_operators_kernels() {
        let _lib = load_nvrtc();
        for (model, tag, needle) in [
            (graph::tests::views_model(), "v", "powf("),
            (graph::tests::masks_model(), "m", "? 1.f : 0.f"),
        ] {
            let p = graph::compile(&model, "test.onnx").unwrap();
            let (kernels, src) = cuda_src::program_source(&p, tag);
            assert!(src.contains(needle), "{src}");
            let (ptx, _) =
                compile_cached(&src, "sm_90", None).unwrap_or_else(|e| panic!("{e}\n{src}"));
            let text = ptx.to_src();
            assert!(kernels.iter().flatten().count() >= 1);
            for k in kernels.iter().flatten() {
                assert!(
                    text.contains(&format!(".entry {}(", k.name)),
                    "{} missing",
                    k.name
                );
            }
            for k in [
                "rf_sum",
                "rf_cumsum",
                "rf_row_mean",
                "rf_row_sum",
                "rf_row_mean_sq",
            ] {
                assert!(text.contains(&format!(".entry {k}(")), "{k} missing");
            }
        }
    }

    #[test]
    fn the_driver_version_is_read_from_proc() {
        let text = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  (dvs-builder@U16-I3-B03-4-3)  Tue Sep 23 09:48:44 UTC 2025\nGCC version:  gcc version 12.2.0\n";
        assert_eq!(nvidia_driver_version(text).as_deref(), Some("580.95.05"));
        assert_eq!(nvidia_driver_version("nothing"), None);
    }
}
