//! The AVX2 kernel of the tiled attention, for heads of 64 or 128 values: the AVX-512
//! kernel's plan ([`super::tiled_x86`]) in 8-lane registers, shaped for AVX2's 16 of them.
//!
//! Per key block the keys are widened transposed, `[head_dim][KEY_BLOCK]`, so a query vector's
//! scores against 8 keys are one register of broadcast-query FMAs, with no horizontal sums;
//! half a block (32 keys) at a time, so that three vectors' scores fit in 12 registers. The
//! softmax exponentiates 8 weights at a time ([`exp`], the portable kernel's arithmetic lane
//! for lane); the values are widened once and each vector adds them up weighted, 8 head values
//! per register and 64 at a time.
//!
//! As in the other kernels, every sum a vector makes runs in an order fixed by its own
//! position alone: scores over the head in order; weights over the block's registers in order,
//! then one fixed reduction; weighted values over the positions it sees, in order. Positions it
//! does not see score `-inf` and weigh `+0`, and its values sum stops before them.

use std::arch::x86_64::*;

use super::{Block, EXP_POLYNOMIAL, Item, KEY_BLOCK, Scratch, Source};

/// Registers of 8 positions in a key block.
const KEY_CHUNKS: usize = KEY_BLOCK / 8;

/// Key registers scored at a time: half a block.
const HALF: usize = KEY_CHUNKS / 2;

/// Query vectors scored together: `SCORE_TILE * HALF` accumulators and a broadcast each.
const SCORE_TILE: usize = 3;

/// Head values a vector's weighted sum keeps in registers at a time.
const VALUE_SPAN: usize = 64;

/// [`super::portable_item`] in AVX2 arithmetic: the results land in `s.out`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C, and the head `8 * C` values, 64 or 128.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn attend_item<const C: usize>(src: &Source, item: &Item, s: &mut Scratch) {
    assert!(src.head_dim == 8 * C && (8 * C).is_multiple_of(VALUE_SPAN));
    s.start(item.vectors(), 8 * C);
    for block in item.blocks() {
        widen_keys::<C>(src, &block, &mut s.keys);
        widen_values::<C>(src, &block, &mut s.values);
        let mut v = block.first_vector;
        while v < item.vectors() {
            let tile = (item.vectors() - v).min(SCORE_TILE);
            match tile {
                3 => score_tile::<C, 3>(s, v),
                2 => score_tile::<C, 2>(s, v),
                _ => score_tile::<C, 1>(s, v),
            }
            v += tile;
        }
        for v in block.first_vector..item.vectors() {
            let seen = block.keys.min(item.position(v) + 1 - block.start);
            softmax(s, v, seen);
            weigh_values::<C>(s, v, seen);
        }
    }
    s.finish(8 * C);
}

/// The block's keys as f32, transposed to `[head value][position]`, 8 x 8 at a time. Past
/// `block.keys` the columns hold zeros or an earlier block's keys: no vector sees them, and
/// [`softmax`] masks their scores.
#[target_feature(enable = "avx2,fma,f16c")]
fn widen_keys<const C: usize>(src: &Source, block: &Block, wide: &mut [f32]) {
    assert!(wide.len() >= 8 * C * KEY_BLOCK);
    for first in (0..block.keys).step_by(8) {
        for c in 0..C {
            let mut square = [_mm256_setzero_ps(); 8];
            for (i, row) in square.iter_mut().enumerate().take(block.keys - first) {
                let key = &src.key(block.start + first + i)[8 * c..8 * c + 8];
                // SAFETY: `key` holds the 8 values loaded.
                *row = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(key.as_ptr().cast()) });
            }
            for (d, column) in transpose(square).into_iter().enumerate() {
                let at = (8 * c + d) * KEY_BLOCK + first;
                // SAFETY: `first + 8 <= KEY_BLOCK`, and `wide` holds `8 * C` rows of them.
                unsafe { _mm256_storeu_ps(wide.as_mut_ptr().add(at), column) };
            }
        }
    }
}

