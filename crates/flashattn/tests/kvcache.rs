//! Attention against a KV cache (`forward_kvcache`) checked against the f64 oracle run on each sequence's keys,
//! gathered here by hand: contiguous and paged caches (pages out of order, shared, of many sizes), ragged lengths
//! with 0 and 1, appended keys, masks, softcap, ALiBi and GQA ratios up to 32:1; on the CPU, and on the GPU when
//! one is usable. The caches must hold exactly the appended rows afterwards.

mod common;

use common::{check_close, max_abs, random_tensor, slack, Rng, Stored};
use flashattn::reference::{self, Precision};
use flashattn::{AttnError, AttnOptions, Backend, BlockTable, DType, Element, KvCache, Plan, TensorRef};
use half::{bf16, f16};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct DecodeCase {
    dtype: DType,
    /// Tokens in each sequence's cache before the new ones.
    seqlens: Vec<usize>,
    seqlen_q: usize,
    seqlen_new: usize,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    /// None: a contiguous cache.
    page_size: Option<usize>,
    /// Tokens a sequence's cache holds (a whole number of pages when paged).
    capacity: usize,
    /// Some sequences share their first page (only without appending).
    shared_pages: bool,
    causal: bool,
    window: (Option<usize>, Option<usize>),
    softcap: Option<f32>,
    alibi: bool,
    seed: u64,
}

impl DecodeCase {
    fn options(&self) -> AttnOptions {
        let mut o = AttnOptions::new().causal(self.causal).window(self.window.0, self.window.1);
        o.softcap = self.softcap;
        if self.alibi {
            o.alibi_slopes = Some((0..self.heads_q).map(|h| 0.5f32.powi(h as i32 % 8 + 1)).collect());
        }
        o
    }
}

/// A cache laid out for a case: its shape, block table (page indices of each sequence) and random contents.
struct Cache<T> {
    shape: [usize; 4],
    table: Option<Vec<i32>>,
    max_blocks: usize,
    k: Vec<T>,
    v: Vec<T>,
}

impl<T: Element> Cache<T> {
    fn new(case: &DecodeCase, rng: &mut Rng) -> Self {
        let batch = case.seqlens.len();
        let (shape, table, max_blocks) = match case.page_size {
            Some(page) => {
                let max_blocks = case.capacity / page;
                let num_blocks = batch * max_blocks + 3;
                // Pages in a random order, a few left unused.
                let mut pages: Vec<i32> = (0..num_blocks as i32).collect();
                for i in (1..pages.len()).rev() {
                    pages.swap(i, rng.below(i + 1));
                }
                let mut table = pages[..batch * max_blocks].to_vec();
                if case.shared_pages {
                    for b in (1..batch).step_by(2) {
                        table[b * max_blocks] = table[0];
                    }
                }
                ([num_blocks, page, case.heads_kv, case.head_dim], Some(table), max_blocks)
            }
            None => ([batch, case.capacity, case.heads_kv, case.head_dim], None, 1),
        };
        let k = random_tensor::<T>(rng, &shape, false).data;
        let v = random_tensor::<T>(rng, &shape, false).data;
        Cache { shape, table, max_blocks, k, v }
    }

    /// Element offset of token t of sequence b.
    fn row(&self, b: usize, t: usize) -> usize {
        let page_size = self.shape[1];
        let page = self.table.as_ref().map_or(b, |tb| tb[b * self.max_blocks + t / page_size] as usize);
        (page * page_size + t % page_size) * self.shape[2] * self.shape[3]
    }
}

fn run_case(case: &DecodeCase, backend: Backend) -> Result<(), TestCaseError> {
    match case.dtype {
        DType::F32 => run_typed::<f32>(case, backend),
        DType::F16 => run_typed::<f16>(case, backend),
        DType::BF16 => run_typed::<bf16>(case, backend),
    }
}

