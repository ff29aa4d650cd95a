//! Shared test machinery: random problems, running a backend, and comparing against the f64 oracle with
//! FlashAttention's tolerance rule: error(ours) <= k * error(same-dtype standard attention) + slack.
#![allow(dead_code)]

use flashattn::reference::{self, Precision};
use flashattn::tensor::contiguous_strides;
use flashattn::{AttnOptions, Backend, DType, Element, Plan, TensorRef};
use half::{bf16, f16};
use proptest::prelude::*;

/// SplitMix64: fast, seedable, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// One randomly drawn attention problem.
#[derive(Clone, Debug)]
pub struct Case {
    pub dtype: DType,
    /// Per-sequence lengths; a dense batch when `varlen` is false (then all entries are equal).
    pub len_q: Vec<usize>,
    pub len_k: Vec<usize>,
    pub varlen: bool,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub window: (Option<usize>, Option<usize>),
    pub softcap: Option<f32>,
    pub alibi: bool,
    pub scale: Option<f32>,
    /// Lay q, k, v, o and dout out with padding between heads and tokens.
    pub strided: bool,
    pub seed: u64,
}

impl Case {
    pub fn dense(batch: usize, sq: usize, sk: usize, heads_q: usize, heads_kv: usize, d: usize) -> Case {
        Case {
            dtype: DType::F32,
            len_q: vec![sq; batch],
            len_k: vec![sk; batch],
            varlen: false,
            heads_q,
            heads_kv,
            head_dim: d,
            causal: false,
            window: (None, None),
            softcap: None,
            alibi: false,
            scale: None,
            strided: false,
            seed: 1,
        }
    }

    pub fn options(&self) -> AttnOptions {
        let mut o = AttnOptions::new().causal(self.causal).window(self.window.0, self.window.1);
        o.softcap = self.softcap;
        o.scale = self.scale;
        if self.alibi {
            o.alibi_slopes = Some((0..self.heads_q).map(|h| 0.5f32.powi(h as i32 % 8 + 1)).collect());
        }
        if self.varlen {
            o = o.varlen(cumsum(&self.len_q), cumsum(&self.len_k));
        }
        o
    }

    fn shape(&self, heads: usize, lens: &[usize]) -> Vec<usize> {
        if self.varlen {
            vec![lens.iter().sum(), heads, self.head_dim]
        } else {
            vec![lens.len(), lens[0], heads, self.head_dim]
        }
    }
    pub fn q_shape(&self) -> Vec<usize> {
        self.shape(self.heads_q, &self.len_q)
    }
    pub fn kv_shape(&self) -> Vec<usize> {
        self.shape(self.heads_kv, &self.len_k)
    }
}

pub fn cumsum(lens: &[usize]) -> Vec<i32> {
    std::iter::once(0)
        .chain(lens.iter().scan(0, |s, &l| {
            *s += l as i32;
            Some(*s)
        }))
        .collect()
}

/// A tensor's storage with its (possibly padded) strides.
pub struct Stored<T> {
    pub data: Vec<T>,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
}

impl<T> Stored<T> {
    pub fn view(&self) -> TensorRef<'_, T> {
        TensorRef::strided(&self.data, &self.shape, &self.strides)
    }
}

/// Random normal values (rounded to T), laid out with padding when `strided`.
pub fn random_tensor<T: Element>(rng: &mut Rng, shape: &[usize], strided: bool) -> Stored<T> {
    let r = shape.len();
    let mut strides = vec![1; r];
    let pad = if strided { [3usize, 5, 2] } else { [0, 0, 0] };
    // head stride >= head_dim + pad, token stride >= heads * head stride + pad, and so on outward.
    for i in (0..r - 1).rev() {
        strides[i] = strides[i + 1] * shape[i + 1] + pad[(r - 2 - i).min(2)];
    }
    let len = shape.iter().zip(&strides).map(|(&n, &s)| n.saturating_sub(1) * s).sum::<usize>() + 1;
    // Padding holds huge values: a kernel that reads it produces garbage the comparison catches.
    let mut data: Vec<T> = (0..len).map(|_| T::from_f32(if strided { 1e30 } else { 0.0 })).collect();
    let mut idx = vec![0usize; r];
    if shape.iter().all(|&n| n > 0) {
        loop {
            let off: usize = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
            data[off] = T::from_f32(rng.normal());
            let mut ax = r;
            loop {
                if ax == 0 {
                    return Stored { data, shape: shape.to_vec(), strides };
                }
                ax -= 1;
                idx[ax] += 1;
                if idx[ax] < shape[ax] {
                    break;
                }
                idx[ax] = 0;
            }
        }
    }
    Stored { data, shape: shape.to_vec(), strides }
}

/// Gathers a strided tensor into row-major f64.
pub fn to_f64<T: Element>(t: &Stored<T>) -> Vec<f64> {
    let r = t.shape.len();
    let n: usize = t.shape.iter().product();
    let mut out = Vec::with_capacity(n);
    for flat in 0..n {
        let mut rem = flat;
        let mut off = 0;
        for ax in (0..r).rev() {
            off += (rem % t.shape[ax]) * t.strides[ax];
            rem /= t.shape[ax];
        }
        out.push(t.data[off].to_f32() as f64);
    }
    out
}

