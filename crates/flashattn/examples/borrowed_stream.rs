// The borrowed GPU API on memory and a stream that the caller creates: one causal forward call, queued on the
// caller's stream, then checked. With every input zero, every score is 0, so query row i (which sees keys
// 0..=i) has log-sum-exp ln(i + 1).
//
// This file is also the crate `.ci/embedding`, which CI builds beside cudarc's `dynamic-linking`.

use flashattn::cuda::cudarc::driver::CudaContext;
use flashattn::cuda::{DeviceDType, DeviceInputs, DeviceView, ForwardArgs, Gpu};
use flashattn::AttnOptions;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (b, s, h, d) = (1, 256, 4, 64);
    let gpu = Gpu::open(0)?;
    let stream = CudaContext::new(0)?.new_stream()?; // the device's primary context, as PyTorch's
    let x = stream.alloc_zeros::<u16>(b * s * h * d)?;
    let out = stream.alloc_zeros::<u16>(b * s * h * d)?;
    let lse = stream.alloc_zeros::<f32>(b * h * s)?;
    let qkv = DeviceView::of_slice(&x, &stream, DeviceDType::BF16, &[b, s, h, d]);
    let args = ForwardArgs {
        q: &qkv,
        k: &qkv,
        v: &qkv,
        out: &DeviceView::of_slice(&out, &stream, DeviceDType::BF16, &[b, s, h, d]),
        lse: &DeviceView::of_slice(&lse, &stream, DeviceDType::F32, &[b, h, s]),
        opts: &AttnOptions::new().causal(true),
        device: DeviceInputs::default(),
    };
    gpu.launch_forward(&stream, &args, None)?; // queued on `stream`
    let lse = stream.clone_dtoh(&lse)?; // waits for the call
    let worst = (0..b * h * s).map(|i| (lse[i] - ((i % s + 1) as f32).ln()).abs()).fold(0.0, f32::max);
    println!("forward on the caller's stream: log-sum-exp within {worst:.1e} of ln(i + 1)");
    if worst > 1e-4 {
        return Err(format!("log-sum-exp off by {worst}").into());
    }
    Ok(())
}
