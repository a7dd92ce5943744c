//! Activations quantized to signed bytes once per matrix product (per 32 values, scales
//! rounded to f16 as llama.cpp does), laid out the way the kernels read them, in a buffer
//! reused from product to product.

use super::pool::{for_each_range, item_slice};

/// Values per activation block (and per block of the 32-value formats).
pub const BLOCK: usize = 32;

/// Two blocks (64 values) of activations quantized to signed bytes, laid out the way the
/// kernels read them: per 32-bit lane of a 512-bit register (4 values; lanes 0-7 are the first
/// block, 8-15 the second) its block's scale, and the offset terms.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct ActPair {
    pub qs: [i8; 2 * BLOCK],
    /// The block's scale `d`, repeated in its 8 lanes.
    pub scale: [f32; 16],
    /// `-offset * (sum of the lane's 4 values)`: the integer start of `sum((u - offset) * q)`.
    pub offset_start: [i32; 16],
    /// `d * sum(q) / 8` in each of the block's lanes (Q4_1: times the block minimum).
    pub mean_term: [f32; 16],
}

impl Default for ActPair {
    fn default() -> Self {
        Self {
            qs: [0; 2 * BLOCK],
            scale: [0.0; 16],
            offset_start: [0; 16],
            mean_term: [0.0; 16],
        }
    }
}

/// Quantizes one row of activations the way llama.cpp's Q8_0/Q8_1 do (scale = max |x| / 127),
/// with `offset` the weights' constant offset. A missing second block of the last pair is
/// zeroed, so it adds nothing whatever the weights hold.
pub fn quantize_row(x: &[f32], offset: i32, out: &mut [ActPair]) {
    let blocks = x.len() / BLOCK;
    if blocks % 2 == 1 {
        let last = &mut out[blocks / 2];
        last.qs[BLOCK..].fill(0);
        last.scale[8..].fill(0.0);
        last.offset_start[8..].fill(0);
        last.mean_term[8..].fill(0.0);
    }
    for (i, chunk) in x.chunks_exact(BLOCK).enumerate() {
        let pair = &mut out[i / 2];
        let half = i % 2;
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inverse = if d == 0.0 { 0.0 } else { 1.0 / d };
        // llama.cpp's activation blocks store the scale (and Q8_1's scaled sum) as f16;
        // rounding them the same way keeps greedy answers the same as llama.cpp's.
        let f16_round = |v: f32| half::f16::from_f32(v).to_f32();
        let qs = &mut pair.qs[half * BLOCK..(half + 1) * BLOCK];
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(chunk) {
            *q = (v * inverse).round() as i8;
            sum += *q as i32;
        }
        for lane in 0..8 {
            let lane_sum: i32 = qs[lane * 4..lane * 4 + 4].iter().map(|&q| q as i32).sum();
            pair.scale[half * 8 + lane] = f16_round(d);
            pair.offset_start[half * 8 + lane] = -offset * lane_sum;
            pair.mean_term[half * 8 + lane] = f16_round(d * sum as f32) / 8.0;
        }
    }
}

thread_local! {
    // Reused across calls: quantized activations are rebuilt for every product, and a fresh
    // allocation per matrix would be one per layer per token.
    static SCRATCH: std::cell::RefCell<Vec<ActPair>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Quantizes the `m` rows of `k` values in `lhs` (a prompt's rows on all threads) with the
/// weights' constant `offset`, and runs `work` on them: `pairs_per_row` pairs per row.
pub fn with_quantized<R>(
    lhs: &[f32],
    (m, k): (usize, usize),
    offset: i32,
    work: impl FnOnce(&[ActPair], usize) -> R,
) -> R {
    let pairs_per_row = (k / BLOCK).div_ceil(2);
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        // Every element is overwritten by `quantize_row`: only growth needs initialising.
        scratch.resize(m * pairs_per_row, ActPair::default());
        let quantize = |rows: std::ops::Range<usize>, out: &mut [ActPair]| {
            for (row, out) in lhs[rows.start * k..rows.end * k]
                .chunks_exact(k)
                .zip(out.chunks_exact_mut(pairs_per_row))
            {
                quantize_row(row, offset, out);
            }
        };
        if m == 1 {
            quantize(0..1, &mut scratch);
        } else {
            let scratch_addr = scratch.as_mut_ptr() as usize;
            for_each_range(m, |rows| {
                // SAFETY: each range of rows owns its own part of the scratch buffer, which
                // holds `m * pairs_per_row` pairs and outlives `for_each_range`.
                let out = unsafe {
                    item_slice::<ActPair>(
                        scratch_addr,
                        rows.start * pairs_per_row,
                        rows.len() * pairs_per_row,
                    )
                };
                quantize(rows, out);
            });
        }
        work(&scratch, pairs_per_row)
    })
}

/// Frees this thread's quantized-activation buffer (the model is being unloaded).
pub fn release_scratch() {
    SCRATCH.with(|cell| *cell.borrow_mut() = Vec::new());
}
