//! Runs one forward call through the borrowed API on a stream and buffers created with cudarc directly.

use cudarc::driver::CudaContext;
use flashattn::cuda::{DeviceDType, DeviceInputs, DeviceView, ForwardArgs, Gpu};
use flashattn::AttnOptions;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (b, s, h, d) = (1, 256, 4, 64);
    let gpu = Gpu::open(0)?;
    let stream = CudaContext::new(0)?.new_stream()?;
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
    gpu.launch_forward(&stream, &args, None)?;
    stream.synchronize()?;
    Ok(())
}
