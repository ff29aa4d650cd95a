//! The attention problem: options, validation, and the plan every backend executes.
//!
//! Layout conventions (as FlashAttention's): q is (batch, seqlen_q, heads_q, head_dim), k and v are
//! (batch, seqlen_k, heads_kv, head_dim). A variable-length batch packs the sequences along the first dimension,
//! (total_tokens, heads, head_dim), with cumulative offsets `cu_seqlens` of length batch + 1.
//! The output o has q's logical shape, contiguous. The log-sum-exp is f32, (batch, heads_q, seqlen_q) for dense
//! batches and (heads_q, total_q) for variable-length ones.

use crate::dtype::DType;
use crate::error::{AttnError, Result};
use crate::tensor::{contiguous_strides, TensorLayout};

/// A sliding window, in tokens, around each query's diagonal: query i (aligned to the bottom-right corner) sees
/// keys j with `i + shift - left <= j <= i + shift + right`, where `shift = seqlen_k - seqlen_q`.
/// `None` on a side means unbounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    pub left: Option<usize>,
    pub right: Option<usize>,
}

impl Window {
    pub const UNBOUNDED: Window = Window { left: None, right: None };

    pub fn new(left: Option<usize>, right: Option<usize>) -> Self {
        Window { left, right }
    }
}

/// Cumulative sequence offsets of a variable-length batch (FlashAttention's varlen convention).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VarLen {
    pub cu_seqlens_q: Vec<i32>,
    pub cu_seqlens_k: Vec<i32>,
}

/// Everything about an attention call besides the tensors themselves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttnOptions {
    /// Causal mask, aligned to the bottom-right corner when seqlen_q != seqlen_k.
    pub causal: bool,
    /// Sliding window (combined with causal: the right side becomes 0).
    pub window: Window,
    /// Soft capping of the scores: `s = cap * tanh(s / cap)`. Must be positive when set.
    pub softcap: Option<f32>,
    /// ALiBi slopes, one per query head or one per (batch, query head): adds `-slope * |i + shift - j|`.
    pub alibi_slopes: Option<Vec<f32>>,
    /// Softmax scale; 1/sqrt(head_dim) when unset.
    pub scale: Option<f32>,
    /// Variable-length batch; q, k, v are then 3-dimensional.
    pub varlen: Option<VarLen>,
    /// Bit-for-bit reproducible backward pass (GPU; the CPU backward is always deterministic).
    pub deterministic: bool,
}

impl AttnOptions {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    pub fn window(mut self, left: Option<usize>, right: Option<usize>) -> Self {
        self.window = Window { left, right };
        self
    }
    pub fn softcap(mut self, cap: f32) -> Self {
        self.softcap = Some(cap);
        self
    }
    pub fn alibi_slopes(mut self, slopes: Vec<f32>) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
    pub fn varlen(mut self, cu_seqlens_q: Vec<i32>, cu_seqlens_k: Vec<i32>) -> Self {
        self.varlen = Some(VarLen { cu_seqlens_q, cu_seqlens_k });
        self
    }
    pub fn deterministic(mut self, deterministic: bool) -> Self {
        self.deterministic = deterministic;
        self
    }
}

/// How the sequences of a batch are given.
enum Seqs<'a> {
    /// A dense batch: every sequence has the tensors' lengths.
    Dense,
    /// Variable lengths from offsets on the host.
    Host(&'a VarLen),
    /// Variable lengths from offsets on the device, known to the host only by their maxima.
    Device { batch: usize, max_q: usize, max_k: usize },
}

/// Where one tensor's sequences live: element offset of each sequence's first token, and the token and head
/// strides (the head dimension is contiguous).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Access {
    pub seq_base: Vec<usize>,
    pub token: usize,
    pub head: usize,
}

impl Access {
    /// `units[seq] * strides[0]` locates a sequence; the token and head strides are the two before the last.
    fn new(units: &[usize], strides: &[usize]) -> Self {
        let r = strides.len();
        Access { seq_base: units.iter().map(|u| u * strides[0]).collect(), token: strides[r - 3], head: strides[r - 2] }
    }

