//! Borrowed host tensors: a slice with a shape and element strides.

/// A read-only view of a host tensor. The last dimension must be contiguous (stride 1); the others may have any
/// stride, so slices of larger tensors (a packed qkv projection, say) are read in place without copies.
#[derive(Clone, Debug)]
pub struct TensorRef<'a, T> {
    pub data: &'a [T],
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
}

/// Borrowed q, k and v.
pub(crate) type Qkv<'a, 'b, T> = (&'a TensorRef<'b, T>, &'a TensorRef<'b, T>, &'a TensorRef<'b, T>);

impl<'a, T> TensorRef<'a, T> {
    /// A row-major (C-contiguous) tensor of the given shape.
    pub fn new(data: &'a [T], shape: &[usize]) -> Self {
        TensorRef { data, shape: shape.to_vec(), strides: contiguous_strides(shape) }
    }

    /// A tensor with explicit strides, in elements.
    pub fn strided(data: &'a [T], shape: &[usize], strides: &[usize]) -> Self {
        TensorRef { data, shape: shape.to_vec(), strides: strides.to_vec() }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The layout of a tensor wherever its elements live (host or device): what validation needs.
pub trait TensorLayout {
    fn shape(&self) -> &[usize];
    /// Strides in elements, one per dimension.
    fn strides(&self) -> &[usize];
    /// Elements in the underlying buffer.
    fn buffer_len(&self) -> usize;
}

impl<T> TensorLayout for TensorRef<'_, T> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn strides(&self) -> &[usize] {
        &self.strides
    }
    fn buffer_len(&self) -> usize {
        self.data.len()
    }
}

/// Row-major strides of a shape.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// The tensor's elements in row-major order (a copy only when it is strided).
pub(crate) fn row_major<'a, T: crate::Element>(t: &'a TensorRef<T>) -> std::borrow::Cow<'a, [T]> {
    let n: usize = t.numel();
    if t.strides == contiguous_strides(&t.shape) {
        return std::borrow::Cow::Borrowed(&t.data[..n]);
    }
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; t.shape.len()];
    for _ in 0..n {
        let off: usize = idx.iter().zip(&t.strides).map(|(i, s)| i * s).sum();
        out.push(t.data[off]);
        for ax in (0..idx.len()).rev() {
            idx[ax] += 1;
            if idx[ax] < t.shape[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
    std::borrow::Cow::Owned(out)
}
