//! The kernels' parameter block: the same fields in the same order as `struct AttnParams` in common.cuh.

/// Device pointers are raw addresses (0 = null); strides are in elements.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AttnParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub dout: u64,
    pub out: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub lse: u64,
    pub delta: u64,
    pub dq_accum: u64,
    pub dq_semaphore: u64,
    pub cu_seqlens_q: u64,
    pub cu_seqlens_k: u64,
    pub alibi: u64,
    pub q_batch: i64,
    pub q_row: i64,
    pub q_head: i64,
    pub k_batch: i64,
    pub k_row: i64,
    pub k_head: i64,
    pub v_batch: i64,
    pub v_row: i64,
    pub v_head: i64,
    pub o_batch: i64,
    pub o_row: i64,
    pub o_head: i64,
    pub do_batch: i64,
    pub do_row: i64,
    pub do_head: i64,
    pub dk_batch: i64,
    pub dk_row: i64,
    pub dk_head: i64,
    pub lse_batch: i64,
    pub lse_head: i64,
    pub batch: i32,
    pub heads_q: i32,
    pub heads_kv: i32,
    pub head_dim: i32,
    pub seqlen_q: i32,
    pub seqlen_k: i32,
    pub window_left: i32,
    pub window_right: i32,
    pub alibi_batch_stride: i32,
    pub deterministic: i32,
    pub scale: f32,
    pub scale_log2: f32,
    pub softcap: f32,
}

// SAFETY: a plain C struct of integers and floats, passed by value as a kernel argument.
unsafe impl cudarc::driver::DeviceRepr for AttnParams {}

/// (batch, row, head) strides of a tensor: dense (batch, seq, head, dim) or variable-length (token, head, dim),
/// where the batch stride is unused.
pub(crate) fn strides3(strides: &[usize]) -> (i64, i64, i64) {
    match *strides {
        [b, s, h, _] => (b as i64, s as i64, h as i64),
        [t, h, _] => (0, t as i64, h as i64),
        _ => (0, 0, 0),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn layout_matches_the_cuda_struct() {
        // 16 pointers, 20 strides, 10 ints, 3 floats, padded to 8 bytes.
        assert_eq!(std::mem::size_of::<super::AttnParams>(), 16 * 8 + 20 * 8 + 10 * 4 + 3 * 4 + 4);
    }
}