/// The 8 x 8 transpose: pairs of rows, then quads, then 128-bit halves.
#[target_feature(enable = "avx2")]
fn transpose(r: [__m256; 8]) -> [__m256; 8] {
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(a, b)
        } else {
            _mm256_unpackhi_ps(a, b)
        }
    });
    // q[4a + m]: element m of rows 4a..4a + 4, in each 128-bit half.
    let q: [__m256; 8] = std::array::from_fn(|i| {
        let (a, m) = (i / 4, i % 4);
        let (x, y) = (t[4 * a + (m / 2)], t[4 * a + 2 + (m / 2)]);
        if m % 2 == 0 {
            _mm256_shuffle_ps::<0x44>(x, y)
        } else {
            _mm256_shuffle_ps::<0xEE>(x, y)
        }
    });
    std::array::from_fn(|d| {
        let (low, high) = (q[d % 4], q[4 + d % 4]);
        if d < 4 {
            _mm256_permute2f128_ps::<0x20>(low, high)
        } else {
            _mm256_permute2f128_ps::<0x31>(low, high)
        }
    })
}

/// The block's values as f32, `[position][head value]`.
#[target_feature(enable = "avx2,fma,f16c")]
fn widen_values<const C: usize>(src: &Source, block: &Block, wide: &mut [f32]) {
    assert!(wide.len() >= block.keys * 8 * C);
    for j in 0..block.keys {
        let value = src.value(block.start + j);
        for c in 0..C {
            // SAFETY: `value` holds `8 * C` values and `wide` room for `block.keys` rows.
            unsafe {
                let wide8 = _mm256_cvtph_ps(_mm_loadu_si128(value.as_ptr().add(8 * c).cast()));
                _mm256_storeu_ps(wide.as_mut_ptr().add((j * C + c) * 8), wide8);
            }
        }
    }
}

/// Scores of vectors `v..v + V` against the whole block, into `s.scores`: half a block at a
/// time, one broadcast query value times 8 keys per register, summed over the head in order.
#[target_feature(enable = "avx2,fma,f16c")]
fn score_tile<const C: usize, const V: usize>(s: &mut Scratch, v: usize) {
    let hd = 8 * C;
    assert!(s.queries.len() >= (v + V) * hd && s.keys.len() >= hd * KEY_BLOCK);
    assert!(s.scores.len() >= (v + V) * KEY_BLOCK);
    let (queries, keys, scores) = (s.queries.as_ptr(), s.keys.as_ptr(), s.scores.as_mut_ptr());
    // SAFETY: the reads and writes stay inside the lengths asserted above.
    unsafe {
        for half in 0..2 {
            let first = half * HALF * 8;
            let mut acc = [[_mm256_setzero_ps(); HALF]; V];
            for d in 0..hd {
                let q: [__m256; V] =
                    std::array::from_fn(|u| _mm256_set1_ps(*queries.add((v + u) * hd + d)));
                for c in 0..HALF {
                    let k = _mm256_loadu_ps(keys.add(d * KEY_BLOCK + first + 8 * c));
                    for (acc, q) in acc.iter_mut().zip(&q) {
                        acc[c] = _mm256_fmadd_ps(*q, k, acc[c]);
                    }
                }
            }
            for (u, acc) in acc.iter().enumerate() {
                for (c, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(scores.add((v + u) * KEY_BLOCK + first + 8 * c), *a);
                }
            }
        }
    }
}

/// Vector `v`'s scores against the block become weights `exp(score - max)` for the `seen`
/// positions it sees (the rest weigh zero); its running maximum and sum are updated, and the
/// factor its `out` is rescaled by is kept.
#[target_feature(enable = "avx2,fma,f16c")]
fn softmax(s: &mut Scratch, v: usize, seen: usize) {
    let row = &mut s.scores[v * KEY_BLOCK..(v + 1) * KEY_BLOCK];
    let lane = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
    // SAFETY: `row` holds `KEY_CHUNKS` registers of scores.
    let mut x: [__m256; KEY_CHUNKS] =
        std::array::from_fn(|c| unsafe { _mm256_loadu_ps(row.as_ptr().add(8 * c)) });
    for (c, x) in x.iter_mut().enumerate() {
        // Lanes at or past `seen` score -inf (position 8c + lane >= seen).
        let limit = _mm256_set1_ps(seen as f32 - (8 * c) as f32);
        let unseen = _mm256_cmp_ps::<_CMP_GE_OQ>(lane, limit);
        *x = _mm256_blendv_ps(*x, _mm256_set1_ps(f32::NEG_INFINITY), unseen);
    }
    let old = s.max[v];
    let max = old.max(reduce_max(x.iter().fold(x[0], |m, &x| _mm256_max_ps(m, x))));
    s.rescale[v] = if max > old {
        _mm256_cvtss_f32(exp(_mm256_set1_ps(old - max)))
    } else {
        1.0
    };
    s.max[v] = max;
    let mut total = _mm256_setzero_ps();
    for (c, x) in x.iter().enumerate() {
        let w = exp(_mm256_sub_ps(*x, _mm256_set1_ps(max)));
        total = _mm256_add_ps(total, w);
        // SAFETY: register `c` of `row`.
        unsafe { _mm256_storeu_ps(row.as_mut_ptr().add(8 * c), w) };
    }
    s.sum[v] = s.sum[v] * s.rescale[v] + reduce_add(total);
}

