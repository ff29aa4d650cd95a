//! Flash attention on NVIDIA GPUs (sm_80 and newer): kernels compiled at run time by NVRTC for the GPU that is
//! present, cached on disk, launched through the driver API. Nothing of CUDA is needed to build; at run time the
//! driver (libcuda) and NVRTC (libnvrtc) are loaded, and their absence is an error, never a crash.
//!
//! Three layers, each a thin one over the next:
//! - the borrowed API: [`Gpu::launch_forward`] and [`Gpu::launch_backward`] on [`DeviceView`]s of the caller's
//!   memory, queued on the caller's stream, with scratch from a caller's [`Workspace`] or allocated on that
//!   stream; nothing is read back to the host, so after [`Gpu::prepare_forward`] / [`Gpu::prepare_backward`] a
//!   call can be captured in a CUDA graph;
//! - owned buffers ([`DeviceTensor`], [`Gpu::forward`], [`Gpu::backward`]) on the library's own stream;
//! - host slices (`Backend::Cuda` in [`crate::forward`]): upload, run, download.
//!
//! Layout: `gpu` (device, context, module store), `tensor` (views, workspaces, owned buffers), `call` (a call's
//! arguments and shared checks), `checks` (every argument check), `select` (the kernel decision), `kernels` (a
//! variant's tiles, defines and sources), `tuning` (every `FLASHATTN_*` override), `forward`, `backward` and
//! `decode` (launches), `host` (the owned and host-slice layers), `units` and `compile` (NVRTC, given the kernels' headers
//! as named headers, and its cache).
//!
//! Nothing here knows the approximations: they build on this module (`approx/cuda.rs`), with their kernels as an
//! auxiliary module (`Gpu::aux_module`) and their state (Linformer's projections) kept on their side.

mod backward;
mod blas;
mod call;
mod checks;
mod cluster;
pub mod compile;
mod decode;
mod forward;
mod gpu;
mod host;
pub mod kernels;
mod params;
mod select;
mod tensor;
mod tma;
mod tuning;
mod units;

pub use call::{BackwardArgs, DeviceInputs, DeviceVarLen, ForwardArgs};
/// The cudarc this crate is built with: its streams, buffers and graphs are the borrowed API's.
pub use cudarc;
pub use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
pub(crate) use decode::decode_host;
pub use decode::{DecodeArgs, MAX_DECODE_SPLITS};
pub use gpu::{device_count, driver_present, is_available, Gpu};
pub(crate) use host::{backward_host, forward_host};
pub use tensor::{DeviceDType, DeviceTensor, DeviceView, Workspace, WorkspaceFrom};
pub use units::{check_kernels, warm_cache, UnitReport};

pub(crate) use gpu::driver_err;
// What the modules built on this one (the GPU approximations) use.
pub(crate) use checks::{owned_aligned, owned_like_q, owned_output};
pub(crate) use params::strides3;