    #[inline(always)]
    pub fn index(&self, seq: usize, token: usize, head: usize) -> usize {
        self.seq_base[seq] + token * self.token + head * self.head
    }
}

/// The resolved options of a validated problem, as the kernels consume them.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct MaskSpec {
    pub causal: bool,
    pub left: Option<usize>,
    pub right: Option<usize>,
    pub softcap: Option<f32>,
    /// Per (seq, head_q) slope, laid out seq-major; empty when ALiBi is off.
    pub alibi: Vec<f32>,
    /// ALiBi slopes given on the device instead (GPU calls): `alibi` is then empty.
    pub alibi_on_device: bool,
    pub scale: f32,
}

impl MaskSpec {
    /// Whether some query sees fewer than all keys: a causal mask or a window.
    pub fn masked(&self) -> bool {
        self.causal || self.left.is_some() || self.right.is_some()
    }

    /// Whether scores are transformed beyond the scale: softcap, ALiBi or a non-positive scale.
    pub fn modifies_scores(&self) -> bool {
        self.softcap.is_some() || !self.alibi.is_empty() || self.alibi_on_device || self.scale <= 0.0
    }
}

/// A validated problem: shapes, where every tensor's elements live, and the resolved options.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub(crate) dtype: DType,
    pub(crate) batch: usize,
    pub(crate) heads_q: usize,
    pub(crate) heads_kv: usize,
    pub(crate) head_dim: usize,
    pub(crate) len_q: Vec<usize>,
    pub(crate) len_k: Vec<usize>,
    pub(crate) varlen: bool,
    pub(crate) q: Access,
    pub(crate) k: Access,
    pub(crate) v: Access,
    /// Contiguous outputs: o (and dq) like q, dk and dv like k.
    pub(crate) o: Access,
    pub(crate) dkv: Access,
    pub(crate) lse: Access,
    pub(crate) mask: MaskSpec,
    pub(crate) deterministic: bool,
    q_numel: usize,
    kv_numel: usize,
    lse_len: usize,
    q_shape: Vec<usize>,
    kv_shape: Vec<usize>,
    units_q: Vec<usize>,
}

impl Plan {
    /// Validates q, k and v (and the options) and returns the plan for them.
    pub fn new(
        q: &impl TensorLayout,
        k: &impl TensorLayout,
        v: &impl TensorLayout,
        opts: &AttnOptions,
        dtype: DType,
    ) -> Result<Plan> {
        let seqs = match &opts.varlen {
            Some(vl) => Seqs::Host(vl),
            None => Seqs::Dense,
        };
        Plan::build(q, k, v, opts, dtype, seqs)
    }

    /// The plan of a GPU call whose variable-length offsets (and ALiBi slopes, `alibi_on_device`) live on the
    /// device: `varlen` is (batch, max_seqlen_q, max_seqlen_k). Each sequence's lengths are then known only as
    /// those maxima, and the per-sequence accesses are unset: only the GPU launches read such a plan.
    pub(crate) fn for_device(
        q: &impl TensorLayout,
        k: &impl TensorLayout,
        v: &impl TensorLayout,
        opts: &AttnOptions,
        dtype: DType,
        varlen: Option<(usize, usize, usize)>,
        alibi_on_device: bool,
    ) -> Result<Plan> {
        let seqs = match varlen {
            Some((batch, max_q, max_k)) => Seqs::Device { batch, max_q, max_k },
            None => Seqs::Dense,
        };
        let mut plan = Plan::build(q, k, v, opts, dtype, seqs)?;
        plan.mask.alibi_on_device = alibi_on_device;
        Ok(plan)
    }

