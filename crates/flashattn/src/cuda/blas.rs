//! Matrix products through cuBLAS: the GPU's matrix-rate ceiling, measured in the same run as attention.

use super::{driver_err, Gpu};
use crate::error::{AttnError, Result};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use half::bf16;
use std::time::Instant;

impl Gpu {
    /// cuBLAS on this GPU's stream (one handle per GPU: creating one costs more than a small product).
    pub(crate) fn blas(&self) -> Result<&CudaBlas> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        let b = CudaBlas::new(self.stream.clone()).map_err(|e| AttnError::Cuda(format!("cuBLAS: {e:?}")))?;
        Ok(self.blas.get_or_init(|| b))
    }

    /// bf16 GEMM throughput (n x n x n, f32 accumulation) in TFLOP/s: median of `reps` timed calls after a
    /// warm-up, on random data (zeros run measurably faster).
    pub fn matmul_tflops(&self, n: usize, reps: usize) -> Result<f64> {
        let blas = self.blas()?;
        let host: Vec<bf16> =
            (0..n * n).map(|i| bf16::from_f32((((i * 2654435761) % 1000) as f32 / 500.0) - 1.0)).collect();
        let a = self.stream.clone_htod(&host).map_err(driver_err("copying to the GPU"))?;
        let b = self.stream.clone_htod(&host).map_err(driver_err("copying to the GPU"))?;
        let mut c = self.stream.alloc_zeros::<bf16>(n * n).map_err(driver_err("allocating GPU memory"))?;
        let cfg = GemmConfig {
            transa: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
            transb: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: n as i32,
            k: n as i32,
            alpha: bf16::ONE,
            lda: n as i32,
            ldb: n as i32,
            beta: bf16::ZERO,
            ldc: n as i32,
        };
        let mut run = || -> Result<f64> {
            let t = Instant::now();
            // SAFETY: a, b and c are n x n buffers on this GPU.
            unsafe { blas.gemm(cfg, &a, &b, &mut c) }.map_err(|e| AttnError::Cuda(format!("cuBLAS gemm: {e:?}")))?;
            self.synchronize()?;
            Ok(t.elapsed().as_secs_f64())
        };
        run()?;
        let mut times = (0..reps.max(1)).map(|_| run()).collect::<Result<Vec<f64>>>()?;
        times.sort_by(f64::total_cmp);
        Ok(2.0 * (n as f64).powi(3) / times[times.len() / 2] / 1e12)
    }
}