fn run_typed<T: Element>(case: &DecodeCase, backend: Backend) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(case.seed);
    let (batch, hq, hkv, d) = (case.seqlens.len(), case.heads_q, case.heads_kv, case.head_dim);
    let mut cache = Cache::<T>::new(case, &mut rng);
    let q = random_tensor::<T>(&mut rng, &[batch, case.seqlen_q, hq, d], false);
    // New keys and values with padded strides: the kernels must follow them.
    let k_new = random_tensor::<T>(&mut rng, &[batch, case.seqlen_new, hkv, d], true);
    let v_new = random_tensor::<T>(&mut rng, &[batch, case.seqlen_new, hkv, d], true);

    // The expected caches: the new rows written by hand.
    let row = hkv * d;
    let (mut want_k, mut want_v) = (cache.k.clone(), cache.v.clone());
    for b in 0..batch {
        for t in 0..case.seqlen_new {
            let at = cache.row(b, case.seqlens[b] + t);
            for h in 0..hkv {
                for x in 0..d {
                    let src = b * k_new.strides[0] + t * k_new.strides[1] + h * k_new.strides[2] + x;
                    want_k[at + h * d + x] = k_new.data[src];
                    want_v[at + h * d + x] = v_new.data[src];
                }
            }
        }
    }

    let seqlens: Vec<i32> = case.seqlens.iter().map(|&l| l as i32).collect();
    let opts = case.options();
    let (kn, vn) = (k_new.view(), v_new.view());
    let table = cache.table.clone();
    let kv = KvCache {
        k: &mut cache.k,
        v: &mut cache.v,
        shape: cache.shape,
        block_table: table.as_deref().map(|pages| BlockTable { pages, max_blocks: cache.max_blocks }),
        seqlens: &seqlens,
    };
    let new = (case.seqlen_new > 0).then_some((&kn, &vn));
    let got = flashattn::forward_kvcache(&q.view(), kv, new, &opts, backend)
        .map_err(|e| TestCaseError::fail(format!("{e} for {case:?}")))?;
    let same_bits = |a: &[T], b: &[T]| a.iter().zip(b).all(|(x, y)| x.to_f32().to_bits() == y.to_f32().to_bits());
    prop_assert!(
        same_bits(&cache.k, &want_k) && same_bits(&cache.v, &want_v),
        "the caches after appending differ for {case:?}"
    );

    // Each sequence on its own: its queries against its keys, gathered from the expected cache.
    for b in 0..batch {
        let len = case.seqlens[b] + case.seqlen_new;
        let gather = |src: &[T]| -> Vec<T> { (0..len).flat_map(|t| src[cache.row(b, t)..][..row].to_vec()).collect() };
        let (kb, vb) = (gather(&want_k), gather(&want_v));
        let q_len = case.seqlen_q * hq * d;
        let qb = Stored {
            data: q.data[b * q_len..][..q_len].to_vec(),
            shape: vec![1, case.seqlen_q, hq, d],
            strides: q.strides.clone(),
        };
        let kv_shape = [1, len, hkv, d];
        let (kr, vr, qr) = (TensorRef::new(&kb, &kv_shape), TensorRef::new(&vb, &kv_shape), qb.view());
        let plan = Plan::new(&qr, &kr, &vr, &opts, T::DTYPE).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let oracle = reference::forward(&plan, &qr, &kr, &vr, Precision::F64);
        let standard = reference::forward(&plan, &qr, &kr, &vr, Precision::Native);
        let out: Vec<f64> = got.out[b * q_len..][..q_len].iter().map(|x| x.to_f32() as f64).collect();
        let lse_len = hq * case.seqlen_q;
        let lse: Vec<f64> = got.lse[b * lse_len..][..lse_len].iter().map(|&x| x as f64).collect();
        let what = format!("sequence {b} of {case:?}");
        let common_case = common::Case::dense(1, case.seqlen_q, len, hq, hkv, d);
        let s = slack(T::DTYPE);
        check_close(
            &format!("out, {what}"),
            &common_case,
            &out,
            &oracle.out,
            &standard.out,
            2.0,
            s,
            max_abs(&oracle.out),
        )?;
        check_close(
            &format!("lse, {what}"),
            &common_case,
            &lse,
            &oracle.lse,
            &standard.lse,
            2.0,
            1e-6,
            max_abs(&oracle.lse),
        )?;
    }
    Ok(())
}

const HEAD_DIMS: [usize; 8] = [8, 32, 40, 64, 96, 128, 192, 256];

