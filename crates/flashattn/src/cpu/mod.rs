//! Flash attention on the CPU: tiled, online softmax, recomputation in the backward pass, all cores.
//!
//! Work is split into tasks of (sequence, key/value head, chunk of rows) run by rayon; each task's inner
//! kernels are compiled once per instruction set (AVX-512, AVX2+FMA, portable; AMX for the bf16 forward) and
//! picked at run time.

#[cfg(target_arch = "x86_64")]
mod amx;
mod backward;
mod forward;
mod gemm;
mod pack;
mod scores;
mod simd;
mod simd_portable;
#[cfg(target_arch = "x86_64")]
mod simd_x86;

use crate::dtype::Element;
use crate::error::{AttnError, Result};
use crate::problem::Plan;
use crate::reference::SharedMut;
use crate::tensor::{Qkv, TensorRef};
use rayon::prelude::*;

use simd_portable::Portable;
#[cfg(target_arch = "x86_64")]
use simd_x86::{Avx2, Avx512};
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// The instruction set the CPU kernels run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust the compiler vectorizes for the build target: runs on any CPU.
    Portable,
    /// x86-64 AVX2 with FMA.
    Avx2,
    /// x86-64 AVX-512F.
    Avx512,
    /// x86-64 AVX-512F with AMX-BF16 tiles: the forward pass of bf16 inputs runs its two products on AMX
    /// (probabilities rounded to bf16 for the P V product); everything else runs the AVX-512F kernels.
    Amx,
}

