//! Fast deterministic random inputs: never zeros, which would hide unwritten outputs and flatter timings.

use flashattn::Element;
use rayon::prelude::*;

/// Fills `out` with approximately standard normal values (sum of four uniforms, rescaled), in parallel and
/// reproducibly for a given seed.
pub fn fill_normal<T: Element>(out: &mut [T], seed: u64) {
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(chunk, xs)| {
        let mut state =
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (chunk as u64).wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
        for x in xs {
            let mut sum = 0.0f32;
            for _ in 0..4 {
                // xorshift64*
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let u = (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
                sum += u;
            }
            // Four uniforms: mean 2, variance 1/3.
            *x = T::from_f32((sum - 2.0) * 3.0f32.sqrt());
        }
    });
}