pub struct Inputs<T> {
    pub q: Stored<T>,
    pub k: Stored<T>,
    pub v: Stored<T>,
    pub dout: Stored<T>,
}

pub fn inputs<T: Element>(case: &Case) -> Inputs<T> {
    let mut rng = Rng::new(case.seed);
    Inputs {
        q: random_tensor(&mut rng, &case.q_shape(), case.strided),
        k: random_tensor(&mut rng, &case.kv_shape(), case.strided),
        v: random_tensor(&mut rng, &case.kv_shape(), case.strided),
        dout: random_tensor(&mut rng, &case.q_shape(), case.strided),
    }
}

/// Largest absolute difference; positions where both are -inf agree, any other non-finite value is infinite error.
pub fn max_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            if x == y {
                0.0
            } else if x.is_finite() && y.is_finite() {
                (x - y).abs()
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
}

pub fn max_abs(a: &[f64]) -> f64 {
    a.iter().filter(|x| x.is_finite()).fold(0.0, |m, x| m.max(x.abs()))
}

/// error(ours) <= factor * error(standard) + slack * (1 + magnitude), magnitude the size of the values involved.
#[allow(clippy::too_many_arguments)]
pub fn check_close(
    what: &str,
    case: &Case,
    ours: &[f64],
    oracle: &[f64],
    standard: &[f64],
    factor: f64,
    slack: f64,
    magnitude: f64,
) -> Result<(), TestCaseError> {
    let (e_ours, e_std) = (max_err(ours, oracle), max_err(standard, oracle));
    let bound = factor * e_std + slack * (1.0 + magnitude);
    prop_assert!(
        e_ours <= bound,
        "{what}: error {e_ours:.3e} > bound {bound:.3e} (standard attention's error {e_std:.3e}) for {case:?}"
    );
    Ok(())
}

/// Slack per dtype, relative to the magnitude of the values compared: a few units of the dtype's roundoff
/// (rounding the result alone costs half a unit; the backward's D = rowsum(dO o O) sees o rounded too).
pub fn slack(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 4e-6,
        DType::F16 | DType::BF16 => 4.0 * dtype.epsilon(),
    }
}

/// Runs forward (and backward) on `backend` and checks against the oracle: o, lse, dq, dk, dv.
pub fn check_case(case: &Case, backend: Backend, with_backward: bool) -> Result<(), TestCaseError> {
    match case.dtype {
        DType::F32 => check_typed::<f32>(case, backend, with_backward),
        DType::F16 => check_typed::<f16>(case, backend, with_backward),
        DType::BF16 => check_typed::<bf16>(case, backend, with_backward),
    }
}

fn check_typed<T: Element>(case: &Case, backend: Backend, with_backward: bool) -> Result<(), TestCaseError> {
    let inp = inputs::<T>(case);
    let (q, k, v) = (inp.q.view(), inp.k.view(), inp.v.view());
    let opts = case.options();
    let plan = Plan::new(&q, &k, &v, &opts, T::DTYPE).map_err(|e| TestCaseError::fail(format!("{e}")))?;
    // Poisoned outputs: an element the kernel forgets stays NaN and fails the comparison.
    let mut out = vec![T::from_f32(f32::NAN); plan.q_numel()];
    let mut lse = vec![f32::NAN; plan.lse_len()];
    flashattn::forward_into(&q, &k, &v, &opts, backend, &mut out, &mut lse)
        .map_err(|e| TestCaseError::fail(format!("{e}")))?;
    if !with_backward {
        return check_outputs(case, &inp, &out, &lse, None);
    }
    // The backward consumes our own forward's o and lse, as a training step would.
    let o = Stored { data: out.clone(), shape: plan.q_shape().to_vec(), strides: contiguous_strides(plan.q_shape()) };
    let dout = inp.dout.view();
    let mut dq = vec![T::from_f32(f32::NAN); plan.q_numel()];
    let mut dk = vec![T::from_f32(f32::NAN); plan.kv_numel()];
    let mut dv = vec![T::from_f32(f32::NAN); plan.kv_numel()];
    flashattn::backward_into(&q, &k, &v, &o.view(), &lse, &dout, &opts, backend, (&mut dq, &mut dk, &mut dv))
        .map_err(|e| TestCaseError::fail(format!("{e}")))?;
    check_outputs(case, &inp, &out, &lse, Some((&dq, &dk, &dv)))
}

