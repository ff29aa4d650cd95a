//! Launches in thread-block clusters (sm_90), through the driver's extended launch: the CTAs of a cluster run at
//! once on neighbouring SMs and can reach each other's shared memory. (The Hopper forward launches here also
//! without clusters, as clusters of one.)

use super::driver_err;
use crate::error::Result;
use cudarc::driver::{sys, CudaFunction, CudaStream};
use std::ffi::c_void;

/// A launch of `grid` CTAs (a multiple of `cluster`) of `block` threads and `smem` bytes of dynamic shared memory,
/// in clusters of `cluster` CTAs along x.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    pub grid: u32,
    pub block: u32,
    pub smem: u32,
    pub cluster: u32,
}

impl Geometry {
    /// The driver's configuration of this launch on `stream`; `attr` must outlive its use.
    fn config(&self, stream: &CudaStream, attr: &mut sys::CUlaunchAttribute) -> sys::CUlaunchConfig {
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        // The union member this attribute id reads.
        attr.value.clusterDim.x = self.cluster;
        attr.value.clusterDim.y = 1;
        attr.value.clusterDim.z = 1;
        sys::CUlaunchConfig {
            gridDimX: self.grid,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: self.block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: self.smem,
            hStream: stream.cu_stream(),
            attrs: attr,
            numAttrs: 1,
        }
    }
}

/// How many clusters of `func` launched as `geometry` fit on the GPU at once (a persistent kernel launches no
/// more).
pub(super) fn max_active(func: &CudaFunction, stream: &CudaStream, geometry: Geometry) -> Result<usize> {
    // SAFETY: an all-zero attribute is a valid value of this plain C struct; `config` fills it in.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    let cfg = geometry.config(stream, &mut attr);
    let mut clusters = 0i32;
    // SAFETY: the configuration and its attribute live across the call; the function is loaded.
    unsafe { sys::cuOccupancyMaxActiveClusters(&mut clusters, func.cu_function(), &cfg) }
        .result()
        .map_err(driver_err("asking how many clusters fit"))?;
    Ok(clusters.max(0) as usize)
}

/// Launches `func` as `geometry` on `stream`.
///
/// # Safety
/// `args` point at the kernel's parameters, in order and of the kernel's types, alive until the call returns;
/// every pointer among them is valid for what the kernel does with it.
pub(super) unsafe fn launch(
    func: &CudaFunction,
    stream: &CudaStream,
    geometry: Geometry,
    args: &mut [*mut c_void],
) -> Result<()> {
    // SAFETY: as in `max_active`.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    let cfg = geometry.config(stream, &mut attr);
    // SAFETY: the caller vouches for the arguments; the configuration lives across the call.
    unsafe { sys::cuLaunchKernelEx(&cfg, func.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()) }
        .result()
        .map_err(driver_err("launching the forward kernel"))
}
