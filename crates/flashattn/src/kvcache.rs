//! Attention of new queries against a key/value cache: decoding (one new token per sequence), speculative
//! decoding (a few) and chunked prefill (any number), as FlashAttention's `flash_attn_with_kvcache`.
//!
//! The cache holds keys and values either contiguously, (batch, capacity, heads_kv, head_dim), or in pages,
//! (num_blocks, page_size, heads_kv, head_dim) with a block table (batch, max_blocks) of page indices: token t of
//! sequence b lives in page `block_table[b][t / page_size]` at slot `t % page_size`. `seqlens[b]` tokens of
//! sequence b are in the cache; new keys and values, when given, are first written at positions
//! `seqlens[b]..seqlens[b] + seqlen_new`, and the queries then attend to all `seqlens[b] + seqlen_new` keys.
//! A causal mask or window is aligned to the bottom-right corner: the last query sits at the last key.
//!
//! The output has q's shape, (batch, seqlen_q, heads_q, head_dim), and the log-sum-exp is (batch, heads_q,
//! seqlen_q). On the GPU the borrowed API is `cuda::Gpu::launch_decode`.

use crate::dtype::Element;
use crate::error::{AttnError, Result};
use crate::problem::{check_strides, mask_spec, same, AttnOptions, MaskSpec};
use crate::tensor::{TensorLayout, TensorRef};
use crate::{Backend, Forward};

/// A paged cache's block table on the host: (batch, max_blocks) page indices, row-major.
#[derive(Clone, Copy, Debug)]
pub struct BlockTable<'a> {
    pub pages: &'a [i32],
    pub max_blocks: usize,
}

/// A key/value cache on the host. `k` and `v` are contiguous, each of `shape`: (batch, capacity, heads_kv,
/// head_dim), or with a block table (num_blocks, page_size, heads_kv, head_dim). They are written only when new
/// keys and values are appended.
pub struct KvCache<'a, T> {
    pub k: &'a mut [T],
    pub v: &'a mut [T],
    pub shape: [usize; 4],
    pub block_table: Option<BlockTable<'a>>,
    /// Tokens already in each sequence's cache, before the new ones.
    pub seqlens: &'a [i32],
}

/// The shapes of a decode call, validated, and its resolved options: what both the host and the GPU paths run.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DecodePlan {
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub seqlen_q: usize,
    /// New tokens appended per sequence (0: none).
    pub seqlen_new: usize,
    /// Tokens per page; for a contiguous cache, its capacity (a sequence is one page).
    pub page_size: usize,
    /// Pages in the cache (the batch, for a contiguous cache).
    pub num_pages: usize,
    /// Block table columns (1 for a contiguous cache).
    pub max_blocks: usize,
    pub paged: bool,
    pub mask: MaskSpec,
}

