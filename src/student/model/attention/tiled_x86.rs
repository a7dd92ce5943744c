//! The AVX-512 kernel of the tiled attention, for heads of `16 * C` values (64 or 128).
//!
//! Per key block: the keys are widened transposed, `[head_dim][KEY_BLOCK]`, so a query
//! vector's scores against 16 keys are one register built by broadcast-query FMAs, with no
//! horizontal sums; the softmax exponentiates 16 scores at a time ([`exp`]); the values are
//! widened once and each vector adds them up weighted, 16 head values per register.
//!
//! Every sum a vector makes runs in a fixed order that depends only on its own position:
//! scores over the head in order, weights lane by lane over the block's registers and then one
//! fixed reduction, weighted values over positions in order. Positions it does not see score
//! `-inf`, weigh `+0` (adding nothing to a sum of non-negative weights) and are masked out
//! of its weighted values, so a partly seen block gives the bits a shorter one would.

use std::arch::x86_64::*;

use super::{Block, EXP_POLYNOMIAL, Item, KEY_BLOCK, Scratch, Source};

/// Registers of 16 positions in a key block.
const KEY_CHUNKS: usize = KEY_BLOCK / 16;

/// Query vectors scored together: `SCORE_TILE * KEY_CHUNKS` accumulators.
const SCORE_TILE: usize = 16 / KEY_CHUNKS;

/// [`super::portable_item`] in AVX-512 arithmetic: the results land in `s.out`.
///
/// # Safety
/// The CPU must have AVX-512 F and VL, F16C and FMA, and the head `16 * C` values.
#[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
pub(super) unsafe fn attend_item<const C: usize>(src: &Source, item: &Item, s: &mut Scratch) {
    assert_eq!(src.head_dim, 16 * C);
    s.start(item.vectors(), 16 * C);
    for block in item.blocks() {
        widen_keys::<C>(src, &block, &mut s.keys);
        widen_values::<C>(src, &block, &mut s.values);
        weigh_keys::<C>(s, item, &block);
        weigh_values::<C>(s, item, &block);
    }
    s.finish(16 * C);
}

/// The block's keys as f32, transposed to `[head value][position]`: a 16 x 16 square at a
/// time. Positions past `block.keys` in the last square are zeros, and squares after it keep
/// an earlier block's keys: no row sees those positions, and [`softmax`] masks their scores.
#[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
fn widen_keys<const C: usize>(src: &Source, block: &Block, wide: &mut [f32]) {
    assert!(wide.len() >= 16 * C * KEY_BLOCK);
    for first in (0..block.keys).step_by(16) {
        for c in 0..C {
            let mut square = [_mm512_setzero_ps(); 16];
            for (i, row) in square.iter_mut().enumerate().take(block.keys - first) {
                let key = &src.key(block.start + first + i)[16 * c..16 * c + 16];
                // SAFETY: `key` holds the 16 values loaded.
                *row = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(key.as_ptr().cast()) });
            }
            for (d, column) in transpose(square).into_iter().enumerate() {
                let at = (16 * c + d) * KEY_BLOCK + first;
                // SAFETY: `first + 16 <= KEY_BLOCK`, and `wide` holds `16 * C` rows of them.
                unsafe { _mm512_storeu_ps(wide.as_mut_ptr().add(at), column) };
            }
        }
    }
}

