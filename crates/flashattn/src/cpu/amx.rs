//! The forward pass's two products for bf16 inputs on Intel AMX: `tdpbf16ps` multiplies a 16 x 32 bf16 tile by a
//! 32 x 16 bf16 tile into a 16 x 16 f32 tile, 16x the work of an AVX-512 FMA per instruction. The softmax and
//! everything else stays on AVX-512 in f32.
//!
//! Operands are bf16 pairs along k, two to a 32-bit word (the lower half first), which is the layout AMX reads B
//! in: a B tile row is one k pair for 16 columns. A (queries, probabilities) is row-major bf16; k is padded with
//! zeros to whole tiles of 32. The queries, keys and values are bf16 already and pack exactly; the
//! probabilities P are rounded to bf16 (to nearest even) before the P V product, as the GPU kernels do.
//!
//! Tiles: 0-3 accumulate a 32 x 32 block of C, 4-5 hold two A tiles (32 rows), 6-7 two B tiles (32 columns).
//! AMX instructions are written as inline assembly: stable Rust has no AMX intrinsics.

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;

use super::forward::{FwdArgs, Operands, BLOCK_N};
use super::gemm::MatC;
use super::pack::{round_up, zeroed};
use super::simd::Simd;
use super::Task;
use crate::dtype::Element;

/// Rows of every tile.
const ROWS: usize = 16;
/// bf16 elements along k in an A tile (64 bytes a row), i.e. 16 pairs.
const TILE_K: usize = 32;
/// f32 columns of a C tile.
const COLS: usize = 16;

/// Whether this CPU has AMX-BF16 (with AVX-512F and AVX512-BF16, which the kernels around it use) and the
/// operating system lets this process use the tile registers.
pub(crate) fn is_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        let leaf7 = __cpuid_count(7, 0);
        let amx = leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0;
        amx && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bf16")
            && request_tile_state()
    })
}

/// Asks Linux for the (large) tile register state, which a process must request before its first AMX
/// instruction: `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`. The grant covers every thread.
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a system call that only changes this process's permissions; it clobbers rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// The tile configuration `ldtilecfg` reads: palette 1, all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// Configures this thread's tiles. Pair with [`release_tiles`].
///
/// # Safety
/// [`is_supported`] returned true.
pub(crate) unsafe fn configure_tiles() {
    let mut config = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
    for t in 0..8 {
        config.bytes_per_row[t] = 64;
        config.rows[t] = ROWS as u8;
    }
    unsafe { asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
}

/// Returns the tiles to their initial state, so the thread stops carrying their register state.
///
/// # Safety
/// [`is_supported`] returned true.
pub(crate) unsafe fn release_tiles() {
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

macro_rules! tile_load {
    ($tile:literal, $ptr:expr, $stride:expr) => {
        asm!(concat!("tileloadd tmm", $tile, ", [{p} + {s}*1]"), p = in(reg) $ptr, s = in(reg) $stride,
            options(nostack, readonly))
    };
}
macro_rules! tile_store {
    ($tile:literal, $ptr:expr, $stride:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $tile), p = in(reg) $ptr, s = in(reg) $stride,
            options(nostack))
    };
}
macro_rules! tile_zero {
    ($tile:literal) => {
        asm!(concat!("tilezero tmm", $tile), options(nostack, nomem))
    };
}
macro_rules! tile_dot {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b), options(nostack, nomem))
    };
}

/// A bf16 matrix as tiles: the tile of rows `16 r..`, k `32 kc..` (A), or of k pairs `16 kc..` and columns
/// `16 j..` (B) starts at `ptr + r (or kc) * tile_stride + kc (or j) * 16` words; rows are `stride` words apart.
#[derive(Clone, Copy)]
struct Tiles {
    ptr: *const u32,
    stride: usize,
    tile_stride: usize,
}

