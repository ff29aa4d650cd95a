//! The borrowed device API against the f64 oracle: views of caller memory with padded strides, sequence offsets
//! and ALiBi slopes on the device, streams of the caller's, forward + backward captured in a CUDA graph and
//! replayed on new data, two streams at once, and every typed error of a bad view. Without a usable GPU every
//! test says so on stderr and passes.
#![cfg(feature = "cuda")]

mod common;

use common::{check_outputs, inputs, Case, Inputs, Stored};
use flashattn::cuda::cudarc::driver::{sys, CudaSlice, CudaStream};
use flashattn::cuda::{BackwardArgs, DeviceDType, DeviceInputs, DeviceVarLen, DeviceView, ForwardArgs, Gpu, Workspace};
use flashattn::{AttnError, AttnOptions, DType};
use half::bf16;
use std::io::Write;
use std::sync::Arc;

fn gpu(test: &str) -> Option<Arc<Gpu>> {
    if flashattn::cuda::is_available() {
        return Some(Gpu::open(0).unwrap());
    }
    let _ = writeln!(std::io::stderr(), "cuda test {test} SKIPPED: no usable CUDA GPU or no NVRTC");
    None
}

/// A device buffer holding one tensor with padded strides (8 elements of padding per dimension, so every stride
/// stays a multiple of 8), and its view.
struct Dev {
    buf: CudaSlice<u16>,
    view: DeviceView,
}

/// Row-major strides with 8 elements of padding after every dimension but the last.
/// (`FLASHATTN_TEST_UNPADDED=1`: no padding, for comparing a run against contiguous inputs.)
fn padded_strides(shape: &[usize]) -> Vec<usize> {
    let pad = if std::env::var("FLASHATTN_TEST_UNPADDED").is_ok_and(|v| v == "1") { 0 } else { 8 };
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len() - 1).rev() {
        strides[i] = strides[i + 1] * shape[i + 1] + pad;
    }
    strides
}

/// The elements of `t` at `strides`, padding filled with a huge value (a kernel that reads it shows).
fn laid_out(t: &Stored<bf16>, strides: &[usize]) -> Vec<u16> {
    let len = t.shape.iter().zip(strides).map(|(&n, &s)| n.saturating_sub(1) * s).sum::<usize>() + 1;
    let mut out = vec![bf16::from_f32(1e30).to_bits(); len];
    let n: usize = t.shape.iter().product();
    for flat in 0..n {
        let (mut rem, mut src, mut dst) = (flat, 0, 0);
        for ax in (0..t.shape.len()).rev() {
            let i = rem % t.shape[ax];
            rem /= t.shape[ax];
            src += i * t.strides[ax];
            dst += i * strides[ax];
        }
        out[dst] = t.data[src].to_bits();
    }
    out
}

fn upload(stream: &Arc<CudaStream>, t: &Stored<bf16>) -> Dev {
    let strides = padded_strides(&t.shape);
    let buf = stream.clone_htod(&laid_out(t, &strides)).unwrap();
    // SAFETY: the buffer lives in `Dev` beside its view.
    let view = unsafe { DeviceView::strided(ptr(&buf, stream), DeviceDType::BF16, &t.shape, &strides) };
    Dev { buf, view }
}

/// Writes `t` into `dev`'s buffer (same shape), in stream order.
fn rewrite(stream: &Arc<CudaStream>, dev: &mut Dev, t: &Stored<bf16>) {
    stream.memcpy_htod(&laid_out(t, dev.view.strides()), &mut dev.buf).unwrap();
}

fn ptr<T>(buf: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    use flashattn::cuda::cudarc::driver::DevicePtr;
    buf.device_ptr(stream).0
}

/// A contiguous output buffer poisoned with NaN.
fn output(stream: &Arc<CudaStream>, dtype: DeviceDType, shape: &[usize]) -> (CudaSlice<u16>, DeviceView) {
    let n: usize = shape.iter().product::<usize>() * dtype.size_bytes() / 2;
    let buf = stream.clone_htod(&vec![0x7fc0u16; n.max(2)]).unwrap();
    // SAFETY: the caller keeps the buffer beside the view.
    let view = unsafe { DeviceView::contiguous(ptr(&buf, stream), dtype, shape) };
    (buf, view)
}

fn bf16s(stream: &Arc<CudaStream>, buf: &CudaSlice<u16>, n: usize) -> Vec<bf16> {
    stream.clone_dtoh(&buf.slice(..n)).unwrap().into_iter().map(bf16::from_bits).collect()
}

fn f32s(stream: &Arc<CudaStream>, buf: &CudaSlice<u16>, n: usize) -> Vec<f32> {
    let bits = stream.clone_dtoh(&buf.slice(..2 * n)).unwrap();
    bits.chunks(2).map(|c| f32::from_bits(c[0] as u32 | (c[1] as u32) << 16)).collect()
}

