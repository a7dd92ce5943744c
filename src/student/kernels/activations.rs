//! Activations quantized to signed bytes once per matrix product (per 32 values, scales
//! rounded to f16 as llama.cpp does), laid out the way the kernels read them, in a buffer
//! reused from product to product.

use super::lane_span;
use super::pool::{ThreadBuffer, for_each_range, item_slice, thread_buffer};

/// Values per activation block (and per block of the 32-value formats).
pub const BLOCK: usize = 32;

/// Sixteen spans of `4 * G` activations quantized to signed bytes: each 32-bit lane of a
/// 512-bit register holds one span ([`lane_span`]), and register `j` values `4j..4j + 4` of
/// every lane's span, so `G` multiply-adds leave each lane with its whole span's dot product
/// (in value order instead for the decoding kernel).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct ActChunk<const G: usize> {
    pub qs: [[i8; 64]; G],
    /// The scale `d` of the 32-value block each lane's span lies in.
    pub scale: [f32; 16],
    /// `-offset * (sum of the span's values)`: the integer start of `sum((u - offset) * q)`.
    pub offset: [i32; 16],
    /// `d * sum(q)` of the span (Q4_1 and Q4_K: times the weights' minimum).
    pub mean: [f32; 16],
}

impl<const G: usize> Default for ActChunk<G> {
    fn default() -> Self {
        Self {
            qs: [[0; 64]; G],
            scale: [0.0; 16],
            offset: [0; 16],
            mean: [0.0; 16],
        }
    }
}

/// Chunks of `G`-group spans a row of `k` values fills (the last one padded with zeros).
pub fn chunks_per_row(k: usize, groups: usize) -> usize {
    k.div_ceil(64 * groups)
}

/// Quantizes one row of activations the way llama.cpp's Q8_0/Q8_1 do (scale = max |x| / 127),
/// with `offset` the weights' constant offset, into `out` (`chunks_per_row` chunks):
/// `interleaved` for the prompt kernel, in value order for the decoding one; `scratch` is
/// reused from row to row. Spans past the row's end are zeroed, so they add nothing whatever the
/// weights hold there.
pub fn quantize_row<const G: usize>(
    x: &[f32],
    offset: i32,
    interleaved: bool,
    scratch: &mut RowScratch,
    out: &mut [ActChunk<G>],
) {
    // The body is compiled once per tier: built for plain x86-64, its block loop, sums and
    // f16 rounding would otherwise run as baseline code and call the vector blocks one by one.
    #[cfg(target_arch = "x86_64")]
    match super::tier() {
        super::Tier::Avx512 => {
            // SAFETY: the tier in use was checked against the CPU when it was chosen.
            return unsafe { quantize_row_avx512(x, offset, interleaved, scratch, out) };
        }
        super::Tier::Avx2 | super::Tier::AvxVnni => {
            // SAFETY: as above.
            return unsafe { quantize_row_avx2(x, offset, interleaved, scratch, out) };
        }
        super::Tier::Portable => {}
    }
    quantize_row_body(x, offset, interleaved, scratch, out)
}

/// [`quantize_row`] compiled for the AVX-512 tier.
///
/// # Safety
/// The CPU must have the AVX-512 tier's features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn quantize_row_avx512<const G: usize>(
    x: &[f32],
    offset: i32,
    interleaved: bool,
    scratch: &mut RowScratch,
    out: &mut [ActChunk<G>],
) {
    quantize_row_body(x, offset, interleaved, scratch, out)
}

/// [`quantize_row`] compiled for the AVX2 tier.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_row_avx2<const G: usize>(
    x: &[f32],
    offset: i32,
    interleaved: bool,
    scratch: &mut RowScratch,
    out: &mut [ActChunk<G>],
) {
    quantize_row_body(x, offset, interleaved, scratch, out)
}