fn any_decode_case(dtypes: Vec<DType>) -> impl Strategy<Value = DecodeCase> {
    (
        (
            prop::sample::select(dtypes),
            1usize..5,
            prop_oneof![Just(1usize), 1usize..5, 1usize..40],
            prop_oneof![Just(0usize), Just(1), 1usize..5],
        ),
        (
            prop::sample::select(vec![(1usize, 1usize), (4, 1), (8, 2), (6, 3), (12, 4), (32, 1)]),
            prop::sample::select(HEAD_DIMS.to_vec()),
        ),
        (
            prop::sample::select(vec![0usize, 16, 32, 48, 256, 5]),
            any::<bool>(),
            0usize..5,
            any::<bool>(),
            any::<bool>(),
        ),
        any::<u64>(),
    )
        .prop_map(
            |(
                (dtype, batch, seqlen_q, seqlen_new),
                ((hq, hkv), d),
                (page, causal, window_kind, softcap, alibi),
                seed,
            )| {
                let mut rng = Rng::new(seed ^ 0xcace);
                let seqlens: Vec<usize> = (0..batch)
                    .map(|_| match rng.below(4) {
                        0 => rng.below(2),
                        1 => rng.below(40),
                        _ => rng.below(300),
                    })
                    .collect();
                let need = seqlens.iter().max().unwrap() + seqlen_new;
                let mut capacity = need.max(1) + rng.below(50);
                let page_size = (page > 0).then_some(page);
                if let Some(p) = page_size {
                    capacity = capacity.div_ceil(p) * p;
                }
                let window = match window_kind {
                    0 | 1 => (None, None),
                    2 => (Some(rng.below(60)), Some(rng.below(10))),
                    3 => (Some(rng.below(60)), None),
                    _ => (None, Some(rng.below(10))),
                };
                DecodeCase {
                    dtype,
                    seqlens,
                    seqlen_q,
                    seqlen_new,
                    heads_q: hq,
                    heads_kv: hkv,
                    head_dim: d,
                    page_size,
                    capacity,
                    shared_pages: page_size.is_some() && seqlen_new == 0 && seed % 2 == 0,
                    causal,
                    window,
                    softcap: softcap.then_some(2.0 + (seed % 30) as f32),
                    alibi,
                    seed,
                }
            },
        )
}