/// One problem's device memory: inputs, outputs, the device-side offsets and slopes, and the options.
struct Problem {
    case: Case,
    q: Dev,
    k: Dev,
    v: Dev,
    dout: Dev,
    out: (CudaSlice<u16>, DeviceView),
    lse: (CudaSlice<u16>, DeviceView),
    dq: (CudaSlice<u16>, DeviceView),
    dk: (CudaSlice<u16>, DeviceView),
    dv: (CudaSlice<u16>, DeviceView),
    cu: Option<(CudaSlice<i32>, CudaSlice<i32>, DeviceView, DeviceView)>,
    alibi: Option<(CudaSlice<f32>, DeviceView)>,
    opts: AttnOptions,
}

impl Problem {
    fn new(stream: &Arc<CudaStream>, case: Case) -> (Problem, Inputs<bf16>) {
        let inp = inputs::<bf16>(&case);
        let host = case.options();
        let batch = case.len_q.len();
        let lse_shape = if case.varlen {
            vec![case.heads_q, case.len_q.iter().sum()]
        } else {
            vec![batch, case.heads_q, case.len_q[0]]
        };
        let cu = host.varlen.as_ref().map(|vl| {
            let (q, k) = (stream.clone_htod(&vl.cu_seqlens_q).unwrap(), stream.clone_htod(&vl.cu_seqlens_k).unwrap());
            let view = |b: &CudaSlice<i32>| DeviceView::of_slice(b, stream, DeviceDType::I32, &[batch + 1]);
            let (vq, vk) = (view(&q), view(&k));
            (q, k, vq, vk)
        });
        // Slopes per query head, shared by the batch.
        let alibi = host.alibi_slopes.as_ref().map(|s| {
            let b = stream.clone_htod(s).unwrap();
            let view = DeviceView::of_slice(&b, stream, DeviceDType::F32, &[case.heads_q]);
            (b, view)
        });
        let p = Problem {
            q: upload(stream, &inp.q),
            k: upload(stream, &inp.k),
            v: upload(stream, &inp.v),
            dout: upload(stream, &inp.dout),
            out: output(stream, DeviceDType::BF16, &case.q_shape()),
            lse: output(stream, DeviceDType::F32, &lse_shape),
            dq: output(stream, DeviceDType::BF16, &case.q_shape()),
            dk: output(stream, DeviceDType::BF16, &case.kv_shape()),
            dv: output(stream, DeviceDType::BF16, &case.kv_shape()),
            cu,
            alibi,
            opts: AttnOptions { varlen: None, alibi_slopes: None, ..host },
            case,
        };
        (p, inp)
    }

    fn device(&self) -> DeviceInputs<'_> {
        DeviceInputs {
            varlen: self.cu.as_ref().map(|(_, _, q, k)| DeviceVarLen {
                cu_seqlens_q: q,
                cu_seqlens_k: k,
                max_seqlen_q: *self.case.len_q.iter().max().unwrap(),
                max_seqlen_k: *self.case.len_k.iter().max().unwrap(),
            }),
            alibi_slopes: self.alibi.as_ref().map(|(_, v)| v),
        }
    }

    fn forward(&self) -> ForwardArgs<'_> {
        ForwardArgs {
            q: &self.q.view,
            k: &self.k.view,
            v: &self.v.view,
            out: &self.out.1,
            lse: &self.lse.1,
            opts: &self.opts,
            device: self.device(),
        }
    }

    /// The backward of the forward's own output.
    fn backward(&self) -> BackwardArgs<'_> {
        BackwardArgs {
            q: &self.q.view,
            k: &self.k.view,
            v: &self.v.view,
            o: &self.out.1,
            lse: &self.lse.1,
            dout: &self.dout.view,
            dq: &self.dq.1,
            dk: &self.dk.1,
            dv: &self.dv.1,
            opts: &self.opts,
            device: self.device(),
        }
    }

    /// Downloads the results (after the stream's work) and checks them against the oracle.
    fn check(&self, stream: &Arc<CudaStream>, inp: &Inputs<bf16>) {
        stream.synchronize().unwrap();
        let (nq, nk) = (self.out.1.numel(), self.dk.1.numel());
        let out = bf16s(stream, &self.out.0, nq);
        let lse = f32s(stream, &self.lse.0, self.lse.1.numel());
        let (dq, dk, dv) =
            (bf16s(stream, &self.dq.0, nq), bf16s(stream, &self.dk.0, nk), bf16s(stream, &self.dv.0, nk));
        check_outputs(&self.case, inp, &out, &lse, Some((&dq, &dk, &dv))).unwrap();
    }
}