#[inline(always)]
fn quantize_row_body<const G: usize>(
    x: &[f32],
    offset: i32,
    interleaved: bool,
    scratch: &mut RowScratch,
    out: &mut [ActChunk<G>],
) {
    let k = x.len();
    let span = 4 * G;
    let RowScratch {
        q,
        block_d,
        span_sums,
    } = scratch;
    q.resize(k, 0);
    // llama.cpp's activation blocks store the scale (and Q8_1's scaled sum) as f16;
    // rounding them the same way keeps greedy answers close to llama.cpp's.
    // Plain loops, not iterator adapters: those are functions of their own, compiled for
    // plain x86-64 whatever tier calls them, and the vector blocks could not inline into them.
    // (d rounded to f16, d) of each 32-value block.
    block_d.clear();
    for b in 0..k / BLOCK {
        let range = b * BLOCK..(b + 1) * BLOCK;
        let d = quantize_block(
            x[range.clone()].try_into().unwrap(),
            (&mut q[range]).try_into().unwrap(),
        );
        block_d.push((f16_round(d), d));
    }
    let spans = k / span;
    span_sums.clear();
    for s in 0..spans {
        let mut sum = 0i32;
        for &v in &q[s * span..(s + 1) * span] {
            sum += v as i32;
        }
        span_sums.push(sum);
    }
    for (c, chunk) in out.iter_mut().enumerate() {
        let chunk_spans = (spans - 16 * c).min(16);
        let values = &q[c * 64 * G..(c * 64 * G + 64 * G).min(k)];
        if interleaved && chunk_spans == 16 {
            interleave(values, &mut chunk.qs);
        } else {
            // Value order (decoding), or a last chunk with missing spans: zeros pad it.
            let mut padded = [0i8; 512];
            padded[..values.len()].copy_from_slice(values);
            if interleaved {
                interleave(&padded[..64 * G], &mut chunk.qs);
            } else {
                for (group, bytes) in chunk.qs.iter_mut().zip(padded.chunks_exact(64)) {
                    group.copy_from_slice(bytes);
                }
            }
        }
        for lane in 0..16 {
            let s = 16 * c + lane_span(lane, G);
            (chunk.scale[lane], chunk.offset[lane], chunk.mean[lane]) = match s < spans {
                true => {
                    let (rounded, d) = block_d[s * span / BLOCK];
                    (
                        rounded,
                        -offset * span_sums[s],
                        f16_round(d * span_sums[s] as f32),
                    )
                }
                false => (0.0, 0, 0.0),
            };
        }
    }
}

/// `v` rounded to f16 and back. llama.cpp's activation blocks store the scale (and Q8_1's
/// scaled sum) as f16; rounding them the same way keeps greedy answers close to llama.cpp's.
#[inline(always)]
fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// A full chunk's `64 * G` bytes in value order (16 spans) to the kernels' layout: register
/// `j`, lane `l` holds group `j` of span [`lane_span`]`(l, G)`.
#[inline(always)]
fn interleave<const G: usize>(values: &[i8], out: &mut [[i8; 64]; G]) {
    assert_eq!(values.len(), 64 * G);
    #[cfg(target_arch = "x86_64")]
    if super::avx512_in_use() {
        // SAFETY: the CPU features were checked just above, the length just before.
        return unsafe { super::avx512::interleave(values, out) };
    }
    for (j, group) in out.iter_mut().enumerate() {
        for lane in 0..16 {
            let start = lane_span(lane, G) * 4 * G + 4 * j;
            group[4 * lane..4 * lane + 4].copy_from_slice(&values[start..start + 4]);
        }
    }
}

/// Quantizes 32 values to signed bytes (`round(v / d)`, halves away from zero) and returns
/// their scale `d = max |v| / 127`.
#[inline(always)]
fn quantize_block(values: &[f32; BLOCK], q: &mut [i8; BLOCK]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::avx512_in_use() {
        // SAFETY: the CPU features were checked just above.
        return unsafe { super::avx512::quantize_block(values, q) };
    }
    quantize_block_portable(values, q)
}

/// [`quantize_block`] one value at a time.
#[inline(always)]
fn quantize_block_portable(values: &[f32; BLOCK], q: &mut [i8; BLOCK]) -> f32 {
    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inverse = if d == 0.0 { 0.0 } else { 1.0 / d };
    for (q, &v) in q.iter_mut().zip(values) {
        *q = (v * inverse).round() as i8;
    }
    d
}

/// One row's bytes in value order, its blocks' scales and its spans' sums, on their way into
/// chunks.
#[derive(Default)]
pub struct RowScratch {
    q: Vec<i8>,
    block_d: Vec<(f32, f32)>,
    span_sums: Vec<i32>,
}