    fn build(
        q: &impl TensorLayout,
        k: &impl TensorLayout,
        v: &impl TensorLayout,
        opts: &AttnOptions,
        dtype: DType,
        seqs: Seqs,
    ) -> Result<Plan> {
        let varlen = !matches!(seqs, Seqs::Dense);
        let rank = if varlen { 3 } else { 4 };
        let layout = if varlen {
            "(total_tokens, heads, head_dim) for a variable-length batch"
        } else {
            "(batch, seqlen, heads, head_dim)"
        };
        for (name, t) in [("q", q as &dyn TensorLayout), ("k", k), ("v", v)] {
            if t.shape().len() != rank {
                return Err(AttnError::shape(name, format!("{rank} dimensions {layout}"), t.shape()));
            }
            if t.strides().len() != rank {
                return Err(stride_error(name, t, format!("expected {rank} strides, got {}", t.strides().len())));
            }
        }
        let d = q.shape()[rank - 1];
        let (heads_q, heads_kv) = (q.shape()[rank - 2], k.shape()[rank - 2]);
        if d == 0 {
            return Err(AttnError::HeadDim { got: 0, expected: "a head dimension of at least 1".into() });
        }
        same("head_dim", ("q", d), ("k", k.shape()[rank - 1]))?;
        same("head_dim", ("q", d), ("v", v.shape()[rank - 1]))?;
        same("heads_kv", ("k", heads_kv), ("v", v.shape()[rank - 2]))?;
        same("seqlen (dimension 0 in varlen, 1 otherwise)", ("k", k.shape()[rank - 3]), ("v", v.shape()[rank - 3]))?;
        if heads_q == 0 || heads_kv == 0 || heads_q % heads_kv != 0 {
            return Err(AttnError::Gqa { heads_q, heads_kv });
        }
        for (name, t) in [("q", q as &dyn TensorLayout), ("k", k), ("v", v)] {
            check_strides(name, t)?;
        }

        // A sequence's first element sits at units[seq] * strides[0]: the sequence index for dense batches, its
        // first token for variable-length ones.
        let (batch, len_q, len_k, units_q, units_k, lse, lse_len);
        if let Seqs::Device { batch: b, max_q, max_k } = seqs {
            let (total_q, total_k) = (q.shape()[0], k.shape()[0]);
            if b == 0 {
                return Err(AttnError::CuSeqlens {
                    name: "cu_seqlens_q",
                    problem: "expected batch + 1 >= 2 offsets".into(),
                });
            }
            for (name, max, total) in [("max_seqlen_q", max_q, total_q), ("max_seqlen_k", max_k, total_k)] {
                if max > total {
                    return Err(AttnError::option(name, format!("at most the {total} tokens of the batch"), max));
                }
            }
            batch = b;
            len_q = vec![max_q; b];
            len_k = vec![max_k; b];
            units_q = vec![0; b];
            units_k = vec![0; b];
            lse = Access { seq_base: units_q.clone(), token: 1, head: total_q };
            lse_len = heads_q * total_q;
        } else if let Seqs::Host(vl) = seqs {
            let starts_q = validate_cu_seqlens("cu_seqlens_q", &vl.cu_seqlens_q, q.shape()[0])?;
            let starts_k = validate_cu_seqlens("cu_seqlens_k", &vl.cu_seqlens_k, k.shape()[0])?;
            same(
                "batch (cu_seqlens length - 1)",
                ("cu_seqlens_q", starts_q.len() - 1),
                ("cu_seqlens_k", starts_k.len() - 1),
            )?;
            batch = starts_q.len() - 1;
            len_q = starts_q.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>();
            len_k = starts_k.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>();
            units_q = starts_q[..batch].to_vec();
            units_k = starts_k[..batch].to_vec();
            let total_q = q.shape()[0];
            lse = Access { seq_base: units_q.clone(), token: 1, head: total_q };
            lse_len = heads_q * total_q;
        } else {
            batch = q.shape()[0];
            same("batch", ("q", batch), ("k", k.shape()[0]))?;
            same("batch", ("q", batch), ("v", v.shape()[0]))?;
            if batch == 0 {
                return Err(AttnError::shape("q", "a batch of at least one sequence", q.shape()));
            }
            let (sq, sk) = (q.shape()[1], k.shape()[1]);
            len_q = vec![sq; batch];
            len_k = vec![sk; batch];
            units_q = (0..batch).collect();
            units_k = units_q.clone();
            lse = Access { seq_base: (0..batch).map(|b| b * heads_q * sq).collect(), token: 1, head: sq };
            lse_len = batch * heads_q * sq;
        }
        let mask = mask_spec(opts, batch, heads_q, d)?;
        let q_shape = q.shape().to_vec();
        let kv_shape = k.shape().to_vec();
        Ok(Plan {
            dtype,
            batch,
            heads_q,
            heads_kv,
            head_dim: d,
            len_q,
            len_k,
            varlen,
            q: Access::new(&units_q, q.strides()),
            k: Access::new(&units_k, k.strides()),
            v: Access::new(&units_k, v.strides()),
            o: Access::new(&units_q, &contiguous_strides(q.shape())),
            dkv: Access::new(&units_k, &contiguous_strides(k.shape())),
            lse,
            mask,
            deterministic: opts.deterministic,
            q_numel: q_shape.iter().product(),
            kv_numel: kv_shape.iter().product(),
            lse_len,
            q_shape,
            kv_shape,
            units_q,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn batch(&self) -> usize {
        self.batch
    }
    pub fn heads_q(&self) -> usize {
        self.heads_q
    }
    pub fn heads_kv(&self) -> usize {
        self.heads_kv
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    pub fn seqlen_q(&self, seq: usize) -> usize {
        self.len_q[seq]
    }
    pub fn seqlen_k(&self, seq: usize) -> usize {
        self.len_k[seq]
    }
    pub fn scale(&self) -> f32 {
        self.mask.scale
    }
    /// Shape of o and dq (q's logical shape).
    pub fn q_shape(&self) -> &[usize] {
        &self.q_shape
    }
    /// Shape of dk and dv (k's logical shape).
    pub fn kv_shape(&self) -> &[usize] {
        &self.kv_shape
    }
    /// Elements of o and dq.
    pub fn q_numel(&self) -> usize {
        self.q_numel
    }
    /// Elements of dk and dv.
    pub fn kv_numel(&self) -> usize {
        self.kv_numel
    }
    /// Elements of the log-sum-exp.
    pub fn lse_len(&self) -> usize {
        self.lse_len
    }
    /// Shape of the log-sum-exp: (batch, heads_q, seqlen_q), or (heads_q, total_q) for a variable-length batch.
    pub fn lse_shape(&self) -> Vec<usize> {
        if self.varlen {
            vec![self.heads_q, self.q_shape[0]]
        } else {
            vec![self.batch, self.heads_q, self.q_shape[1]]
        }
    }
    /// Query heads sharing one key/value head.
    pub(crate) fn group(&self) -> usize {
        self.heads_q / self.heads_kv
    }

    /// Validates the extra inputs of the backward pass against this plan: o and dout like q, the log-sum-exp.
    pub(crate) fn check_backward_inputs(
        &self,
        o: &impl TensorLayout,
        lse_len: usize,
        dout: &impl TensorLayout,
    ) -> Result<()> {
        self.check_like_q("o", o)?;
        self.check_like_q("dout", dout)?;
        self.check_output("lse", lse_len, self.lse_len)
    }

    /// Validates a tensor that must have q's shape (any valid strides).
    pub(crate) fn check_like_q(&self, name: &'static str, t: &impl TensorLayout) -> Result<()> {
        if t.shape() != self.q_shape {
            return Err(AttnError::shape(name, format!("q's shape {:?}", self.q_shape), t.shape()));
        }
        if t.strides().len() != t.shape().len() {
            return Err(stride_error(
                name,
                t,
                format!("expected {} strides, got {}", t.shape().len(), t.strides().len()),
            ));
        }
        check_strides(name, t)
    }

    /// The access of o or dout as laid out in the caller's tensor.
    pub(crate) fn access_like_q(&self, t: &impl TensorLayout) -> Access {
        Access::new(&self.units_q, t.strides())
    }

    pub(crate) fn check_output(&self, name: &'static str, got: usize, expected: usize) -> Result<()> {
        if got != expected {
            return Err(AttnError::Shape {
                tensor: name,
                expected: format!("an output buffer of {expected} elements"),
                got: vec![got],
            });
        }
        Ok(())
    }
}

pub(crate) fn same(what: &'static str, a: (&'static str, usize), b: (&'static str, usize)) -> Result<()> {
    if a.1 != b.1 {
        return Err(AttnError::Mismatch { what, tensor_a: a.0, a: a.1, tensor_b: b.0, b: b.1 });
    }
    Ok(())
}

fn stride_error(name: &'static str, t: &(impl TensorLayout + ?Sized), problem: String) -> AttnError {
    AttnError::Stride {
        tensor: name,
        problem,
        shape: t.shape().to_vec(),
        strides: t.strides().to_vec(),
        len: t.buffer_len(),
    }
}

/// The last dimension is contiguous and every element lies inside the buffer.
pub(crate) fn check_strides(name: &'static str, t: &(impl TensorLayout + ?Sized)) -> Result<()> {
    if *t.strides().last().unwrap_or(&1) != 1 {
        return Err(stride_error(name, t, "the last (head_dim) dimension must be contiguous (stride 1)".into()));
    }
    if t.shape().contains(&0) {
        return Ok(());
    }
    let mut last = 0usize;
    for (&n, &s) in t.shape().iter().zip(t.strides()) {
        last = (n - 1)
            .checked_mul(s)
            .and_then(|x| x.checked_add(last))
            .ok_or_else(|| stride_error(name, t, "offsets overflow".into()))?;
    }
    if last >= t.buffer_len() {
        return Err(stride_error(name, t, format!("the last element is at offset {last}, past the end of the buffer")));
    }
    // Distinct (token, head) rows must not overlap, or results would be ambiguous: heads need at least head_dim.
    let r = t.shape().len();
    if t.shape()[r - 2] > 1 && t.strides()[r - 2] < t.shape()[r - 1] {
        return Err(stride_error(name, t, format!("the head stride must be at least head_dim = {}", t.shape()[r - 1])));
    }
    Ok(())
}

/// Validates cumulative offsets and returns them as start positions (length batch + 1).
pub(crate) fn validate_cu_seqlens(name: &'static str, cu: &[i32], total: usize) -> Result<Vec<usize>> {
    if cu.len() < 2 {
        return Err(AttnError::CuSeqlens {
            name,
            problem: format!("expected batch + 1 >= 2 offsets, got {}", cu.len()),
        });
    }
    if cu[0] != 0 {
        return Err(AttnError::CuSeqlens { name, problem: format!("must start at 0, starts at {}", cu[0]) });
    }
    if let Some(i) = cu.windows(2).position(|w| w[1] < w[0]) {
        return Err(AttnError::CuSeqlens {
            name,
            problem: format!("must not decrease, but entry {} is {} and entry {} is {}", i, cu[i], i + 1, cu[i + 1]),
        });
    }
    let last = *cu.last().unwrap() as usize;
    if last != total {
        return Err(AttnError::CuSeqlens {
            name,
            problem: format!("ends at {last} but the tensor holds {total} tokens"),
        });
    }
    Ok(cu.iter().map(|&c| c as usize).collect())
}

pub(crate) fn mask_spec(opts: &AttnOptions, batch: usize, heads_q: usize, d: usize) -> Result<MaskSpec> {
    let scale = opts.scale.unwrap_or(1.0 / (d as f32).sqrt());
    if !scale.is_finite() {
        return Err(AttnError::option("scale", "a finite number", scale));
    }
    if let Some(cap) = opts.softcap {
        if !(cap.is_finite() && cap > 0.0) {
            return Err(AttnError::option("softcap", "a finite positive number", cap));
        }
    }
    let alibi = match &opts.alibi_slopes {
        None => Vec::new(),
        Some(s) if s.len() == heads_q => (0..batch).flat_map(|_| s.iter().copied()).collect(),
        Some(s) if s.len() == batch * heads_q => s.clone(),
        Some(s) => {
            return Err(AttnError::option(
                "alibi_slopes",
                format!("heads_q = {heads_q} or batch * heads_q = {} slopes", batch * heads_q),
                format!("{} slopes", s.len()),
            ))
        }
    };
    if let Some(x) = alibi.iter().find(|x| !x.is_finite()) {
        return Err(AttnError::option("alibi_slopes", "finite slopes", x));
    }
    let right = if opts.causal { Some(0) } else { opts.window.right };
    Ok(MaskSpec {
        causal: opts.causal,
        left: opts.window.left,
        right,
        softcap: opts.softcap,
        alibi,
        alibi_on_device: false,
        scale,
    })
}