fn bf16_case(mut case: Case) -> Case {
    case.dtype = DType::BF16;
    case
}

fn varlen_case() -> Case {
    let mut c = bf16_case(Case::dense(1, 1, 1, 8, 2, 128));
    c.varlen = true;
    c.len_q = vec![300, 0, 77, 513];
    c.len_k = vec![350, 40, 0, 513];
    c.causal = true;
    c.alibi = true;
    c
}

/// Padded strides, device offsets and slopes, windows and softcap, on a stream of the test's own.
#[test]
fn gpu_borrowed_views_on_a_caller_stream() {
    let Some(gpu) = gpu("gpu_borrowed_views_on_a_caller_stream") else { return };
    let stream = gpu.context().new_stream().unwrap();
    let mut windowed = bf16_case(Case::dense(2, 333, 401, 6, 3, 64));
    windowed.window = (Some(90), Some(17));
    windowed.softcap = Some(12.0);
    let mut gqa = bf16_case(Case::dense(3, 129, 129, 8, 1, 256));
    gqa.causal = true;
    for case in [windowed, gqa, varlen_case()] {
        let (p, inp) = Problem::new(&stream, case);
        gpu.launch_forward(&stream, &p.forward(), None).unwrap();
        gpu.launch_backward(&stream, &p.backward(), None).unwrap();
        p.check(&stream, &inp);
    }
}

/// Forward and backward captured in one graph with caller workspaces, replayed on two sets of new inputs.
#[test]
fn gpu_graph_capture_replays_on_new_data() {
    let Some(gpu) = gpu("gpu_graph_capture_replays_on_new_data") else { return };
    let stream = gpu.context().new_stream().unwrap();
    for base in [bf16_case(Case::dense(2, 300, 300, 4, 2, 128)), varlen_case()] {
        let mut base = base;
        base.causal = true;
        let (mut p, _) = Problem::new(&stream, base);
        let (fwd_bytes, bwd_bytes) =
            (gpu.forward_workspace_bytes(&p.forward()).unwrap(), gpu.backward_workspace_bytes(&p.backward()).unwrap());
        let mut ws_f = stream.alloc_zeros::<u8>(fwd_bytes.max(1)).unwrap();
        let mut ws_b = stream.alloc_zeros::<u8>(bwd_bytes.max(1)).unwrap();
        let (ws_f, ws_b) = (Workspace::of_slice(&mut ws_f, &stream), Workspace::of_slice(&mut ws_b, &stream));
        gpu.prepare_forward(&p.forward()).unwrap();
        gpu.prepare_backward(&p.backward()).unwrap();
        stream.synchronize().unwrap();
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL).unwrap();
        gpu.launch_forward(&stream, &p.forward(), Some(ws_f)).unwrap();
        gpu.launch_backward(&stream, &p.backward(), Some(ws_b)).unwrap();
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).unwrap().expect("a captured graph");
        for seed in [11, 12] {
            p.case.seed = seed;
            let inp = inputs::<bf16>(&p.case);
            for (dev, t) in [(&mut p.q, &inp.q), (&mut p.k, &inp.k), (&mut p.v, &inp.v), (&mut p.dout, &inp.dout)] {
                rewrite(&stream, dev, t);
            }
            graph.launch().unwrap();
            p.check(&stream, &inp);
        }
    }
}

/// Two problems of different shapes in flight at once on two streams, each with its own scratch.
#[test]
fn gpu_two_streams_at_once() {
    let Some(gpu) = gpu("gpu_two_streams_at_once") else { return };
    let (s1, s2) = (gpu.context().new_stream().unwrap(), gpu.context().new_stream().unwrap());
    let mut a = bf16_case(Case::dense(2, 1100, 1100, 8, 2, 128));
    a.seed = 21;
    let mut b = varlen_case();
    b.seed = 22;
    let (pa, ia) = Problem::new(&s1, a);
    let (pb, ib) = Problem::new(&s2, b);
    s1.synchronize().unwrap();
    s2.synchronize().unwrap();
    for _ in 0..3 {
        gpu.launch_forward(&s1, &pa.forward(), None).unwrap();
        gpu.launch_forward(&s2, &pb.forward(), None).unwrap();
        gpu.launch_backward(&s1, &pa.backward(), None).unwrap();
        gpu.launch_backward(&s2, &pb.backward(), None).unwrap();
    }
    pa.check(&s1, &ia);
    pb.check(&s2, &ib);
}

