//! CPU flash attention against the f64 oracle: every instruction set this CPU runs, every dtype, random shapes
//! and options, forward, log-sum-exp and all three gradients.

mod common;

use common::{any_case, check_case, Case};
use flashattn::{Backend, DType, Isa};
use proptest::prelude::*;

const HEAD_DIMS: [usize; 9] = [1, 8, 16, 24, 40, 64, 80, 128, 256];

fn cases() -> u32 {
    std::env::var("FLASHATTN_TEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn forward_and_backward_match_the_oracle(case in any_case(DType::ALL.to_vec(), HEAD_DIMS.to_vec())) {
        for isa in Isa::supported() {
            check_case(&case, Backend::Cpu(isa), true)?;
        }
    }
}

#[test]
fn a_plain_case_matches_on_every_isa() {
    let mut case = Case::dense(2, 77, 93, 4, 2, 64);
    case.causal = true;
    for isa in Isa::supported() {
        check_case(&case, Backend::Cpu(isa), true).unwrap();
    }
}

/// The backward splits a head's keys across tasks (f32 dq slabs summed afterwards) when there are few heads, and
/// gives each task a whole head (dq accumulated in place) when there are many: both paths, long sequences.
#[test]
fn backward_with_few_and_many_heads() {
    for (batch, heads) in [(1, 1), (4, 8)] {
        let mut case = Case::dense(batch, 300, 700, heads, heads, 40);
        case.causal = true;
        case.dtype = DType::BF16;
        for isa in Isa::supported() {
            check_case(&case, Backend::Cpu(isa), true).unwrap();
        }
    }
}
