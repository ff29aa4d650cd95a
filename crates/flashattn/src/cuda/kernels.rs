//! The kernel variants: the portable family (sm_80+) and the Hopper family (sm_90a), each with a forward and a
//! backward: which source, which defines, which tiles.

use super::compile::Source;
use super::tuning::{extra_defines, tile_override, Tuned};
use crate::dtype::DType;
use crate::error::{AttnError, Result};
use std::borrow::Cow;

const FWD: &str = include_str!("kernels/flash_fwd.cu");
const BWD: &str = include_str!("kernels/flash_bwd.cu");
const FWD_SM90: &str = include_str!("kernels/flash_fwd_sm90.cu");
const BWD_SM90: &str = include_str!("kernels/flash_bwd_sm90.cu");
const DECODE: &str = include_str!("kernels/flash_decode.cu");

/// The kernels' headers, by the names the sources include them by.
const HEADERS: [(&str, &str); 4] = [
    ("elem.cuh", include_str!("kernels/elem.cuh")),
    ("common.cuh", include_str!("kernels/common.cuh")),
    ("hopper.cuh", include_str!("kernels/hopper.cuh")),
    ("bwd_common.cuh", include_str!("kernels/bwd_common.cuh")),
];

/// Every header a kernel source may include, as NVRTC named headers: each unit is given all of them (NVRTC reads
/// only those included), so the sources alone say what they include.
pub(crate) fn headers() -> Vec<(&'static str, Cow<'static, str>)> {
    HEADERS.iter().map(|&(name, text)| (name, Cow::Borrowed(text))).collect()
}

/// Largest head dimension the kernels take.
pub const MAX_HEAD_DIM: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    Forward,
    Backward,
    /// The forward of new queries against a KV cache (portable family only), with its combine and append kernels.
    Decode,
}

/// Which kernel design a variant is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// FlashAttention-2 design on mma.sync (sm_80 and newer), forward and backward.
    Portable,
    /// FlashAttention-3 design on TMA, wgmma and warp specialization (sm_90a only): the forward for head dims
    /// 64-256, the backward for 64-128.
    Hopper,
}

/// One compiled kernel module: family, pass, element type, padded head dimension and the two masking switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub family: Family,
    pub pass: Pass,
    pub dtype: DType,
    /// Head dimension rounded up to the tile width: a multiple of 32 (portable) or of 64 (Hopper).
    pub hdim: usize,
    /// Causal or sliding-window mask (per-block key ranges and masking of boundary blocks).
    pub masked: bool,
    /// Scores transformed beyond the scale: softcap, ALiBi or a non-positive scale.
    pub has_mod: bool,
    /// Compiled for sm_90 or sm_100 (`sm90_features`): the tiles tuned for their compilers, and the backward's
    /// dQ staged for bulk reductions.
    pub sm90: bool,
    /// The shared memory a block may have, where the default tiles need more (`Budget::Large` otherwise: see
    /// `Variant::within`).
    pub budget: Budget,
    /// At least `LONG_QUERIES` query rows, where larger tiles pay off; set only where it changes the tiles (see
    /// `Variant::for_queries`). For decode: more than 16 rows per KV head (queries x group), which take 32-row
    /// blocks (`DECODE_LONG_ROWS`).
    pub long: bool,
}

/// Shared memory per block: the opt-in limits of the GPU generations (sm_86, sm_89 and sm_120 99 KB; sm_80 and
/// sm_87 163 KB; sm_90 and sm_100 227 KB). Tiles are chosen for the budget of the GPU present (or a lower cap,
/// `FLASHATTN_SMEM_LIMIT_KB`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Budget {
    Small,
    Medium,
    Large,
}

impl Budget {
    pub fn bytes(self) -> usize {
        match self {
            Budget::Small => 99 << 10,
            Budget::Medium => 163 << 10,
            Budget::Large => 227 << 10,
        }
    }

    /// The largest budget within `bytes` (Small below 99 KB too: the kernels that do not fit are refused).
    pub fn within(bytes: usize) -> Budget {
        [Budget::Large, Budget::Medium].into_iter().find(|b| b.bytes() <= bytes).unwrap_or(Budget::Small)
    }

    /// The budget of an architecture's GPUs ("sm_86" -> Small).
    pub fn of_arch(arch: &str) -> Budget {
        match arch.trim_start_matches("sm_").trim_end_matches('a') {
            "80" | "87" => Budget::Medium,
            "90" | "100" => Budget::Large,
            _ => Budget::Small,
        }
    }

    /// The name a constrained variant carries ("-99k").
    fn suffix(self) -> String {
        format!("-{}k", self.bytes() >> 10)
    }
}