/// Vector `v`'s `out = out * rescale + sum of weight * value` over the `seen` positions it
/// sees, in order, 64 head values at a time.
#[target_feature(enable = "avx2,fma,f16c")]
fn weigh_values<const C: usize>(s: &mut Scratch, v: usize, seen: usize) {
    let hd = 8 * C;
    assert!(s.out.len() >= (v + 1) * hd && s.scores.len() >= (v + 1) * KEY_BLOCK);
    assert!(s.values.len() >= seen * hd && seen <= KEY_BLOCK);
    let rescale = _mm256_set1_ps(s.rescale[v]);
    let (out, weights, values) = (
        s.out[v * hd..].as_mut_ptr(),
        s.scores[v * KEY_BLOCK..].as_ptr(),
        s.values.as_ptr(),
    );
    // SAFETY: the reads and writes stay inside the lengths asserted above.
    unsafe {
        for span in (0..hd).step_by(VALUE_SPAN) {
            let mut acc: [__m256; VALUE_SPAN / 8] = std::array::from_fn(|c| {
                _mm256_mul_ps(_mm256_loadu_ps(out.add(span + 8 * c)), rescale)
            });
            for j in 0..seen {
                let w = _mm256_set1_ps(*weights.add(j));
                let row = values.add(j * hd + span);
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(8 * c)), *a);
                }
            }
            for (c, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(span + 8 * c), *a);
            }
        }
    }
}

/// `e^x` lane by lane, the portable kernel's `exp_in_place` operation for operation (no fused
/// multiply-adds), so the same bits: `x = n ln 2 + r`, a polynomial for `e^r`, times `2^n`
/// built from its bits in two halves (`n` reaches -150). `exp(0)` is exactly 1 and
/// `exp(-inf)` exactly 0.
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-104.0)),
        _mm256_set1_ps(88.0),
    );
    // Round to nearest, ties to even, by adding and taking away 1.5 * 2^23.
    let magic = _mm256_set1_ps(12_582_912.0);
    let n = _mm256_sub_ps(
        _mm256_add_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            magic,
        ),
        magic,
    );
    let r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(355.0 / 512.0)));
    let r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.121_944_4e-4)));
    let mut y = _mm256_set1_ps(EXP_POLYNOMIAL[0]);
    for &c in &EXP_POLYNOMIAL[1..] {
        y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(
        _mm256_add_ps(_mm256_mul_ps(y, _mm256_mul_ps(r, r)), r),
        _mm256_set1_ps(1.0),
    );
    let n = _mm256_cvttps_epi32(n);
    // n / 2 rounded toward zero, as Rust's integer division: add 1 to negative n first.
    let half = _mm256_srai_epi32::<1>(_mm256_add_epi32(n, _mm256_srli_epi32::<31>(n)));
    let power = |e: __m256i| {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            e,
            _mm256_set1_epi32(127),
        )))
    };
    _mm256_mul_ps(
        _mm256_mul_ps(y, power(half)),
        power(_mm256_sub_epi32(n, half)),
    )
}

/// The sum of the 8 lanes, always in the same order.
#[target_feature(enable = "avx2")]
fn reduce_add(x: __m256) -> f32 {
    let x = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)))
}

/// The largest of the 8 lanes.
#[target_feature(enable = "avx2")]
fn reduce_max(x: __m256) -> f32 {
    let x = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)))
}