thread_local! {
    // Reused: a row is quantized for every product of every token.
    static ROW_SCRATCH: std::cell::RefCell<RowScratch> = std::cell::RefCell::new(RowScratch::default());
}

thread_buffer!(ActChunk<8>);
thread_buffer!(ActChunk<4>);

/// Quantizes the `m` rows of `k` values in `lhs` (a prompt's rows on all threads) with the
/// weights' constant `offset` (`interleaved`: see [`quantize_row`]), and runs `work` on them: `chunks_per_row` chunks per row.
pub fn with_quantized<const G: usize, R>(
    lhs: &[f32],
    (m, k): (usize, usize),
    offset: i32,
    interleaved: bool,
    work: impl FnOnce(&[ActChunk<G>], usize) -> R,
) -> R
where
    ActChunk<G>: ThreadBuffer,
{
    let per_row = chunks_per_row(k, G);
    ActChunk::<G>::with_buffer(|scratch| {
        // Every element is overwritten by `quantize_row`: only growth needs initialising.
        scratch.resize(m * per_row, ActChunk::default());
        let quantize = |rows: std::ops::Range<usize>, out: &mut [ActChunk<G>]| {
            ROW_SCRATCH.with(|scratch| {
                let scratch = &mut scratch.borrow_mut();
                for (row, out) in lhs[rows.start * k..rows.end * k]
                    .chunks_exact(k)
                    .zip(out.chunks_exact_mut(per_row))
                {
                    quantize_row(row, offset, interleaved, scratch, out);
                }
            });
        };
        if m == 1 {
            quantize(0..1, scratch);
        } else {
            let scratch_addr = scratch.as_mut_ptr() as usize;
            for_each_range(m, |rows| {
                // SAFETY: each range of rows owns its own part of the scratch buffer, which
                // holds `m * per_row` chunks and outlives `for_each_range`.
                let out = unsafe {
                    item_slice::<ActChunk<G>>(
                        scratch_addr,
                        rows.start * per_row,
                        rows.len() * per_row,
                    )
                };
                quantize(rows, out);
            });
        }
        work(scratch, per_row)
    })
}

/// Frees this thread's quantized-activation buffers (the model is being unloaded).
pub fn release_scratch() {
    ActChunk::<8>::release();
    ActChunk::<4>::release();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector interleave puts every byte where the portable one does.
    #[test]
    fn vector_and_portable_interleaves_agree() {
        let values: Vec<i8> = (0..512).map(|i| (i * 37 % 255 - 127) as i8).collect();
        let mut portable = [[0i8; 64]; 8];
        for (j, group) in portable.iter_mut().enumerate() {
            for lane in 0..16 {
                let start = lane_span(lane, 8) * 32 + 4 * j;
                group[4 * lane..4 * lane + 4].copy_from_slice(&values[start..start + 4]);
            }
        }
        let mut ours = [[0i8; 64]; 8];
        interleave(&values, &mut ours);
        assert_eq!(ours, portable);
        let mut quarter = [[0i8; 64]; 4];
        interleave(&values[..256], &mut quarter);
        // Lane 1 of a 16-value-span chunk holds span 4: values 64..68 in register 0.
        assert_eq!(quarter[0][4..8], values[64..68]);
    }

    /// The vector quantizer gives the same bytes and scale as the portable one, ties included.
    #[test]
    fn vector_and_portable_quantizers_agree() {
        for seed in 0..200u32 {
            let values: [f32; BLOCK] = std::array::from_fn(|i| {
                let r = (seed * 7919 + i as u32 * 104_729) % 2001;
                (r as f32 - 1000.0) / [1.0, 7.0, 127.0, 3e4][seed as usize % 4]
            });
            // Exact halves after scaling: max 127 makes d 1, so v / d = v.
            let ties: [f32; BLOCK] =
                std::array::from_fn(|i| if i == 0 { 127.0 } else { i as f32 - 15.5 });
            for values in [values, ties, [0.0; BLOCK]] {
                let (mut a, mut b) = ([0; BLOCK], [0; BLOCK]);
                let da = quantize_block(&values, &mut a);
                let db = quantize_block_portable(&values, &mut b);
                assert_eq!((a, da.to_bits()), (b, db.to_bits()), "{values:?}");
            }
        }
    }
}