/// Checks a forward's o and lse (and a backward's dq, dk, dv, computed from that o and lse) for `case`'s
/// inputs against the f64 oracle, with standard attention in T as the yardstick.
pub fn check_outputs<T: Element>(
    case: &Case,
    inp: &Inputs<T>,
    out: &[T],
    lse: &[f32],
    grads: Option<(&[T], &[T], &[T])>,
) -> Result<(), TestCaseError> {
    let (q, k, v) = (inp.q.view(), inp.k.view(), inp.v.view());
    let opts = case.options();
    let plan = Plan::new(&q, &k, &v, &opts, T::DTYPE).map_err(|e| TestCaseError::fail(format!("{e}")))?;
    let oracle = reference::forward(&plan, &q, &k, &v, Precision::F64);
    let standard = reference::forward(&plan, &q, &k, &v, Precision::Native);
    let out64: Vec<f64> = out.iter().map(|x| x.to_f32() as f64).collect();
    let lse64: Vec<f64> = lse.iter().map(|&x| x as f64).collect();
    let s = slack(T::DTYPE);
    check_close("out", case, &out64, &oracle.out, &standard.out, 2.0, s, max_abs(&oracle.out))?;
    check_close("lse", case, &lse64, &oracle.lse, &standard.lse, 2.0, 1e-6, max_abs(&oracle.lse))?;
    let Some((dq, dk, dv)) = grads else { return Ok(()) };
    let dout = inp.dout.view();
    let oracle_g = reference::backward(&plan, &q, &k, &v, &dout, Precision::F64);
    let standard_g = reference::backward(&plan, &q, &k, &v, &dout, Precision::Native);
    let f = |x: &[T]| x.iter().map(|x| x.to_f32() as f64).collect::<Vec<f64>>();
    // Gradients are sums of terms as large as the largest gradient; cancellation leaves rounding of that size.
    let mag = max_abs(&oracle_g.dq).max(max_abs(&oracle_g.dk)).max(max_abs(&oracle_g.dv));
    check_close("dq", case, &f(dq), &oracle_g.dq, &standard_g.dq, 3.0, s, mag)?;
    check_close("dk", case, &f(dk), &oracle_g.dk, &standard_g.dk, 3.0, s, mag)?;
    check_close("dv", case, &f(dv), &oracle_g.dv, &standard_g.dv, 3.0, s, mag)?;
    Ok(())
}

/// Random cases: odd lengths, seqlen 1, Sq != Sk, GQA ratios, masks, softcap, ALiBi, varlen with empty
/// sequences, strides; sizes kept small enough for a few hundred cases a minute.
pub fn any_case(dtypes: Vec<DType>, head_dims: Vec<usize>) -> impl Strategy<Value = Case> {
    let lens = prop_oneof![Just(1usize), 1usize..20, 20usize..200, 190usize..330];
    (
        (
            prop::sample::select(dtypes),
            1usize..4,
            lens.clone(),
            lens,
            prop::sample::select(vec![(1usize, 1usize), (2, 1), (4, 2), (3, 3), (6, 2)]),
        ),
        (prop::sample::select(head_dims), any::<bool>(), 0usize..5, any::<bool>(), any::<bool>()),
        (any::<bool>(), any::<bool>(), any::<u64>(), 0usize..6),
    )
        .prop_map(
            |(
                (dtype, batch, sq, sk, (hq, hkv)),
                (d, causal, window_kind, softcap, alibi),
                (varlen, strided, seed, scale_kind),
            )| {
                let mut rng = Rng::new(seed ^ 0x5eed);
                let (len_q, len_k) = if varlen {
                    // Some sequences empty, lengths varied around the drawn ones.
                    let draw = |rng: &mut Rng, n: usize| if rng.below(5) == 0 { 0 } else { 1 + rng.below(n) };
                    let lq: Vec<usize> = (0..batch + 1).map(|_| draw(&mut rng, sq)).collect();
                    let lk: Vec<usize> = (0..batch + 1).map(|_| draw(&mut rng, sk)).collect();
                    (lq, lk)
                } else {
                    (vec![sq; batch], vec![sk; batch])
                };
                let window = match window_kind {
                    0 | 1 => (None, None),
                    2 => (Some(rng.below(40)), Some(rng.below(40))),
                    3 => (Some(rng.below(40)), None),
                    _ => (None, Some(rng.below(40))),
                };
                Case {
                    dtype,
                    len_q,
                    len_k,
                    varlen,
                    heads_q: hq,
                    heads_kv: hkv,
                    head_dim: d,
                    causal,
                    window,
                    softcap: softcap.then_some(2.0 + (seed % 30) as f32),
                    alibi,
                    scale: (scale_kind == 0).then_some(0.3),
                    strided,
                    seed,
                }
            },
        )
}

/// The GPU backend, or None after saying (once, past the test harness's output capture) why the test is skipped.
#[cfg(feature = "cuda")]
pub fn gpu(test: &str) -> Option<Backend> {
    if flashattn::cuda::is_available() {
        return Some(Backend::Cuda(0));
    }
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap();
    if !said.iter().any(|t| t == test) {
        said.push(test.to_string());
        let why =
            flashattn::cuda::device_count().err().map_or("no CUDA GPU or no NVRTC".to_string(), |e| e.to_string());
        let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("cuda test {test} SKIPPED: {why}\n"));
    }
    None
}