/// Query rows from which a problem counts as long (`Variant::long`).
pub const LONG_QUERIES: usize = 2048;

/// Decode: rows (query heads x new queries of one KV head) from which 32-row blocks are used (up to head dim 128,
/// where the accumulators of two m16 tiles fit the registers).
pub const DECODE_LONG_ROWS: usize = 17;

/// Forward tiles: query rows per CTA, key rows per shared-memory block, keys per softmax sub-block, warps, and
/// the unrolling of the Q K^T loop (0: full).
pub struct FwdTiles {
    pub block_m: usize,
    pub block_n: usize,
    pub sub_n: usize,
    pub warps: usize,
    pub s_unroll: usize,
}

/// Backward tiles: query rows per step and per register-bound sub-step, warps, and warps sharing a key group
/// (splitting dK/dV columns).
pub struct BwdTiles {
    pub block_m: usize,
    pub sub_m: usize,
    pub warps: usize,
    pub warps_d: usize,
}

impl BwdTiles {
    /// Keys per CTA: 16 per key group.
    pub fn block_n(&self) -> usize {
        16 * self.warps / self.warps_d
    }

    /// Warps sharing one 16-query group of the dQ product, each taking whole 16-column pairs of `hdim`: the
    /// largest divisor of hdim / 16 the warps allow.
    pub fn dq_parts(&self, hdim: usize) -> usize {
        let most = self.warps / (self.block_m / 16);
        (1..=most).rev().find(|p| (hdim / 16).is_multiple_of(*p)).unwrap_or(1)
    }
}

/// The padded head dimension for `d`, or why the kernels cannot take it.
pub fn padded_head_dim(d: usize) -> Result<usize> {
    if d == 0 || !d.is_multiple_of(8) || d > MAX_HEAD_DIM {
        return Err(AttnError::HeadDim { got: d, expected: format!("a multiple of 8 up to {MAX_HEAD_DIM} on CUDA") });
    }
    Ok(d.div_ceil(32) * 32)
}

/// Hopper forward tiles: consumer warpgroups (64 query rows each), key rows per block, the depth of the K/V
/// shared-memory ring, and the CTAs of a cluster, which take neighbouring query blocks of one head and share each
/// K/V block's load (TMA multicast).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HopperTiles {
    pub consumers: usize,
    pub block_n: usize,
    pub stages: usize,
    pub cluster: usize,
}

/// How the Hopper forward's consumers write O (the kernel's O_STAGING).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OStaging {
    /// Straight from the registers.
    Direct = 0,
    /// Through per-warp boxes in shared memory beside Q and the K/V ring, and TMA stores.
    Boxes = 1,
    /// The same through the warp's own rows of the Q tile.
    InQ = 2,
}

/// Shared memory a CTA may have on sm_90.
const SM90_SMEM: usize = 227 << 10;

/// The Hopper family's head dimension for `d` in `pass` (rounded up to a multiple of 64), or None when the
/// portable family takes it (decode always): below 64 the 64-column TMA box would be wider than the tensor, and above 128 the
/// backward's dK and dV do not fit a consumer's registers.
pub fn hopper_head_dim(d: usize, pass: Pass) -> Option<usize> {
    let max = match pass {
        Pass::Forward => MAX_HEAD_DIM,
        Pass::Backward => 128,
        Pass::Decode => return None,
    };
    ((64..=max).contains(&d) && d.is_multiple_of(8)).then(|| d.div_ceil(64) * 64)
}

/// Queries per step of the Hopper backward: 128 where the registers allow (S^T and dP^T are 64 x BLOCK_M per
/// consumer beside dK and dV), else 64. Its key blocks are 128 rows, its Q / dO ring 2 deep.
fn hopper_bwd_block_m(hdim: usize) -> usize {
    // The kernel takes 64 or 128 (other overrides are ignored).
    if let Some(&[block_m @ (64 | 128)]) = tile_override(Tuned::HopperBackward) {
        return block_m;
    }
    if hdim <= 64 {
        128
    } else {
        64
    }
}
const HOPPER_BWD_BLOCK_N: usize = 128;
const HOPPER_BWD_STAGES: usize = 2;

/// Whether GPUs of this major compute capability get the sm_90 tiles and bulk dQ reductions: Hopper (9) and
/// datacenter Blackwell (10); consumer Blackwell (12) has their instructions but a budget of 99 KB and
/// compilers whose register allocation the sm_80 tiles suit (the sm_90 d = 128 forward spills there).
pub fn sm90_features(major: i32) -> bool {
    (9..=10).contains(&major)
}

/// The define that selects the element type.
pub fn elem_define(dtype: DType) -> String {
    format!("-DELEM_BF16={}", (dtype == DType::BF16) as u8)
}