impl Tiles {
    #[inline(always)]
    unsafe fn at(self, outer: usize, inner: usize) -> *const u32 {
        unsafe { self.ptr.add(outer * self.tile_stride + inner * COLS) }
    }
}

/// C (`row_tiles` x 16 rows, n columns; n a multiple of 32) = (C if `add`, else 0) +
/// A B over `k_tiles` tiles of 32 along k.
///
/// # Safety
/// The tiles are configured; every tile read or written lies within its buffer.
#[inline(always)]
unsafe fn product(row_tiles: usize, n: usize, k_tiles: usize, a: Tiles, b: Tiles, c: MatC, add: bool) {
    let (ldc, sa, sb, sc) = (c.rs, a.stride * 4, b.stride * 4, c.rs * 4);
    unsafe {
        for r in (0..row_tiles).step_by(2) {
            let two = r + 1 < row_tiles;
            for j in (0..n / COLS).step_by(2) {
                let c0 = c.ptr.add(r * ROWS * ldc + j * COLS);
                let c1 = c0.add(ROWS * ldc);
                if add {
                    tile_load!(0, c0, sc);
                    tile_load!(1, c0.add(COLS), sc);
                    if two {
                        tile_load!(2, c1, sc);
                        tile_load!(3, c1.add(COLS), sc);
                    }
                } else {
                    tile_zero!(0);
                    tile_zero!(1);
                    tile_zero!(2);
                    tile_zero!(3);
                }
                for kc in 0..k_tiles {
                    tile_load!(4, a.at(r, kc), sa);
                    tile_load!(6, b.at(kc, j), sb);
                    tile_load!(7, b.at(kc, j + 1), sb);
                    tile_dot!(0, 4, 6);
                    tile_dot!(1, 4, 7);
                    if two {
                        tile_load!(5, a.at(r + 1, kc), sa);
                        tile_dot!(2, 5, 6);
                        tile_dot!(3, 5, 7);
                    }
                }
                tile_store!(0, c0, sc);
                tile_store!(1, c0.add(COLS), sc);
                if two {
                    tile_store!(2, c1, sc);
                    tile_store!(3, c1.add(COLS), sc);
                }
            }
        }
    }
}

/// Queries (row-major), keys (panels of 32 keys) and values (row-major over key pairs) as bf16 pairs, and the
/// block's probabilities.
#[derive(Default)]
pub(crate) struct AmxOperands {
    q: Vec<u32>,
    kt: Vec<u32>,
    v: Vec<u32>,
    p: Vec<u32>,
}

/// Keys per panel of the packed keys: the forward pass's column granularity (two AVX-512 vectors).
const NR: usize = 32;
/// Words per row of the probabilities: a whole block of keys, in pairs.
const P_STRIDE: usize = BLOCK_N / 2;

/// The bf16 bits of `x` (exact when `T` is bf16), in the lower half of a word.
#[inline(always)]
fn bits<T: Element>(x: T) -> u32 {
    half::bf16::from_f32(x.to_f32()).to_bits() as u32
}

/// Words per packed query or key row: the head dimension in pairs, padded to whole tiles along k.
fn row_words(d: usize) -> usize {
    round_up(d, TILE_K) / 2
}

impl Operands for AmxOperands {
    const ROW_ALIGN: usize = ROWS;

    fn pack_kv<S: Simd, T: Element>(&mut self, args: &FwdArgs<T>, task: &Task, keys: Range<usize>) {
        debug_assert_eq!(2 * S::W, NR);
        let (plan, d) = (args.plan, args.plan.head_dim);
        let (dw, ld) = (row_words(d), round_up(d, NR));
        let padded = round_up(keys.len(), NR);
        let kt = zeroed(&mut self.kt, padded * dw);
        let v = zeroed(&mut self.v, padded / 2 * ld);
        for (r, key) in keys.enumerate() {
            let kb = plan.k.index(task.seq, key, task.head_kv);
            let vb = plan.v.index(task.seq, key, task.head_kv);
            let panel = (r / NR) * dw * NR + r % NR;
            for c in 0..d {
                kt[panel + (c / 2) * NR] |= bits(args.k.data[kb + c]) << (16 * (c % 2));
                v[(r / 2) * ld + c] |= bits(args.v.data[vb + c]) << (16 * (r % 2));
            }
        }
    }