/// Every bad view gets a typed error before anything is launched.
#[test]
fn gpu_bad_views_are_typed_errors() {
    let Some(gpu) = gpu("gpu_bad_views_are_typed_errors") else { return };
    let stream = gpu.context().new_stream().unwrap();
    let (p, _) = Problem::new(&stream, bf16_case(Case::dense(2, 64, 64, 4, 2, 64)));
    let fwd = p.forward();
    let run = |args: &ForwardArgs| gpu.launch_forward(&stream, args, None).unwrap_err();
    let with_q = |q: &DeviceView| run(&ForwardArgs { q, ..fwd });
    let (shape, strides) = (p.q.view.shape().to_vec(), p.q.view.strides().to_vec());
    let at = |ptr: u64| unsafe { DeviceView::strided(ptr, DeviceDType::BF16, &shape, &strides) };

    assert!(matches!(with_q(&at(0)), AttnError::Pointer { tensor: "q", .. }), "null");
    let e = with_q(&at(p.q.view.ptr() + 2));
    assert!(matches!(&e, AttnError::Pointer { problem, .. } if problem.contains("multiple of 16")), "{e}");
    let host = vec![0u16; 1 << 16];
    let e = with_q(&at(host.as_ptr() as u64 & !15));
    assert!(matches!(e, AttnError::Pointer { tensor: "q", .. }), "host memory: {e}");
    // Past the end of its allocation, and offsets that overflow.
    let mut long = shape.clone();
    long[1] *= 4;
    let e = with_q(&unsafe { DeviceView::strided(p.q.view.ptr(), DeviceDType::BF16, &long, &strides) });
    assert!(matches!(e, AttnError::Stride { tensor: "q", .. }), "{e}");
    let huge = [usize::MAX / 4, shape[1], shape[2], shape[3]];
    let e = with_q(&unsafe { DeviceView::strided(p.q.view.ptr(), DeviceDType::BF16, &huge, &strides) });
    assert!(matches!(e, AttnError::Stride { .. } | AttnError::Mismatch { .. }), "{e}");
    // Strides that are not whole 16-byte rows.
    let mut odd = strides.clone();
    odd[2] += 1;
    let e = with_q(&unsafe { DeviceView::strided(p.q.view.ptr(), DeviceDType::BF16, &shape, &odd) });
    assert!(matches!(e, AttnError::Stride { .. }), "{e}");
    // A view of the wrong element type.
    let e = run(&ForwardArgs { lse: &p.out.1, ..fwd });
    assert!(matches!(e, AttnError::Unsupported { .. }), "{e}");
    // An output that aliases an input.
    let alias = unsafe { DeviceView::contiguous(p.q.view.ptr(), DeviceDType::BF16, p.out.1.shape()) };
    let e = run(&ForwardArgs { out: &alias, ..fwd });
    assert!(matches!(e, AttnError::Overlap { output: "out", other: "q" }), "{e}");
    // A workspace that is too small, and one off its alignment.
    let bwd = p.backward();
    let needed = gpu.backward_workspace_bytes(&bwd).unwrap();
    let mut ws = stream.alloc_zeros::<u8>(needed + 512).unwrap();
    let full = Workspace::of_slice(&mut ws, &stream);
    let small = unsafe { Workspace::from_raw(full.ptr(), needed - 1) };
    let e = gpu.launch_backward(&stream, &bwd, Some(small)).unwrap_err();
    assert!(matches!(e, AttnError::Workspace { .. }), "{e}");
    let shifted = unsafe { Workspace::from_raw(full.ptr() + 16, needed) };
    let e = gpu.launch_backward(&stream, &bwd, Some(shifted)).unwrap_err();
    assert!(matches!(e, AttnError::Pointer { tensor: "workspace", .. }), "{e}");
    // Offsets whose lengths disagree, and host-side options in a device call.
    let (vp, _) = Problem::new(&stream, varlen_case());
    let mut dev = vp.device();
    let vl = dev.varlen.as_mut().unwrap();
    let short = unsafe { DeviceView::contiguous(vl.cu_seqlens_k.ptr(), DeviceDType::I32, &[3]) };
    vl.cu_seqlens_k = &short;
    let e = gpu.launch_forward(&stream, &ForwardArgs { device: dev, ..vp.forward() }, None).unwrap_err();
    assert!(matches!(e, AttnError::Shape { tensor: "cu_seqlens_k", .. }), "{e}");
    let host_opts = AttnOptions::new().varlen(vec![0, 64], vec![0, 64]);
    let e = run(&ForwardArgs { opts: &host_opts, ..fwd });
    assert!(matches!(e, AttnError::Unsupported { .. }), "{e}");
    // Nothing above ran: the outputs still hold their poison.
    stream.synchronize().unwrap();
    assert!(bf16s(&stream, &p.out.0, 16).iter().all(|x| x.is_nan()));
}