/// The 16 x 16 transpose: in 128-bit lanes, pairs of rows, then quads, then whole registers.
#[target_feature(enable = "avx512f")]
fn transpose(r: [__m512; 16]) -> [__m512; 16] {
    let mut pairs = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        pairs[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        pairs[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // quads[4a + m], lane k: element 4k + m of rows 4a..4a + 4.
    let mut quads = [_mm512_setzero_ps(); 16];
    for a in 0..4 {
        let p = &pairs[4 * a..4 * a + 4];
        quads[4 * a] = _mm512_shuffle_ps::<0x44>(p[0], p[2]);
        quads[4 * a + 1] = _mm512_shuffle_ps::<0xEE>(p[0], p[2]);
        quads[4 * a + 2] = _mm512_shuffle_ps::<0x44>(p[1], p[3]);
        quads[4 * a + 3] = _mm512_shuffle_ps::<0xEE>(p[1], p[3]);
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for m in 0..4 {
        let (a, b) = (quads[m], quads[4 + m]);
        let (c, d) = (quads[8 + m], quads[12 + m]);
        let even = (
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0x88>(c, d),
        );
        let odd = (
            _mm512_shuffle_f32x4::<0xDD>(a, b),
            _mm512_shuffle_f32x4::<0xDD>(c, d),
        );
        out[m] = _mm512_shuffle_f32x4::<0x88>(even.0, even.1);
        out[8 + m] = _mm512_shuffle_f32x4::<0xDD>(even.0, even.1);
        out[4 + m] = _mm512_shuffle_f32x4::<0x88>(odd.0, odd.1);
        out[12 + m] = _mm512_shuffle_f32x4::<0xDD>(odd.0, odd.1);
    }
    out
}

/// The block's values as f32, `[position][head value]`.
#[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
fn widen_values<const C: usize>(src: &Source, block: &Block, wide: &mut [f32]) {
    assert!(wide.len() >= block.keys * 16 * C);
    for j in 0..block.keys {
        let value = src.value(block.start + j);
        for c in 0..C {
            // SAFETY: `value` holds `16 * C` values and `wide` room for `block.keys` rows.
            unsafe {
                let wide16 = _mm512_cvtph_ps(_mm256_loadu_si256(value.as_ptr().add(16 * c).cast()));
                _mm512_storeu_ps(wide.as_mut_ptr().add((j * C + c) * 16), wide16);
            }
        }
    }
}

/// Each vector's weights for the block's positions, in tiles of [`SCORE_TILE`] vectors.
#[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
fn weigh_keys<const C: usize>(s: &mut Scratch, item: &Item, block: &Block) {
    let mut v = block.first_vector;
    while v < item.vectors() {
        let tile = (item.vectors() - v).min(SCORE_TILE);
        match tile {
            4 => key_tile::<C, 4>(s, item, block, v),
            3 => key_tile::<C, 3>(s, item, block, v),
            2 => key_tile::<C, 2>(s, item, block, v),
            _ => key_tile::<C, 1>(s, item, block, v),
        }
        v += tile;
    }
}

/// Vectors `v..v + V`: their scores, one broadcast query value times 16 keys at a time and
/// summed over the head in order, then [`softmax`] of them while still in registers.
#[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
fn key_tile<const C: usize, const V: usize>(s: &mut Scratch, item: &Item, block: &Block, v: usize) {
    let hd = 16 * C;
    assert!(s.queries.len() >= (v + V) * hd && s.keys.len() >= hd * KEY_BLOCK);
    let (queries, keys) = (s.queries.as_ptr(), s.keys.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); KEY_CHUNKS]; V];
    // SAFETY: the reads stay inside the lengths asserted above.
    unsafe {
        for d in 0..hd {
            let mut k = [_mm512_setzero_ps(); KEY_CHUNKS];
            for (c, k) in k.iter_mut().enumerate() {
                *k = _mm512_loadu_ps(keys.add(d * KEY_BLOCK + 16 * c));
            }
            for (u, acc) in acc.iter_mut().enumerate() {
                let q = _mm512_set1_ps(*queries.add((v + u) * hd + d));
                for (a, k) in acc.iter_mut().zip(&k) {
                    *a = _mm512_fmadd_ps(q, *k, *a);
                }
            }
        }
    }
    let mut seen = [0; V];
    for (u, seen) in seen.iter_mut().enumerate() {
        *seen = block.keys.min(item.position(v + u) + 1 - block.start);
    }
    softmax(s, v, acc, &seen);
}

/// Scores of vectors `v..v + V` against the block become weights `exp(score - max)` for the
/// positions each sees (`seen[u]` from the block's start; the rest weigh zero); their running
/// maxima and sums are updated, and the factors this block rescales their `out` by are kept.
/// Stage by stage over the tile, so the vectors' dependency chains overlap.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
fn softmax<const V: usize>(
    s: &mut Scratch,
    v: usize,
    mut x: [[__m512; KEY_CHUNKS]; V],
    seen: &[usize; V],
) {
    let weights = &mut s.scores[v * KEY_BLOCK..(v + V) * KEY_BLOCK];
    let (max, sum, rescale) = (
        &mut s.max[v..v + V],
        &mut s.sum[v..v + V],
        &mut s.rescale[v..v + V],
    );
    for (x, &seen) in x.iter_mut().zip(seen) {
        for (c, x) in x.iter_mut().enumerate() {
            let lanes = seen.saturating_sub(16 * c).min(16);
            let keep = ((1u32 << lanes) - 1) as u16;
            *x = _mm512_mask_mov_ps(_mm512_set1_ps(f32::NEG_INFINITY), keep, *x);
        }
    }
    for u in 0..V {
        let old = max[u];
        max[u] = old.max(reduce_max(
            x[u].iter().fold(x[u][0], |m, &x| _mm512_max_ps(m, x)),
        ));
        rescale[u] = if max[u] > old {
            _mm512_cvtss_f32(exp(_mm512_set1_ps(old - max[u])))
        } else {
            1.0
        };
    }
    let mut total = [_mm512_setzero_ps(); V];
    for (u, x) in x.iter().enumerate() {
        for (c, x) in x.iter().enumerate() {
            let w = exp(_mm512_sub_ps(*x, _mm512_set1_ps(max[u])));
            total[u] = _mm512_add_ps(total[u], w);
            // SAFETY: `weights` holds `KEY_BLOCK` weights for each of the `V` vectors.
            unsafe { _mm512_storeu_ps(weights.as_mut_ptr().add(u * KEY_BLOCK + 16 * c), w) };
        }
    }
    for u in 0..V {
        sum[u] = sum[u] * rescale[u] + reduce_add(total[u]);
    }
}

/// Adds each vector's weighted values of the block to its `out`, rescaled first, in tiles of
/// vectors that keep 16 accumulators.
#[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
fn weigh_values<const C: usize>(s: &mut Scratch, item: &Item, block: &Block) {
    let mut v = block.first_vector;
    while v < item.vectors() {
        let tile = (item.vectors() - v).min(16 / C);
        match tile {
            4 => value_tile::<C, 4>(s, item, block, v),
            3 => value_tile::<C, 3>(s, item, block, v),
            2 => value_tile::<C, 2>(s, item, block, v),
            _ => value_tile::<C, 1>(s, item, block, v),
        }
        v += tile;
    }
}

/// Vectors `v..v + V`: `out = out * rescale + sum of weight * value` over the block's
/// positions in order, those after a vector's own masked out of its sum.
#[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
fn value_tile<const C: usize, const V: usize>(
    s: &mut Scratch,
    item: &Item,
    block: &Block,
    v: usize,
) {
    let hd = 16 * C;
    assert!(s.out.len() >= (v + V) * hd && s.scores.len() >= (v + V) * KEY_BLOCK);
    assert!(s.values.len() >= block.keys * hd && block.keys <= KEY_BLOCK);
    let mut last = [0; V];
    for (u, last) in last.iter_mut().enumerate() {
        *last = item.position(v + u) - block.start;
    }
    let masked = last.iter().any(|&l| l + 1 < block.keys);
    let (out, scores, values) = (s.out.as_mut_ptr(), s.scores.as_ptr(), s.values.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); C]; V];
    // SAFETY: the reads and writes stay inside the lengths asserted above.
    unsafe {
        for (u, acc) in acc.iter_mut().enumerate() {
            let rescale = _mm512_set1_ps(s.rescale[v + u]);
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm512_mul_ps(_mm512_loadu_ps(out.add((v + u) * hd + 16 * c)), rescale);
            }
        }
        if masked {
            accumulate::<C, V, true>(
                &mut acc,
                scores.add(v * KEY_BLOCK),
                values,
                block.keys,
                &last,
            );
        } else {
            accumulate::<C, V, false>(
                &mut acc,
                scores.add(v * KEY_BLOCK),
                values,
                block.keys,
                &last,
            );
        }
        for (u, acc) in acc.iter().enumerate() {
            for (c, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add((v + u) * hd + 16 * c), *a);
            }
        }
    }
}