    fn pack_q<T: Element>(&mut self, args: &FwdArgs<T>, seq: usize, head: usize, rows: Range<usize>) {
        let d = args.plan.head_dim;
        let dw = row_words(d);
        let q = zeroed(&mut self.q, round_up(rows.len(), ROWS) * dw);
        for (r, i) in rows.enumerate() {
            let base = args.plan.q.index(seq, i, head);
            for c in 0..d {
                q[r * dw + c / 2] |= bits(args.q.data[base + c]) << (16 * (c % 2));
            }
        }
    }

    #[inline(always)]
    unsafe fn scores<S: Simd>(&self, m: usize, ncp: usize, d: usize, first: usize, s: &mut [f32]) {
        let dw = row_words(d);
        // One product per panel of 32 keys (`first` starts a panel): within it, B tile (kc, j) is k pairs
        // 16 kc.. of keys 16 j.., j = 0 or 1.
        let a = Tiles { ptr: self.q.as_ptr(), stride: dw, tile_stride: ROWS * dw };
        let panel = dw * NR;
        unsafe {
            for p in 0..ncp / NR {
                let b =
                    Tiles { ptr: self.kt.as_ptr().add((first / NR + p) * panel), stride: NR, tile_stride: COLS * NR };
                product(
                    m.div_ceil(ROWS),
                    NR,
                    dw * 2 / TILE_K,
                    a,
                    b,
                    MatC { ptr: s.as_mut_ptr().add(p * NR), rs: BLOCK_N },
                    false,
                );
            }
        }
    }

    #[inline(always)]
    unsafe fn accumulate<S: Simd>(
        &mut self,
        nc: usize,
        ld: usize,
        first: usize,
        s: &[f32],
        o: &mut [f32],
        corr: &[f32],
    ) {
        let m = corr.len();
        let n = round_up(nc, NR);
        for (r, &f) in corr.iter().enumerate() {
            for x in &mut o[r * ld..(r + 1) * ld] {
                *x *= f;
            }
        }
        unsafe {
            let p = zeroed(&mut self.p, round_up(m, ROWS) * P_STRIDE);
            round_rows(s, m, n, p);
            // `first` starts a panel of keys, so it is even: key pairs first / 2...
            let a = Tiles { ptr: p.as_ptr(), stride: P_STRIDE, tile_stride: ROWS * P_STRIDE };
            let b = Tiles { ptr: self.v.as_ptr().add(first / 2 * ld), stride: ld, tile_stride: ROWS * ld };
            product(m.div_ceil(ROWS), ld, n / TILE_K, a, b, MatC { ptr: o.as_mut_ptr(), rs: ld }, true);
        }
    }
}

/// Rounds columns `0..n` (a multiple of 32) of the first `m` rows of `s` (rows `BLOCK_N` apart) to bf16 pairs in
/// `out` (rows `P_STRIDE` words apart).
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_rows(s: &[f32], m: usize, n: usize, out: &mut [u32]) {
    debug_assert!(n <= BLOCK_N && s.len() >= m * BLOCK_N && out.len() >= m * P_STRIDE);
    unsafe {
        for r in 0..m {
            let (src, dst) = (s.as_ptr().add(r * BLOCK_N), out.as_mut_ptr().add(r * P_STRIDE));
            for t in (0..n).step_by(32) {
                let lo = _mm512_loadu_ps(src.add(t));
                let hi = _mm512_loadu_ps(src.add(t + 16));
                let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.add(t / 2).cast(), pairs);
            }
        }
    }
}