impl Variant {
    pub fn fwd_tiles(&self) -> FwdTiles {
        if let Some(&[block_m, block_n, sub_n, warps, s_unroll]) = tile_override(Tuned::PortableForward) {
            return FwdTiles { block_m, block_n, sub_n, warps, s_unroll };
        }
        let t = |block_m, block_n, sub_n, s_unroll| FwdTiles { block_m, block_n, sub_n, warps: 4, s_unroll };
        match (self.hdim, self.sm90, self.masked, self.has_mod) {
            (0..=64, ..) => t(128, 128, 64, 0),
            // Head dim 128 at the register limit: on sm_90, softmax over whole 64-key blocks (10% faster than
            // 32-key sub-blocks) where ptxas fits it without spills, with the unrolling that makes it fit; the
            // kernel check in CI holds every variant to that.
            (97..=128, true, true, _) => t(128, 64, 64, 8),
            (97..=128, true, false, false) => t(128, 64, 64, 4),
            (65..=128, ..) => t(128, 64, 32, 0),
            _ => t(64, 32, 32, 0),
        }
    }

    pub fn bwd_tiles(&self) -> BwdTiles {
        if let Some(&[block_m, sub_m, warps, warps_d]) = tile_override(Tuned::PortableBackward) {
            return BwdTiles { block_m, sub_m, warps, warps_d };
        }
        let t = |block_m, sub_m, warps, warps_d| BwdTiles { block_m, sub_m, warps, warps_d };
        match (self.budget, self.hdim) {
            // Query steps as long as the shared memory allows (fewer barriers and dQ reductions per key), in
            // sub-steps as long as the registers allow (measured on the H200: 128/64 is 27% faster than 64/64 at
            // d = 64, 64/32 24% faster than 32/32 at d = 128).
            (Budget::Large | Budget::Medium, 0..=64) => t(128, 64, 8, 1),
            (Budget::Large | Budget::Medium, 65..=96) => t(64, 64, 8, 1),
            (Budget::Large | Budget::Medium, 97..=128) => t(64, 32, 8, 1),
            (Budget::Large | Budget::Medium, _) => t(32, 32, 8, 2),
            // 99 KB: fewer query rows per step, fewer keys per CTA, or both (91, 88, 74, 78-92 and 68 KB at
            // d = 64, 96, 128, 160-224 and 256).
            (Budget::Small, 0..=64) => t(64, 64, 8, 1),
            (Budget::Small, 65..=96) => t(64, 64, 4, 1),
            (Budget::Small, 97..=128) => t(32, 32, 8, 2),
            (Budget::Small, 129..=224) => t(32, 32, 4, 2),
            (Budget::Small, _) => t(16, 16, 4, 2),
        }
    }

    pub fn hopper_tiles(&self) -> HopperTiles {
        // Clusters of two at d = 128: each K/V block then leaves L2 once for two CTAs. On the H200 +1-4% at
        // d = 128 (a fifth of what fewer K/V bytes would give: the cost is in shared memory more than L2), about
        // +1% at d = 256 (left off), 2-6% slower at d = 64 (three consumers: a cluster moves in step with its
        // slower CTA).
        let cluster = if self.hdim == 128 { 2 } else { 1 };
        // Shared memory: Q (128 rows) plus `stages` K and V blocks within the 227 KB a block may have.
        let t = |block_n, stages| HopperTiles { consumers: 2, block_n, stages, cluster };
        let tiles = match (tile_override(Tuned::HopperForward), self.hdim) {
            (Some(&[consumers, block_n, stages]), _) => HopperTiles { consumers, block_n, stages, cluster },
            (Some(&[consumers, block_n, stages, cluster]), _) => HopperTiles { consumers, block_n, stages, cluster },
            // Three consumers (192 query rows) at d = 64: without a mask 8-13% faster on the H200 at N >= 4096;
            // under a causal mask 2-12% faster from N = 2048 on, but 12% slower at 1024 (the larger tile wastes
            // more of the diagonal).
            (_, 64) if !self.masked || self.long => HopperTiles { consumers: 3, ..t(128, 4) },
            (_, 64) => t(128, 4),
            (_, 128) => t(128, 2),
            (_, 192) => t(96, 2),
            _ => t(80, 2),
        };
        // Under a mask neighbouring query blocks have different key ranges: no clusters.
        HopperTiles { cluster: if self.masked { 1 } else { tiles.cluster }, ..tiles }
    }

    /// This variant under a shared-memory budget: unchanged (marked `Budget::Large`) where its default tiles fit
    /// it, so that a variant is compiled once for every budget it fits; else marked with the budget, whose tile
    /// tables then apply.
    pub fn within(self, budget: Budget) -> Variant {
        let free = Variant { budget: Budget::Large, ..self };
        if free.smem_bytes() <= budget.bytes() {
            free
        } else {
            Variant { budget, ..self }
        }
    }