impl Isa {
    /// Every set, fastest first.
    pub const ALL: [Isa; 4] = [Isa::Amx, Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// Whether this CPU can run the set.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => amx::is_supported(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The sets this CPU runs, fastest first.
    pub fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// The fastest supported set, unless the environment variable `FLASHATTN_CPU_ISA` names another
    /// (`portable`, `avx2`, `avx512`, `amx`): the switch that forces the portable kernels anywhere.
    pub fn detect() -> Result<Isa> {
        match std::env::var("FLASHATTN_CPU_ISA") {
            Ok(name) if !name.is_empty() && name != "auto" => {
                let isa: Isa = name.parse().map_err(|e: String| {
                    AttnError::option("FLASHATTN_CPU_ISA", "auto, portable, avx2, avx512 or amx", e)
                })?;
                isa.require()
            }
            _ => Ok(Isa::supported()[0]),
        }
    }

    /// This set, or an error saying the CPU lacks it.
    pub fn require(self) -> Result<Isa> {
        if self.is_supported() {
            Ok(self)
        } else {
            Err(AttnError::Unsupported {
                what: format!("CPU instruction set {self}"),
                why: format!("this CPU supports {:?}", Isa::supported()),
            })
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Amx => "amx",
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Isa {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "portable" => Ok(Isa::Portable),
            "avx2" => Ok(Isa::Avx2),
            "avx512" | "avx-512" => Ok(Isa::Avx512),
            "amx" => Ok(Isa::Amx),
            _ => Err(format!("unknown CPU instruction set '{s}': expected portable, avx2, avx512 or amx")),
        }
    }
}

/// One unit of parallel work: rows (queries in the forward pass, keys in the backward) of one sequence and one
/// key/value head (with all the query heads of its group). `chunk` numbers the key chunks of the backward pass.
#[derive(Clone, Debug)]
pub(crate) struct Task {
    seq: usize,
    head_kv: usize,
    rows: Range<usize>,
    chunk: usize,
}

/// Splits each (sequence, key/value head) into chunks of `lens[seq]` rows, in whole `block`s, with enough
/// chunks to keep every thread busy (about four tasks per thread). Returns the tasks, largest first (by rows
/// times the length `other` of the other side), and the number of chunks per head.
fn tasks(plan: &Plan, lens: &[usize], other: &[usize], block: usize) -> (Vec<Task>, usize) {
    let heads = plan.batch * plan.heads_kv;
    let threads = rayon::current_num_threads();
    let longest = lens.iter().copied().max().unwrap_or(0);
    let chunks = (4 * threads).div_ceil(heads).clamp(1, longest.div_ceil(block).max(1));
    let mut out = Vec::new();
    for (seq, &len) in lens.iter().enumerate() {
        let step = len.div_ceil(chunks).div_ceil(block).max(1) * block;
        for head_kv in 0..plan.heads_kv {
            // An empty sequence still gets a task: the other side's rows must be written (o = 0, dq = 0).
            for (chunk, start) in (0..len.max(1)).step_by(step).enumerate() {
                out.push(Task { seq, head_kv, rows: start..(start + step).min(len), chunk });
            }
        }
    }
    out.sort_by_key(|t| std::cmp::Reverse(t.rows.len() * other[t.seq]));
    (out, chunks)
}

/// The keys a forward task reads: those its rows see.
fn task_keys(plan: &Plan, task: &Task) -> Range<usize> {
    crate::mask::SeqMask::new(plan, task.seq).keys_of_rows(task.rows.clone())
}

/// Rows per chunk granularity of each pass, per instruction set.
fn forward_block(isa: Isa) -> usize {
    match isa {
        Isa::Portable => forward::block_m::<Portable>(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => forward::block_m::<Avx2>(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx => forward::block_m::<Avx512>(),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!(),
    }
}

/// Defines the per-set entry points of a task function: each compiles the generic task with the set's features.
macro_rules! entry_points {
    ($module:ident, $args:ident, $scratch:ident, $portable:ident, $avx2:ident, $avx512:ident) => {
        unsafe fn $portable<T: Element>(args: &$module::$args<T>, task: &Task, s: &mut $module::$scratch) {
            unsafe { $module::task::<Portable, T>(args, task, s) }
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2<T: Element>(args: &$module::$args<T>, task: &Task, s: &mut $module::$scratch) {
            unsafe { $module::task::<Avx2, T>(args, task, s) }
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $avx512<T: Element>(args: &$module::$args<T>, task: &Task, s: &mut $module::$scratch) {
            unsafe { $module::task::<Avx512, T>(args, task, s) }
        }
    };
}
entry_points!(forward, FwdArgs, Scratch, fwd_portable, fwd_avx2, fwd_avx512);
entry_points!(backward, BwdArgs, Scratch, bwd_portable, bwd_avx2, bwd_avx512);

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn fwd_amx<T: Element>(args: &forward::FwdArgs<T>, task: &Task, s: &mut forward::Scratch<amx::AmxOperands>) {
    unsafe {
        amx::configure_tiles();
        forward::task_with::<Avx512, amx::AmxOperands, T>(args, task, s);
        amx::release_tiles();
    }
}

/// Flash forward into `out` (q's shape, contiguous) and `lse`.
pub(crate) fn forward<T: Element>(
    plan: &Plan,
    isa: Isa,
    q: &TensorRef<T>,
    k: &TensorRef<T>,
    v: &TensorRef<T>,
    out: &mut [T],
    lse: &mut [f32],
) -> Result<()> {
    isa.require()?;
    let args = forward::FwdArgs { plan, q, k, v, out: SharedMut(out.as_mut_ptr()), lse: SharedMut(lse.as_mut_ptr()) };
    let (tasks, _) = tasks(plan, &plan.len_q, &plan.len_k, forward_block(isa));
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Amx && T::DTYPE == crate::dtype::DType::BF16 {
        tasks.par_iter().for_each_init(forward::Scratch::default, |scratch, task| {
            // SAFETY: as below.
            unsafe { fwd_amx(&args, task, scratch) }
        });
        return Ok(());
    }
    tasks.par_iter().for_each_init(forward::Scratch::default, |scratch, task| {
        // SAFETY: the set was checked above; tasks cover disjoint (sequence, head group, rows) of the outputs.
        unsafe {
            match isa {
                Isa::Portable => fwd_portable(&args, task, scratch),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => fwd_avx2(&args, task, scratch),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 | Isa::Amx => fwd_avx512(&args, task, scratch),
                #[cfg(not(target_arch = "x86_64"))]
                _ => unreachable!(),
            }
        }
    });
    Ok(())
}

/// Flash backward into dq (q's shape), dk and dv (k's shape), all contiguous.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Element>(
    plan: &Plan,
    isa: Isa,
    (q, k, v): Qkv<T>,
    o: &TensorRef<T>,
    lse: &[f32],
    dout: &TensorRef<T>,
    (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
) -> Result<()> {
    isa.require()?;
    let d = plan.head_dim;
    let (tasks, chunks) = tasks(plan, &plan.len_k, &plan.len_q, forward::BLOCK_N);
    // Row length of the dq slabs: the head dimension padded for the widest micro-kernel tile.
    let ld = pack::round_up(d, 32);
    let slab_len = plan.q_numel() / d.max(1) * ld;
    let mut slabs = if chunks > 1 { try_zeroed(chunks * slab_len, "the dq accumulator")? } else { Vec::new() };
    let dq_target = if chunks > 1 {
        backward::DqTarget::Slabs { ptr: SharedMut(slabs.as_mut_ptr()), len: slab_len, ld }
    } else {
        backward::DqTarget::Direct(SharedMut(dq.as_mut_ptr()))
    };
    let args = backward::BwdArgs {
        plan,
        q,
        k,
        v,
        o,
        dout,
        lse,
        o_acc: plan.access_like_q(o),
        dout_acc: plan.access_like_q(dout),
        dq: dq_target,
        dk: SharedMut(dk.as_mut_ptr()),
        dv: SharedMut(dv.as_mut_ptr()),
    };
    tasks.par_iter().for_each_init(backward::Scratch::default, |scratch, task| {
        // SAFETY: the set was checked above; tasks own disjoint keys of dk/dv and disjoint (slab, head) rows of dq.
        unsafe {
            match isa {
                Isa::Portable => bwd_portable(&args, task, scratch),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => bwd_avx2(&args, task, scratch),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 | Isa::Amx => bwd_avx512(&args, task, scratch),
                #[cfg(not(target_arch = "x86_64"))]
                _ => unreachable!(),
            }
        }
    });
    if chunks > 1 {
        let slabs = &slabs;
        dq.par_chunks_mut(d).enumerate().for_each(|(row, out)| {
            let at = row * ld;
            for (c, o) in out.iter_mut().enumerate() {
                *o = T::from_f32((0..chunks).map(|s| slabs[s * slab_len + at + c]).sum());
            }
        });
    }
    Ok(())
}

/// A zeroed f32 buffer, or an error instead of an abort when memory runs out.
fn try_zeroed(len: usize, what: &str) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| AttnError::OutOfMemory { what: what.into(), bytes: len * 4 })?;
    v.resize(len, 0.0);
    Ok(v)
}