impl DecodePlan {
    /// Validates the shapes of q, the caches, the block table, the lengths and the new keys and values.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        q: &impl TensorLayout,
        k_cache: &impl TensorLayout,
        v_cache: &impl TensorLayout,
        block_table: Option<&[usize]>,
        seqlens_shape: &[usize],
        new: Option<(&dyn TensorLayout, &dyn TensorLayout)>,
        opts: &AttnOptions,
    ) -> Result<DecodePlan> {
        if opts.varlen.is_some() {
            return Err(AttnError::Unsupported {
                what: "AttnOptions::varlen with a KV cache".into(),
                why: "sequences are given by the cache's lengths (seqlens) instead".into(),
            });
        }
        let tensors: [(&'static str, &dyn TensorLayout); 3] = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)];
        for (name, t) in tensors {
            if t.shape().len() != 4 || t.strides().len() != 4 {
                let layout = if name == "q" {
                    "4 dimensions (batch, seqlen_q, heads_q, head_dim)"
                } else {
                    "4 dimensions (batch, capacity, heads_kv, head_dim) or (num_blocks, page_size, heads_kv, head_dim)"
                };
                return Err(AttnError::shape(name, layout, t.shape()));
            }
            check_strides(name, t)?;
        }
        let [batch, seqlen_q, heads_q, head_dim] = dims(q);
        let [blocks, rows, heads_kv, _] = dims(k_cache);
        if k_cache.shape() != v_cache.shape() {
            return Err(AttnError::shape("v_cache", format!("k_cache's shape {:?}", k_cache.shape()), v_cache.shape()));
        }
        if batch == 0 || seqlen_q == 0 {
            return Err(AttnError::shape("q", "at least one sequence and one query", q.shape()));
        }
        if head_dim == 0 {
            return Err(AttnError::HeadDim { got: 0, expected: "a head dimension of at least 1".into() });
        }
        same("head_dim", ("q", head_dim), ("k_cache", k_cache.shape()[3]))?;
        if heads_kv == 0 || heads_q % heads_kv != 0 {
            return Err(AttnError::Gqa { heads_q, heads_kv });
        }
        match seqlens_shape {
            &[n] => same("batch", ("q", batch), ("cache_seqlens", n))?,
            other => return Err(AttnError::shape("cache_seqlens", "1 dimension (batch)", other)),
        }
        let (page_size, max_blocks) = match block_table {
            Some(&[b, max_blocks]) => {
                same("batch", ("q", batch), ("block_table", b))?;
                if rows == 0 || max_blocks == 0 {
                    return Err(AttnError::shape(
                        "block_table",
                        "pages of at least one token, one per row",
                        &[b, max_blocks],
                    ));
                }
                (rows, max_blocks)
            }
            Some(other) => return Err(AttnError::shape("block_table", "2 dimensions (batch, max_blocks)", other)),
            None => {
                same("batch", ("q", batch), ("k_cache", blocks))?;
                (rows, 1)
            }
        };
        let seqlen_new = match new {
            Some((k, v)) => {
                for (name, t) in [("k", k), ("v", v)] {
                    let expected = [batch, t.shape().get(1).copied().unwrap_or(0), heads_kv, head_dim];
                    if t.shape().len() != 4 || t.shape() != expected || t.strides().len() != 4 {
                        return Err(AttnError::shape(
                            name,
                            format!("(batch, seqlen_new, heads_kv, head_dim) = {expected:?}"),
                            t.shape(),
                        ));
                    }
                    check_strides(name, t)?;
                }
                same("seqlen_new", ("k", k.shape()[1]), ("v", v.shape()[1]))?;
                k.shape()[1]
            }
            None => 0,
        };
        if seqlen_new > page_size * max_blocks {
            return Err(AttnError::option(
                "seqlen_new",
                format!("at most the cache's capacity, {}", page_size * max_blocks),
                seqlen_new,
            ));
        }
        Ok(DecodePlan {
            batch,
            heads_q,
            heads_kv,
            head_dim,
            seqlen_q,
            seqlen_new,
            page_size,
            num_pages: blocks,
            max_blocks,
            paged: block_table.is_some(),
            mask: mask_spec(opts, batch, heads_q, head_dim)?,
        })
    }

    /// Tokens each sequence's cache can hold.
    pub fn capacity(&self) -> usize {
        self.page_size * self.max_blocks
    }

    /// The output's shape: q's.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.seqlen_q, self.heads_q, self.head_dim]
    }

    /// The log-sum-exp's shape.
    pub fn lse_shape(&self) -> [usize; 3] {
        [self.batch, self.heads_q, self.seqlen_q]
    }

    /// Rows of one KV head's problem: its query heads times the new queries.
    #[cfg(feature = "cuda")]
    pub fn rows_per_kv_head(&self) -> usize {
        self.seqlen_q * (self.heads_q / self.heads_kv)
    }

    /// Checks lengths and page indices held on the host: every sequence's cache plus its new tokens fits the
    /// capacity, and each page it uses is a page of the cache.
    pub(crate) fn check_values(&self, seqlens: &[i32], table: Option<&[i32]>) -> Result<()> {
        for (b, &len) in seqlens.iter().enumerate() {
            if len < 0 || len as usize + self.seqlen_new > self.capacity() {
                return Err(AttnError::option(
                    "cache_seqlens",
                    format!("lengths from 0 to capacity - seqlen_new = {}", self.capacity() - self.seqlen_new),
                    format!("{len} for sequence {b}"),
                ));
            }
            let used = (len as usize + self.seqlen_new).div_ceil(self.page_size);
            if let Some(table) = table {
                let row = &table[b * self.max_blocks..][..used];
                if let Some((i, page)) = row.iter().enumerate().find(|(_, &p)| p < 0 || p as usize >= self.num_pages) {
                    return Err(AttnError::option(
                        "block_table",
                        format!("page indices below num_blocks = {}", self.num_pages),
                        format!("{page} at ({b}, {i})"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Where token t of sequence b lives in a contiguous host cache: the element offset of its row.
    fn row_offset(&self, table: Option<&[i32]>, b: usize, t: usize) -> usize {
        let page = table.map_or(b, |tb| tb[b * self.max_blocks + t / self.page_size] as usize);
        (page * self.page_size + t % self.page_size) * self.heads_kv * self.head_dim
    }
}

fn dims(t: &(impl TensorLayout + ?Sized)) -> [usize; 4] {
    let s = t.shape();
    [s[0], s[1], s[2], s[3]]
}

/// Attention of `q` (batch, seqlen_q, heads_q, head_dim) against `cache`, after appending `new` keys and values
/// (batch, seqlen_new, heads_kv, head_dim) to it when given. Options as for [`crate::forward`] (causal and
/// windows aligned bottom-right; `varlen` is refused).
pub fn forward_kvcache<T: Element>(
    q: &TensorRef<T>,
    cache: KvCache<'_, T>,
    new: Option<(&TensorRef<T>, &TensorRef<T>)>,
    opts: &AttnOptions,
    backend: Backend,
) -> Result<Forward<T>> {
    let shape = cache.shape.to_vec();
    let k_cache = TensorRef::new(&cache.k[..], &shape);
    let v_cache = TensorRef::new(&cache.v[..], &shape);
    let table_shape = cache.block_table.map(|t| [cache.seqlens.len(), t.max_blocks]);
    let new_layout = new.map(|(k, v)| (k as &dyn TensorLayout, v as &dyn TensorLayout));
    let plan = DecodePlan::new(
        q,
        &k_cache,
        &v_cache,
        table_shape.as_ref().map(|s| &s[..]),
        &[cache.seqlens.len()],
        new_layout,
        opts,
    )?;
    if let Some(t) = cache.block_table {
        if t.pages.len() != plan.batch * t.max_blocks {
            return Err(AttnError::shape(
                "block_table",
                format!("{} page indices (batch x max_blocks)", plan.batch * t.max_blocks),
                &[t.pages.len()],
            ));
        }
    }
    for (name, data) in [("k_cache", &cache.k), ("v_cache", &cache.v)] {
        if data.len() != shape.iter().product::<usize>() {
            return Err(AttnError::shape(name, format!("a contiguous buffer of {shape:?} elements"), &[data.len()]));
        }
    }
    let table = cache.block_table.map(|t| t.pages);
    plan.check_values(cache.seqlens, table)?;
    let mut out = vec![T::default(); plan.out_shape().iter().product()];
    let mut lse = vec![0.0f32; plan.lse_shape().iter().product()];
    match backend {
        #[cfg(feature = "cuda")]
        Backend::Cuda(ordinal) => {
            crate::cuda::decode_host(ordinal, &plan, q, cache, new, opts, (&mut out, &mut lse))?;
        }
        _ => {
            if let Some((k, v)) = new {
                append(&plan, table, cache.k, k, cache.seqlens);
                append(&plan, table, cache.v, v, cache.seqlens);
            }
            attend_gathered(
                &plan,
                q,
                (&*cache.k, &*cache.v),
                table,
                cache.seqlens,
                opts,
                backend,
                (&mut out, &mut lse),
            )?;
        }
    }
    Ok(Forward { out, out_shape: plan.out_shape().to_vec(), lse, lse_shape: plan.lse_shape().to_vec() })
}

/// Writes the new rows of one tensor (k or v) into its cache at each sequence's length.
fn append<T: Element>(plan: &DecodePlan, table: Option<&[i32]>, cache: &mut [T], new: &TensorRef<T>, seqlens: &[i32]) {
    for (b, &len) in seqlens.iter().enumerate() {
        for t in 0..plan.seqlen_new {
            let dst = plan.row_offset(table, b, len as usize + t);
            for h in 0..plan.heads_kv {
                let src = b * new.strides[0] + t * new.strides[1] + h * new.strides[2];
                cache[dst + h * plan.head_dim..][..plan.head_dim].copy_from_slice(&new.data[src..][..plan.head_dim]);
            }
        }
    }
}

/// The host backends: each sequence's keys and values gathered from the cache into a packed variable-length
/// batch, then the ordinary forward (the queries of a sequence are its rows, aligned bottom-right as here).
#[allow(clippy::too_many_arguments)]
fn attend_gathered<T: Element>(
    plan: &DecodePlan,
    q: &TensorRef<T>,
    (k_cache, v_cache): (&[T], &[T]),
    table: Option<&[i32]>,
    seqlens: &[i32],
    opts: &AttnOptions,
    backend: Backend,
    (out, lse): (&mut [T], &mut [f32]),
) -> Result<()> {
    let row = plan.heads_kv * plan.head_dim;
    let lens: Vec<usize> = seqlens.iter().map(|&l| l as usize + plan.seqlen_new).collect();
    let total_k: usize = lens.iter().sum();
    let (mut k, mut v) = (Vec::with_capacity(total_k * row), Vec::with_capacity(total_k * row));
    for (b, &len) in lens.iter().enumerate() {
        for t in 0..len {
            let at = plan.row_offset(table, b, t);
            k.extend_from_slice(&k_cache[at..][..row]);
            v.extend_from_slice(&v_cache[at..][..row]);
        }
    }
    let total_q = plan.batch * plan.seqlen_q;
    let q_packed = crate::tensor::row_major(q);
    let cu_q: Vec<i32> = (0..=plan.batch).map(|b| (b * plan.seqlen_q) as i32).collect();
    let cu_k: Vec<i32> = std::iter::once(0)
        .chain(lens.iter().scan(0, |acc, &l| {
            *acc += l as i32;
            Some(*acc)
        }))
        .collect();
    let opts = opts.clone().varlen(cu_q, cu_k);
    let qv = TensorRef::new(&q_packed, &[total_q, plan.heads_q, plan.head_dim]);
    let kv = TensorRef::new(&k, &[total_k, plan.heads_kv, plan.head_dim]);
    let vv = TensorRef::new(&v, &[total_k, plan.heads_kv, plan.head_dim]);
    // The packed log-sum-exp is (heads_q, total_q); this call's is (batch, heads_q, seqlen_q).
    let mut packed_lse = vec![0.0f32; plan.heads_q * total_q];
    crate::forward_into(&qv, &kv, &vv, &opts, backend, out, &mut packed_lse)?;
    for b in 0..plan.batch {
        for h in 0..plan.heads_q {
            for i in 0..plan.seqlen_q {
                lse[(b * plan.heads_q + h) * plan.seqlen_q + i] = packed_lse[h * total_q + b * plan.seqlen_q + i];
            }
        }
    }
    Ok(())
}