    /// This variant for a problem of `len_q` query rows (the longest sequence's): marked long where that
    /// changes the tiles, so that variants differing only in the mark are never compiled twice.
    pub fn for_queries(self, len_q: usize) -> Variant {
        let (short, long) = (Variant { long: false, ..self }, Variant { long: true, ..self });
        let differ =
            self.family == Family::Hopper && self.pass == Pass::Forward && long.hopper_tiles() != short.hopper_tiles();
        if differ && len_q >= LONG_QUERIES {
            long
        } else {
            short
        }
    }

    /// The decode variant for `rows` rows per KV head (queries x group); masks and score modifiers are decided
    /// at run time, where a memory-bound kernel can afford it.
    pub fn decode(dtype: DType, hdim: usize, sm90: bool, rows: usize) -> Variant {
        let long = rows >= DECODE_LONG_ROWS && hdim <= 128;
        let budget = Budget::Large;
        Variant {
            family: Family::Portable,
            pass: Pass::Decode,
            dtype,
            hdim,
            masked: false,
            has_mod: false,
            sm90,
            budget,
            long,
        }
    }

    /// Query rows per CTA (per tile, for the persistent Hopper forward; per step for the backwards).
    pub fn block_m(&self) -> usize {
        match (self.family, self.pass) {
            (Family::Hopper, Pass::Forward) => 64 * self.hopper_tiles().consumers,
            (Family::Hopper, Pass::Backward) => hopper_bwd_block_m(self.hdim),
            (_, Pass::Forward) => self.fwd_tiles().block_m,
            (_, Pass::Backward) => self.bwd_tiles().block_m,
            (_, Pass::Decode) => 16 * self.decode_m_tiles(),
        }
    }

    /// Key rows per CTA of a backward variant.
    pub fn bwd_block_n(&self) -> usize {
        match self.family {
            Family::Hopper => HOPPER_BWD_BLOCK_N,
            Family::Portable => self.bwd_tiles().block_n(),
        }
    }

    /// CTAs per cluster of the main kernel (1: launched without clusters).
    pub fn cluster(&self) -> usize {
        match (self.family, self.pass) {
            (Family::Hopper, Pass::Forward) => self.hopper_tiles().cluster,
            _ => 1,
        }
    }

    pub fn threads(&self) -> u32 {
        match (self.family, self.pass) {
            // A producer warpgroup and the consumers (two in the backward: its NTHREADS).
            (Family::Hopper, Pass::Forward) => 128 * (self.hopper_tiles().consumers as u32 + 1),
            (Family::Hopper, Pass::Backward) => 384,
            (_, Pass::Forward) => 32 * self.fwd_tiles().warps as u32,
            (_, Pass::Backward) => 32 * self.bwd_tiles().warps as u32,
            (_, Pass::Decode) => 32 * self.decode_warps() as u32,
        }
    }