/// `acc[u] += weights[u][j] * values[j]` for `j < keys`; with `MASKED`, only for `j <= last[u]`
/// (the lanes of the others are left as they are, not added `+0` or `-0`).
///
/// # Safety
/// `weights` must hold `V` rows of [`KEY_BLOCK`] and `values` `keys` rows of `16 * C`.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
unsafe fn accumulate<const C: usize, const V: usize, const MASKED: bool>(
    acc: &mut [[__m512; C]; V],
    weights: *const f32,
    values: *const f32,
    keys: usize,
    last: &[usize; V],
) {
    for j in 0..keys {
        let mut w = [_mm512_setzero_ps(); C];
        for (c, w) in w.iter_mut().enumerate() {
            // SAFETY: row `j < keys` of `values` (see above).
            *w = unsafe { _mm512_loadu_ps(values.add((j * C + c) * 16)) };
        }
        for (u, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row `u < V` of `weights`, `j < keys <= KEY_BLOCK`.
            let p = _mm512_set1_ps(unsafe { *weights.add(u * KEY_BLOCK + j) });
            if MASKED {
                let keep: __mmask16 = if j <= last[u] { 0xFFFF } else { 0 };
                for (a, w) in acc.iter_mut().zip(&w) {
                    *a = _mm512_mask3_fmadd_ps(p, *w, *a, keep);
                }
            } else {
                for (a, w) in acc.iter_mut().zip(&w) {
                    *a = _mm512_fmadd_ps(p, *w, *a);
                }
            }
        }
    }
}

