//! The one error type of the library. Every message says what was expected and what was given.

use thiserror::Error;

/// Everything that can go wrong when describing or running an attention problem.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum AttnError {
    /// A tensor has the wrong number of dimensions or an impossible shape.
    #[error("{tensor}: expected {expected}, got shape {got:?}")]
    Shape { tensor: &'static str, expected: String, got: Vec<usize> },

    /// Two tensors disagree on a dimension they must share.
    #[error("{what}: {tensor_a} has {a} but {tensor_b} has {b}")]
    Mismatch { what: &'static str, tensor_a: &'static str, a: usize, tensor_b: &'static str, b: usize },

    /// Strides that would read outside the buffer, alias outputs, or break the contiguous last dimension.
    #[error("{tensor}: {problem} (shape {shape:?}, strides {strides:?}, buffer of {len} elements)")]
    Stride { tensor: &'static str, problem: String, shape: Vec<usize>, strides: Vec<usize>, len: usize },

    /// A head dimension no kernel supports.
    #[error("head_dim {got} is not supported: {expected}")]
    HeadDim { got: usize, expected: String },

    /// heads_q is not a multiple of heads_kv.
    #[error("grouped-query attention needs heads_q to be a multiple of heads_kv, got heads_q = {heads_q}, heads_kv = {heads_kv}")]
    Gqa { heads_q: usize, heads_kv: usize },

    /// Broken cumulative sequence offsets of a variable-length batch.
    #[error("{name}: {problem}")]
    CuSeqlens { name: &'static str, problem: String },

    /// An option with a value outside its domain.
    #[error("{option}: expected {expected}, got {got}")]
    Option { option: &'static str, expected: String, got: String },

    /// The combination of dtype, device and method is not available.
    #[error("{what} is not supported: {why}")]
    Unsupported { what: String, why: String },

    /// The GPU could not be used (no driver, no device, no NVRTC, a failed call).
    #[error("CUDA: {0}")]
    Cuda(String),

    /// A device address a call cannot use: null, misaligned, not device memory, or on another GPU.
    #[error("{tensor}: {problem}")]
    Pointer { tensor: &'static str, problem: String },

    /// An output whose memory overlaps an input or another output.
    #[error("{output} overlaps {other} in device memory: outputs must not alias the tensors of the same call")]
    Overlap { output: &'static str, other: &'static str },

    /// A caller-supplied workspace smaller than the call needs.
    #[error("workspace: the call needs {needed} bytes, {given} were given")]
    Workspace { needed: usize, given: usize },

    /// Not enough memory for a buffer the method needs.
    #[error("out of memory: {what} needs {bytes} bytes")]
    OutOfMemory { what: String, bytes: usize },
}

pub type Result<T, E = AttnError> = std::result::Result<T, E>;

impl AttnError {
    pub(crate) fn option(option: &'static str, expected: impl Into<String>, got: impl ToString) -> Self {
        AttnError::Option { option, expected: expected.into(), got: got.to_string() }
    }

    pub(crate) fn shape(tensor: &'static str, expected: impl Into<String>, got: &[usize]) -> Self {
        AttnError::Shape { tensor, expected: expected.into(), got: got.to_vec() }
    }

    /// `Backend::Cuda` asked of a build without the `cuda` feature.
    #[cfg(not(feature = "cuda"))]
    pub(crate) fn cuda_off() -> Self {
        AttnError::Unsupported { what: "the CUDA backend".into(), why: "this build has the `cuda` feature off".into() }
    }
}