    /// The architecture-specific target the variant must be compiled for, when not the GPU's own: wgmma and
    /// setmaxnreg exist only on sm_90a.
    pub fn target_arch(&self) -> Option<&'static str> {
        (self.family == Family::Hopper).then_some("sm_90a")
    }

    /// The main kernel's name in the module.
    pub fn kernel_name(&self) -> &'static str {
        match (self.family, self.pass) {
            (Family::Hopper, Pass::Forward) => "flash_fwd_sm90",
            (Family::Hopper, Pass::Backward) => "flash_bwd_sm90",
            (_, Pass::Forward) => "flash_fwd",
            (_, Pass::Backward) => "flash_bwd",
            (_, Pass::Decode) => "flash_decode",
        }
    }

    /// Dynamic shared memory of the main kernel, in bytes (the layouts of the kernels' shared memory), passed to
    /// them as SMEM_BYTES.
    pub fn smem_bytes(&self) -> usize {
        let row = (self.hdim + 8) * 2; // a portable tile's row, padded by 8 elements
        match (self.family, self.pass) {
            (Family::Hopper, Pass::Forward) => self.hopper_fwd_smem(self.hopper_o_staging() == OStaging::Boxes),
            (Family::Hopper, Pass::Backward) => {
                let (m, n, stages) = (self.block_m(), HOPPER_BWD_BLOCK_N, HOPPER_BWD_STAGES);
                // Alignment slack, K and V, the Q and dO ring, two dS^T buffers, the consumers' f32 dQ staging
                // (64 rows each), lse and D per stage, the mbarriers (1, 2 per stage, 2 per dS^T buffer).
                1024 + 2 * (2 * n * self.hdim + 2 * stages * m * self.hdim + 2 * n * m)
                    + 2 * 64 * self.hopper_dq_cols() * 4
                    + stages * 2 * m * 4
                    + 8 * (1 + 2 * stages + 4)
            }
            (_, Pass::Forward) => {
                let t = self.fwd_tiles();
                // Q, two K buffers, V.
                (t.block_m + 3 * t.block_n) * row
            }
            (_, Pass::Backward) => {
                let t = self.bwd_tiles();
                let n = t.block_n();
                // K, V; Q and dO twice; dS; lse and D twice; on sm_90 the dQ staging tile (f32, rows padded by 8).
                let staging = if self.bulk_dq() { t.block_m * (self.hdim + 8) * 4 } else { 0 };
                (2 * n + 4 * t.block_m) * row + n * (t.block_m + 8) * 2 + 4 * t.block_m * 4 + staging
            }
            (_, Pass::Decode) => self.decode_smem(self.decode_warps()),
        }
    }

    /// Decode: warps, each taking 16 keys of a shared-memory block: four, or two where four do not fit the
    /// budget (from d = 192 in 99 KB).
    fn decode_warps(&self) -> usize {
        if self.budget == Budget::Large || self.decode_smem(4) <= self.budget.bytes() {
            4
        } else {
            2
        }
    }

    /// Decode's shared memory with this many warps (16 keys each per block): Q, the K/V ring, and each stage's
    /// row slots (8 bytes per row).
    fn decode_smem(&self, warps: usize) -> usize {
        let (stages, n) = (self.decode_stages(), 16 * warps);
        (self.block_m() + 2 * stages * n) * (self.hdim + 8) * 2 + 8 * stages * n
    }

    /// Decode: keys per shared-memory block.
    pub fn decode_block_n(&self) -> usize {
        16 * self.decode_warps()
    }

    /// Portable backward: dQ staged in shared memory and added by bulk reductions (BULK_DQ), on sm_90 where the
    /// budget is whole; else by atomics (sm_80's way), which needs no staging tile.
    fn bulk_dq(&self) -> bool {
        self.sm90 && self.budget == Budget::Large
    }

    /// Decode: m16 row tiles per block, 2 for long variants.
    fn decode_m_tiles(&self) -> usize {
        1 + self.long as usize
    }

    /// Decode: depth of the K/V ring. Decode is bound by memory: on sm_90 three stages at up to head dim 128 (109
    /// KB, two CTAs per SM), else (or capped) two (at d = 128 the 74 KB fit the 99 KB of consumer GPUs).
    fn decode_stages(&self) -> usize {
        if self.sm90 && self.hdim <= 128 && self.budget == Budget::Large {
            3
        } else {
            2
        }
    }

    /// Shared memory of the Hopper forward: 1024 bytes of alignment slack, Q, the K and V ring, the O staging
    /// boxes if any (16 rows per consumer warp), the mbarriers (2 for Q, 4 per stage), the tile index and the word
    /// `wgmma_wait_after` may write.
    fn hopper_fwd_smem(&self, boxes: bool) -> usize {
        let t = self.hopper_tiles();
        let (m, staging) = (self.block_m(), if boxes { self.block_m() } else { 0 });
        1024 + 2 * self.hdim * (m + 2 * t.stages * t.block_n + staging) + 8 * (2 + 4 * t.stages) + 8
    }

    /// How the Hopper forward's O leaves. Through shared memory and TMA stores with two consumer warpgroups: in
    /// boxes of its own where they fit beside Q and the K/V ring (up to head dim 128 with the default tiles; 3-7%
    /// faster than direct stores at d = 128 on the H200), else in the Q tile, whose next load then waits for the
    /// epilogue (d = 256: +1-6%, most at N = 1024 and under a causal mask; at d = 128 it loses 2-7% to the
    /// boxes). Three consumers have 160 registers: staging spills there with a score modifier, and is 4% slower
    /// without.
    fn hopper_o_staging(&self) -> OStaging {
        if self.hopper_tiles().consumers != 2 {
            OStaging::Direct
        } else if self.hopper_fwd_smem(true) <= SM90_SMEM {
            OStaging::Boxes
        } else {
            OStaging::InQ
        }
    }

    /// Whether the Hopper forward rescales O only when some row's maximum grew by more than 2^8 (LAZY_RESCALE):
    /// where O is wide against the key block (from d = 192: 96-128 accumulators of O per thread against 40-48
    /// scores), 2-4% faster at d = 256 on the H200; at d = 128, since the rescale follows the wait for P V
    /// (`hopper_wait_after_softmax`), +0.3-1.6%; at d = 64 the vote costs more than the multiplications it saves
    /// (1% slower).
    fn hopper_lazy_rescale(&self) -> bool {
        self.hdim >= 128
    }

    /// Whether the Hopper forward's loop waits for P V after the softmax, as written, rather than where ptxas
    /// would move the wait, before it (WAIT_AFTER_SOFTMAX; `wgmma_wait_after` in hopper.cuh): on the H200 +1-4% at
    /// d = 128 and 256, 1-3% slower at d = 64 (three consumers).
    fn hopper_wait_after_softmax(&self) -> bool {
        self.hdim >= 128
    }

    /// A readable name: "fwd-bf16-d128-masked-mod", "fwd-sm90a-bf16-d128".
    pub fn name(&self) -> String {
        let pass = match (self.family, self.pass) {
            (Family::Hopper, Pass::Forward) => "fwd-sm90a",
            (Family::Hopper, Pass::Backward) => "bwd-sm90a",
            (_, Pass::Forward) => "fwd",
            (_, Pass::Backward) => "bwd",
            (_, Pass::Decode) => "decode",
        };
        let mut name = format!("{pass}-{}-d{}", self.dtype, self.hdim);
        if self.masked {
            name.push_str("-masked");
        }
        if self.has_mod {
            name.push_str("-mod");
        }
        if self.long {
            name.push_str("-long");
        }
        if self.budget != Budget::Large {
            name.push_str(&self.budget.suffix());
        }
        name
    }

    /// dQ columns per consumer of the Hopper backward (its DQ_N): the consumers split dQ by rows with 128-query
    /// steps, else by columns.
    fn hopper_dq_cols(&self) -> usize {
        if self.block_m() == 128 {
            self.hdim
        } else {
            self.hdim / 2
        }
    }

    /// The source: the pass's kernels and the headers they include (for Hopper, with `wgmma.cuh`, the wgmma
    /// instructions it uses, generated).
    pub fn source(&self) -> Source {
        let main = match (self.family, self.pass) {
            (Family::Hopper, Pass::Forward) => FWD_SM90,
            (Family::Hopper, Pass::Backward) => BWD_SM90,
            (_, Pass::Forward) => FWD,
            (_, Pass::Backward) => BWD,
            (_, Pass::Decode) => DECODE,
        };
        let mut headers = headers();
        if self.family == Family::Hopper {
            headers.push(("wgmma.cuh", Cow::Owned(self.wgmma_header())));
        }
        Source { main, headers }
    }

    /// The Hopper kernels' wgmma functions and the names they use them by.
    fn wgmma_header(&self) -> String {
        let uses = match self.pass {
            Pass::Forward => {
                vec![("WGMMA_SS", Wgmma::SS, self.hopper_tiles().block_n), ("WGMMA_RS", Wgmma::RS, self.hdim)]
            }
            Pass::Backward => vec![
                ("WGMMA_SS", Wgmma::SS, self.block_m()),
                ("WGMMA_RS", Wgmma::RS, self.hdim),
                ("WGMMA_TT", Wgmma::TT, self.hopper_dq_cols()),
            ],
            Pass::Decode => Vec::new(),
        };
        format!("#pragma once\n#include \"elem.cuh\"\n\n{}", wgmma_macros(&uses, self.dtype))
    }

    /// NVRTC options: the defines that select this variant.
    pub fn defines(&self) -> Vec<String> {
        let mut d = vec![
            elem_define(self.dtype),
            format!("-DHDIM={}", self.hdim),
            format!("-DIS_MASKED={}", self.masked as u8),
            format!("-DHAS_MOD={}", self.has_mod as u8),
            // The kernels static_assert that their layouts fit: a drift from their arithmetic fails to compile.
            format!("-DSMEM_BYTES={}", self.smem_bytes()),
        ];
        match (self.family, self.pass) {
            (Family::Hopper, Pass::Forward) => {
                let t = self.hopper_tiles();
                d.extend([
                    format!("-DCONSUMERS={}", t.consumers),
                    format!("-DBLOCK_N={}", t.block_n),
                    format!("-DSTAGES={}", t.stages),
                    format!("-DCLUSTER={}", t.cluster),
                    format!("-DO_STAGING={}", self.hopper_o_staging() as u8),
                    format!("-DLAZY_RESCALE={}", self.hopper_lazy_rescale() as u8),
                    format!("-DWAIT_AFTER_SOFTMAX={}", self.hopper_wait_after_softmax() as u8),
                ]);
            }
            (Family::Hopper, Pass::Backward) => {
                d.extend([
                    format!("-DBLOCK_N={HOPPER_BWD_BLOCK_N}"),
                    format!("-DBLOCK_M={}", self.block_m()),
                    format!("-DDQ_N={}", self.hopper_dq_cols()),
                    format!("-DSTAGES={HOPPER_BWD_STAGES}"),
                ]);
            }
            (_, Pass::Forward) => {
                let t = self.fwd_tiles();
                d.extend([
                    format!("-DBLOCK_M={}", t.block_m),
                    format!("-DBLOCK_N={}", t.block_n),
                    format!("-DSUB_N={}", t.sub_n),
                    format!("-DNWARPS={}", t.warps),
                ]);
                if t.s_unroll > 0 {
                    d.push(format!("-DS_UNROLL={}", t.s_unroll));
                }
            }
            (_, Pass::Backward) => {
                let t = self.bwd_tiles();
                d.extend([
                    format!("-DBLOCK_M={}", t.block_m),
                    format!("-DSUB_M={}", t.sub_m),
                    format!("-DNWARPS={}", t.warps),
                    format!("-DWARPS_D={}", t.warps_d),
                    format!("-DDQ_PARTS={}", t.dq_parts(self.hdim)),
                    format!("-DBULK_DQ={}", self.bulk_dq() as u8),
                ]);
            }
            (_, Pass::Decode) => {
                d.extend([
                    format!("-DMT={}", self.decode_m_tiles()),
                    format!("-DBLOCK_N={}", self.decode_block_n()),
                    format!("-DSTAGES={}", self.decode_stages()),
                    format!("-DNWARPS={}", self.decode_warps()),
                ]);
            }
        }
        d.extend(extra_defines().iter().cloned());
        d
    }

    /// Every variant for an architecture ("sm_80", "sm_90", ...): both passes and decode, both 16-bit types,
    /// every padded head dimension, every switch, short and long where that differs, under the architecture's
    /// shared-memory budget and every smaller one (the caps of `FLASHATTN_SMEM_LIMIT_KB`); on sm_90 also the
    /// Hopper family's.
    pub fn all(arch: &str) -> Vec<Variant> {
        let number = arch.trim_start_matches("sm_").trim_end_matches('a').parse::<u32>().unwrap_or(0);
        let sm90 = sm90_features(number as i32 / 10);
        let top = Budget::of_arch(arch);
        let mut base = Vec::new();
        let budget = Budget::Large;
        for dtype in [DType::BF16, DType::F16] {
            let mut families = vec![(Family::Portable, Pass::Forward), (Family::Portable, Pass::Backward)];
            if number == 90 {
                families.extend([(Family::Hopper, Pass::Forward), (Family::Hopper, Pass::Backward)]);
            }
            for (family, pass) in families {
                for hdim in (32..=MAX_HEAD_DIM).step_by(32) {
                    if family == Family::Hopper && hopper_head_dim(hdim, pass) != Some(hdim) {
                        continue;
                    }
                    for masked in [false, true] {
                        for has_mod in [false, true] {
                            let short =
                                Variant { family, pass, dtype, hdim, masked, has_mod, sm90, budget, long: false };
                            base.extend([short, short.for_queries(LONG_QUERIES)]);
                        }
                    }
                }
            }
            for hdim in (32..=MAX_HEAD_DIM).step_by(32) {
                base.extend([
                    Variant::decode(dtype, hdim, sm90, 1),
                    Variant::decode(dtype, hdim, sm90, DECODE_LONG_ROWS),
                ]);
            }
        }
        let mut v: Vec<Variant> = Vec::new();
        for b in [Budget::Large, Budget::Medium, Budget::Small].into_iter().filter(|&b| b <= top) {
            for &variant in &base {
                // The Hopper family runs only with its whole budget; capped, the portable family stands in.
                let fits = variant.family == Family::Portable || b == Budget::Large;
                let variant = variant.within(b);
                if fits && !v.contains(&variant) {
                    v.push(variant);
                }
            }
        }
        v
    }
}