fn cases() -> u32 {
    std::env::var("FLASHATTN_TEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(32)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn cpu_kvcache_matches_the_oracle(case in any_decode_case(DType::ALL.to_vec())) {
        run_case(&case, Backend::cpu().unwrap())?;
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_kvcache_matches_the_oracle(case in any_decode_case(vec![DType::BF16, DType::F16])) {
        if let Some(backend) = common::gpu("gpu_kvcache_matches_the_oracle") {
            run_case(&case, backend)?;
        }
    }
}

/// Long caches, where the GPU splits the keys, and every page size from 16 to 256 at once.
#[test]
fn long_caches_and_page_sizes() {
    let mut backends = vec![Backend::cpu().unwrap()];
    #[cfg(feature = "cuda")]
    backends.extend(common::gpu("long_caches_and_page_sizes"));
    for backend in backends {
        for (page, hq, hkv, seqlen_q) in
            [(None, 32, 8, 1), (Some(16), 8, 2, 4), (Some(64), 32, 1, 1), (Some(256), 4, 4, 3)]
        {
            let case = DecodeCase {
                dtype: if matches!(backend, Backend::Cuda(_)) { DType::BF16 } else { DType::F32 },
                seqlens: vec![3000, 0, 1, 2047],
                seqlen_q,
                seqlen_new: 1,
                heads_q: hq,
                heads_kv: hkv,
                head_dim: 128,
                page_size: page,
                capacity: 3072,
                shared_pages: false,
                causal: true,
                window: (None, None),
                softcap: None,
                alibi: false,
                seed: 7,
            };
            run_case(&case, backend).unwrap();
        }
    }
}

#[test]
fn inconsistent_caches_are_typed_errors() {
    let (batch, hkv, d) = (2, 2, 16);
    let q = vec![0.0f32; batch * 4 * d];
    let qv = TensorRef::new(&q, &[batch, 1, 4, d]);
    let shape = [6, 16, hkv, d];
    let n = 6 * 16 * 3 * d;
    let (mut k, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let opts = AttnOptions::new();
    let mut run = |pages: &[i32], seqlens: &[i32], shape: [usize; 4]| {
        let cache = KvCache {
            k: &mut k[..shape.iter().product::<usize>()],
            v: &mut v[..shape.iter().product::<usize>()],
            shape,
            block_table: Some(BlockTable { pages, max_blocks: 2 }),
            seqlens,
        };
        flashattn::forward_kvcache(&qv, cache, None, &opts, Backend::cpu().unwrap()).map(|_| ())
    };
    assert!(run(&[0, 1, 2, 3], &[20, 32], shape).is_ok());
    let err = |r: Result<(), AttnError>| r.unwrap_err().to_string();
    assert!(err(run(&[0, 1, 2, 9], &[20, 32], shape)).contains("block_table"), "a page past the cache");
    assert!(err(run(&[0, 1, 2, 3], &[20, 33], shape)).contains("cache_seqlens"), "a length past the capacity");
    assert!(err(run(&[0, 1, 2, 3], &[-1, 3], shape)).contains("cache_seqlens"), "a negative length");
    assert!(err(run(&[0, 1, 2], &[20, 32], shape)).contains("block_table"), "a short table");
    assert!(err(run(&[0, 1, 2, 3], &[20], shape)).contains("cache_seqlens"), "lengths of another batch");
    assert!(err(run(&[0, 1, 2, 3], &[1, 1], [6, 16, 3, d])).contains("heads"), "heads that do not divide");
    let varlen = AttnOptions::new().varlen(vec![0, 1, 2], vec![0, 1, 2]);
    let len = shape.iter().product::<usize>();
    let cache = KvCache { k: &mut k[..len], v: &mut v[..len], shape, block_table: None, seqlens: &[1, 1] };
    let e = flashattn::forward_kvcache(&qv, cache, None, &varlen, Backend::cpu().unwrap()).unwrap_err();
    assert!(matches!(e, AttnError::Unsupported { .. }), "{e}");
}

/// The borrowed API on a caller's stream, captured in a CUDA graph with a caller workspace and replayed as a
/// serving loop does: each replay appends one token per sequence after the lengths were advanced in place.
#[cfg(feature = "cuda")]
#[test]
fn gpu_decode_steps_replay_in_a_graph() {
    use flashattn::cuda::cudarc::driver::{sys, DevicePtr};
    use flashattn::cuda::{DecodeArgs, DeviceDType, DeviceView, Gpu, Workspace};
    if common::gpu("gpu_decode_steps_replay_in_a_graph").is_none() {
        return;
    }
    let gpu = Gpu::open(0).unwrap();
    let stream = gpu.context().new_stream().unwrap();
    let (batch, hq, hkv, d, page) = (2, 8, 2, 64, 16);
    let case = DecodeCase {
        dtype: DType::BF16,
        seqlens: vec![700, 33],
        seqlen_q: 1,
        seqlen_new: 1,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        page_size: Some(page),
        capacity: 1024,
        shared_pages: false,
        causal: true,
        window: (None, None),
        softcap: None,
        alibi: false,
        seed: 5,
    };
    let mut rng = Rng::new(9);
    let mut cache = Cache::<bf16>::new(&case, &mut rng);
    let table = cache.table.clone().unwrap();
    let bits = |x: &[bf16]| x.iter().map(|v| v.to_bits()).collect::<Vec<u16>>();
    let (gk, gv) = (stream.clone_htod(&bits(&cache.k)).unwrap(), stream.clone_htod(&bits(&cache.v)).unwrap());
    let gtable = stream.clone_htod(&table).unwrap();
    let mut gseqlens = stream.clone_htod(&[700i32, 33]).unwrap();
    let q_shape = [batch, 1, hq, d];
    let new_shape = [batch, 1, hkv, d];
    let mut gq = stream.alloc_zeros::<u16>(batch * hq * d).unwrap();
    let (mut gkn, mut gvn) =
        (stream.alloc_zeros::<u16>(batch * hkv * d).unwrap(), stream.alloc_zeros::<u16>(batch * hkv * d).unwrap());
    let gout = stream.alloc_zeros::<u16>(batch * hq * d).unwrap();
    let glse = stream.alloc_zeros::<f32>(batch * hq).unwrap();
    // SAFETY (all views): the buffers above outlive every launch and the graph.
    let view = |addr: u64, dtype, shape: &[usize]| unsafe { DeviceView::contiguous(addr, dtype, shape) };
    let bf = DeviceDType::BF16;
    let (qv, kv, vv) = (
        view(gq.device_ptr(&stream).0, bf, &q_shape),
        view(gk.device_ptr(&stream).0, bf, &cache.shape),
        view(gv.device_ptr(&stream).0, bf, &cache.shape),
    );
    let (knv, vnv) = (view(gkn.device_ptr(&stream).0, bf, &new_shape), view(gvn.device_ptr(&stream).0, bf, &new_shape));
    let sv = view(gseqlens.device_ptr(&stream).0, DeviceDType::I32, &[batch]);
    let tv = view(gtable.device_ptr(&stream).0, DeviceDType::I32, &[batch, cache.max_blocks]);
    let (ov, lv) = (
        view(gout.device_ptr(&stream).0, bf, &q_shape),
        view(glse.device_ptr(&stream).0, DeviceDType::F32, &[batch, hq, 1]),
    );
    let opts = case.options();
    let args = DecodeArgs {
        q: &qv,
        k_cache: &kv,
        v_cache: &vv,
        cache_seqlens: &sv,
        block_table: Some(&tv),
        new: Some((&knv, &vnv)),
        out: &ov,
        lse: &lv,
        opts: &opts,
        alibi_slopes: None,
        num_splits: 0,
    };
    let bytes = gpu.decode_workspace_bytes(&args).unwrap();
    assert!(bytes > 0, "two sequences of two KV heads should split their keys");
    let mut ws = stream.alloc_zeros::<u8>(bytes).unwrap();
    let ws = Workspace::of_slice(&mut ws, &stream);
    gpu.prepare_decode(&args).unwrap();
    stream.synchronize().unwrap();
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL).unwrap();
    gpu.launch_decode(&stream, &args, Some(ws)).unwrap();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).unwrap().expect("a captured graph");

    let mut lens = [700usize, 33];
    for step in 0..3 {
        let q = random_tensor::<bf16>(&mut rng, &q_shape, false).data;
        let kn = random_tensor::<bf16>(&mut rng, &new_shape, false).data;
        let vn = random_tensor::<bf16>(&mut rng, &new_shape, false).data;
        stream.memcpy_htod(&bits(&q), &mut gq).unwrap();
        stream.memcpy_htod(&bits(&kn), &mut gkn).unwrap();
        stream.memcpy_htod(&bits(&vn), &mut gvn).unwrap();
        let lens32: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        stream.memcpy_htod(&lens32, &mut gseqlens).unwrap();
        graph.launch().unwrap();
        let out: Vec<u16> = stream.clone_dtoh(&gout).unwrap();
        // The same step on the CPU, on the host copy of the cache.
        let (qr, knr, vnr) =
            (TensorRef::new(&q, &q_shape), TensorRef::new(&kn, &new_shape), TensorRef::new(&vn, &new_shape));
        let want = flashattn::forward_kvcache(
            &qr,
            KvCache {
                k: &mut cache.k,
                v: &mut cache.v,
                shape: cache.shape,
                block_table: Some(BlockTable { pages: &table, max_blocks: cache.max_blocks }),
                seqlens: &lens32,
            },
            Some((&knr, &vnr)),
            &opts,
            Backend::cpu().unwrap(),
        )
        .unwrap();
        let err = out
            .iter()
            .zip(&want.out)
            .map(|(&a, b)| (bf16::from_bits(a).to_f32() - b.to_f32()).abs())
            .fold(0.0, f32::max);
        assert!(err < 2e-2, "step {step}: the replayed graph differs from the CPU by {err}");
        let gk_host: Vec<u16> = stream.clone_dtoh(&gk).unwrap();
        assert_eq!(gk_host, bits(&cache.k), "step {step}: the appended keys differ");
        lens.iter_mut().for_each(|l| *l += 1);
    }
}