/// `e^x` lane by lane, within about one ulp of `f32::exp` (Cephes' `expf`): `x = n ln 2 + r`
/// with `|r| <= ln(2)/2`, a degree-7 polynomial for `e^r`, scaled by `2^n`. `exp(0)` is exactly
/// 1 and `exp(-inf)` exactly 0, which the masking relies on.
#[target_feature(enable = "avx512f")]
pub(super) fn exp(x: __m512) -> __m512 {
    // Below -104 every result rounds to zero (`2^-150`), above 89 to infinity; clamping keeps
    // `n` finite for infinities (`max`/`min` return a NaN `x` as it is).
    let x = _mm512_min_ps(_mm512_set1_ps(89.0), x);
    let x = _mm512_max_ps(_mm512_set1_ps(-110.0), x);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    // ln 2 in two parts: n * 0.693359375 is exact, so r keeps its low bits.
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(355.0 / 512.0), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm512_set1_ps(EXP_POLYNOMIAL[0]);
    for &c in &EXP_POLYNOMIAL[1..] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
    }
    let y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r);
    _mm512_scalef_ps(_mm512_add_ps(y, _mm512_set1_ps(1.0)), n)
}

/// The sum of the 16 lanes, always in the same order.
#[target_feature(enable = "avx512f")]
fn reduce_add(x: __m512) -> f32 {
    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
    let x = _mm256_add_ps(_mm512_castps512_ps256(x), high);
    let x = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)))
}

/// The largest of the 16 lanes.
#[target_feature(enable = "avx512f")]
fn reduce_max(x: __m512) -> f32 {
    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
    let x = _mm256_max_ps(_mm512_castps512_ps256(x), high);
    let x = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)))
}
