//! Gathering one head's rows from a strided input into f32 working buffers, in the layouts the kernel reads.

use crate::dtype::Element;
use crate::problem::Access;
use std::ops::Range;

/// Rounds `n` up to a multiple of `m`.
#[inline(always)]
pub(crate) fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// Resizes a scratch buffer to `len` zeroed elements, keeping its allocation.
#[inline(always)]
pub(crate) fn zeroed<E: Copy + Default>(buf: &mut Vec<E>, len: usize) -> &mut [E] {
    buf.clear();
    buf.resize(len, E::default());
    buf
}

/// Rows `rows` of head `head` of sequence `seq`, row-major with `ld >= d` floats a row (the padding zero).
#[inline(always)]
pub(crate) fn rows<T: Element>(
    src: &[T],
    acc: &Access,
    (seq, head): (usize, usize),
    rows: Range<usize>,
    d: usize,
    ld: usize,
    dst: &mut Vec<f32>,
) {
    let dst = zeroed(dst, rows.len() * ld);
    for (r, i) in rows.enumerate() {
        let base = acc.index(seq, i, head);
        for (o, x) in dst[r * ld..r * ld + d].iter_mut().zip(&src[base..base + d]) {
            *o = x.to_f32();
        }
    }
}

/// Rows `rows` transposed into panels of `nr` rows: `dst[p * d * nr + c * nr + n]` = element `c` of row
/// `rows.start + p * nr + n`. Rows past the end of the range are zero.
#[inline(always)]
pub(crate) fn panels<T: Element>(
    src: &[T],
    acc: &Access,
    (seq, head): (usize, usize),
    rows: Range<usize>,
    d: usize,
    nr: usize,
    dst: &mut Vec<f32>,
) {
    let dst = zeroed(dst, round_up(rows.len(), nr) * d);
    for (r, i) in rows.enumerate() {
        let base = acc.index(seq, i, head);
        let panel = &mut dst[(r / nr) * d * nr + r % nr..];
        for (c, x) in src[base..base + d].iter().enumerate() {
            panel[c * nr] = x.to_f32();
        }
    }
}