/// The forms of wgmma the kernels use (A and B of m64nNk16).
#[derive(Clone, Copy, PartialEq)]
enum Wgmma {
    /// A and B from shared memory, both K-major.
    SS,
    /// A from registers, B from shared memory, MN-major.
    RS,
    /// A and B from shared memory, both MN-major (transposed).
    TT,
}

/// `#define NAME function` for each use, after the functions themselves (one per form and width).
fn wgmma_macros(uses: &[(&str, Wgmma, usize)], dtype: DType) -> String {
    let mut out = String::new();
    for (i, &(_, kind, n)) in uses.iter().enumerate() {
        if !uses[..i].iter().any(|&(_, k, m)| k == kind && m == n) {
            out += &wgmma_function(kind, n, dtype);
        }
    }
    for &(name, kind, n) in uses {
        out += &format!("#define {name} {}\n", wgmma_function_name(kind, n));
    }
    out
}

fn wgmma_function_name(kind: Wgmma, n: usize) -> String {
    let form = match kind {
        Wgmma::SS => "ss",
        Wgmma::RS => "rs",
        Wgmma::TT => "tt",
    };
    format!("wgmma_{form}_n{n}")
}

/// One wgmma instruction of width `n` as a C++ function (its operand list is n / 2 accumulators long, so it is
/// written out here). `scale_d` = 0 overwrites D.
fn wgmma_function(kind: Wgmma, n: usize, dtype: DType) -> String {
    let t = if dtype == DType::BF16 { "bf16" } else { "f16" };
    let acc = n / 2;
    let list = |f: &dyn Fn(usize) -> String, range: std::ops::Range<usize>| range.map(f).collect::<Vec<_>>().join(", ");
    let d = list(&|i| format!("%{i}"), 0..acc);
    let outs = list(&|i| format!("\"+f\"(d[{i}])"), 0..acc);
    let (params, operands, modes, inputs, pred) = match kind {
        Wgmma::SS | Wgmma::TT => {
            let modes = if kind == Wgmma::SS { "1, 1, 0, 0" } else { "1, 1, 1, 1" };
            ("u64 a, u64 b", format!("%{}, %{}", acc, acc + 1), modes, "\"l\"(a), \"l\"(b)", acc + 2)
        }
        Wgmma::RS => (
            "u32 a0, u32 a1, u32 a2, u32 a3, u64 b",
            format!("{{{}}}, %{}", list(&|i| format!("%{i}"), acc..acc + 4), acc + 4),
            "1, 1, 1",
            "\"r\"(a0), \"r\"(a1), \"r\"(a2), \"r\"(a3), \"l\"(b)",
            acc + 5,
        ),
    };
    format!(
        "DEVICE void {}(float (&d)[{acc}], {params}, int scale_d) {{\n    \
         asm volatile(\"{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{pred}, 0;\\n\"\n        \
         \"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{t}.{t} {{{d}}}, {operands}, p, {modes};\\n}}\\n\"\n        \
         : {outs}\n        : {inputs}, \"r\"(scale_d));\n}}\n",
        wgmma_function_name(kind, n)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_fits_its_architectures_shared_memory() {
        for arch in ["sm_80", "sm_86", "sm_89", "sm_90", "sm_120"] {
            let top = Budget::of_arch(arch);
            for v in Variant::all(arch) {
                let limit = v.budget.min(top).bytes();
                assert!(v.smem_bytes() <= limit, "{} on {arch}: {} > {limit}", v.name(), v.smem_bytes());
            }
        }
    }

    #[test]
    fn budgets_pick_tiles_that_fit_or_keep_the_defaults() {
        let v = |pass, hdim, sm90| Variant {
            family: Family::Portable,
            pass,
            dtype: DType::BF16,
            hdim,
            masked: false,
            has_mod: false,
            sm90,
            budget: Budget::Large,
            long: false,
        };
        // The backward does not fit 99 KB with its default tiles: a constrained variant, and it fits.
        let small = v(Pass::Backward, 128, true).within(Budget::Small);
        assert_eq!(small.budget, Budget::Small);
        assert!(small.smem_bytes() <= Budget::Small.bytes() && small.name().ends_with("-99k"));
        // The forward does: the same variant as uncapped, compiled once.
        assert_eq!(v(Pass::Forward, 128, true).within(Budget::Small), v(Pass::Forward, 128, true));
        assert_eq!(Budget::within(100 << 10), Budget::Small);
        assert_eq!(Budget::within(227 << 10), Budget::Large);
        assert_eq!(Budget::of_arch("sm_90a"), Budget::Large);
        assert!(!sm90_features(12) && sm90_features(9));
    }

    #[test]
    fn wgmma_functions_number_their_operands() {
        let w = [Wgmma::SS, Wgmma::RS, Wgmma::TT].map(|k| wgmma_function(k, 16, DType::BF16)).concat();
        assert!(w.contains("m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, 0, 0;"), "{w}");
        assert!(w.contains("setp.ne.b32 p, %10, 0;"), "{w}");
        assert!(w.contains("{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, 1;"), "{w}");
        assert!(w.contains("setp.ne.b32 p, %13, 0;"), "{w}");
        assert!(w.contains("%8, %9, p, 1, 1, 1, 1;"), "{w}");
        let m = wgmma_macros(&[("A", Wgmma::SS, 64), ("B", Wgmma::SS, 64), ("C", Wgmma::TT, 64)], DType::F16);
        assert_eq!(m.matches("DEVICE void wgmma_ss_n64(").count(), 1, "{m}");
        assert!(m.contains("#define B wgmma_ss_n64\n#define C wgmma_tt_n64\n"), "{m}");
    }
}
