//! The AVX-512 VNNI kernels: 64 weights unpacked to unsigned bytes per 512-bit register and
//! multiplied with up to eight activation rows by `vpdpbusd`, weights prefetched ahead
//! (decoding waits on memory). Each format's constant offset is folded into the integer
//! accumulator and the float minimums of Q4_1 and Q4_K into the float one, so the inner loop
//! is five instructions per row and 64 weights.

use std::arch::x86_64::*;

use super::ROW_TILE;
use super::activations::ActPair;
use super::formats::{BlockFormat, Format};

/// Reads a little-endian f16 at `p`.
///
/// # Safety
/// `p` and `p + 1` must be readable.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller vouches for both bytes.
    unsafe { half::f16::from_bits(u16::from_le_bytes([*p, *p.add(1)])).to_f32() }
}

/// Two blocks' 16 bytes of packed nibbles (the second may be absent: zero) as 64 bytes in
/// value order: first block's low nibbles (values 0..16), its high ones, then the second's.
///
/// # Safety
/// 16 bytes must be readable at `first` (and at `second` when given), and the CPU must have
/// AVX-512 F/BW and AVX2.
#[inline(always)]
unsafe fn nibbles(first: *const u8, second: Option<*const u8>) -> __m512i {
    // SAFETY: the caller vouches for the bytes and the CPU features.
    unsafe {
        let a = _mm_loadu_si128(first.cast());
        let b = second.map_or(_mm_setzero_si128(), |p| _mm_loadu_si128(p.cast()));
        let packed = _mm256_set_m128i(b, a);
        let mask = _mm256_set1_epi8(0x0f);
        let low = _mm256_and_si256(packed, mask);
        let high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
        // 128-bit lanes [low a, low b, high a, high b] -> [low a, high a, low b, high b]
        let z = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
        _mm512_shuffle_i64x2(z, z, 0b11_01_10_00)
    }
}

/// How far ahead of the pair being unpacked weights are prefetched (measured on
/// SmolLM2 decoding: 512 bytes +17%, 1,024 +30%, 2,048 +7%).
const PREFETCH_AHEAD: usize = 1024;

/// Lanes 0-7 hold `a`, lanes 8-15 `b`.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[inline(always)]
unsafe fn halves(a: f32, b: f32) -> __m512 {
    // SAFETY: register-only arithmetic; the caller vouches for the CPU features.
    unsafe { _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(a), _mm512_set1_ps(b)) }
}

/// Two 32-byte halves as one register.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[inline(always)]
unsafe fn join(a: __m256i, b: __m256i) -> __m512i {
    // SAFETY: register-only arithmetic; the caller vouches for the CPU features.
    unsafe { _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1) }
}

/// Pair `pair` (values `64 * pair..`, the second half absent past `blocks` 32-value
/// blocks) of weight row `w` in format `B`, as 64 unsigned bytes, the scale of each lane,
/// and (Q4_1, Q4_K) the minimum of each lane.
///
/// # Safety
/// `w` must hold the whole row (`blocks` 32-value blocks of `B`) and the CPU must have the
/// features `dot` enables.
#[inline(always)]
unsafe fn unpack<B: BlockFormat>(
    w: *const u8,
    pair: usize,
    blocks: usize,
) -> (__m512i, __m512, __m512) {
    // SAFETY: every read stays inside the pair's blocks (the second block of a pair only
    // when `2 * pair + 1 < blocks`), which the caller vouches are in `w`.
    unsafe {
        let zero = _mm512_setzero_ps();
        match B::FORMAT {
            // Q4_1, Q5_0, Q8_0: two consecutive blocks of 32.
            Format::Q4_1 | Format::Q5_0 | Format::Q8_0 => {
                let p = w.add(2 * pair * B::BYTES);
                let second = (2 * pair + 1 < blocks).then(|| p.add(B::BYTES));
                let d = halves(f16_at(p), second.map_or(0.0, |q| f16_at(q)));
                match B::FORMAT {
                    Format::Q4_1 => {
                        let minimum =
                            halves(f16_at(p.add(2)), second.map_or(0.0, |q| f16_at(q.add(2))));
                        (nibbles(p.add(4), second.map(|q| q.add(4))), d, minimum)
                    }
                    Format::Q5_0 => {
                        let bits = |q: *const u8| {
                            u32::from_le_bytes([*q.add(2), *q.add(3), *q.add(4), *q.add(5)]) as u64
                        };
                        let high_bits = bits(p) | second.map_or(0, |q| bits(q) << 32);
                        let fifth = _mm512_maskz_mov_epi8(high_bits, _mm512_set1_epi8(0x10));
                        let u = _mm512_or_si512(nibbles(p.add(6), second.map(|q| q.add(6))), fifth);
                        (u, d, zero)
                    }
                    _ => {
                        // Signed bytes moved to 0..=255 by flipping the sign bit (q + 128).
                        let a = _mm256_loadu_si256(p.add(2).cast());
                        let b = second.map_or(_mm256_setzero_si256(), |q| {
                            _mm256_loadu_si256(q.add(2).cast())
                        });
                        (
                            _mm512_xor_si512(join(a, b), _mm512_set1_epi8(-128)),
                            d,
                            zero,
                        )
                    }
                }
            }
            // Q4_K: 32 bytes of nibbles per pair, low nibbles first.
            Format::Q4K => {
                let sb = w.add(pair / 4 * B::BYTES);
                let j = 2 * (pair % 4);
                let scales = std::slice::from_raw_parts(sb.add(4), 12);
                let (d, dmin) = (f16_at(sb), f16_at(sb.add(2)));
                let (s0, m0) = scale_min_k4(j, scales);
                let (s1, m1) = scale_min_k4(j + 1, scales);
                let q = _mm256_loadu_si256(sb.add(16 + 32 * (pair % 4)).cast());
                let mask = _mm256_set1_epi8(0x0f);
                let u = join(
                    _mm256_and_si256(q, mask),
                    _mm256_and_si256(_mm256_srli_epi16(q, 4), mask),
                );
                (u, halves(d * s0, d * s1), halves(-dmin * m0, -dmin * m1))
            }
            // Q6_K: in each half of 128, blocks (A, B) use the low nibbles of ql[0..32] and
            // ql[32..64] with qh bits 0-1 and 2-3; (C, D) the high nibbles with bits 4-7.
            Format::Q6K => {
                let sb = w.add(pair / 4 * B::BYTES);
                let (half, upper) = ((pair % 4) / 2, pair % 2 == 1);
                let ql = sb.add(64 * half);
                let qh = _mm256_loadu_si256(sb.add(128 + 32 * half).cast());
                let (lo, hi) = (
                    _mm256_loadu_si256(ql.cast()),
                    _mm256_loadu_si256(ql.add(32).cast()),
                );
                let (nibble_shift, bit_shift) = if upper { (4, 4) } else { (0, 0) };
                let mask = _mm256_set1_epi8(0x0f);
                let two = _mm256_set1_epi8(3);
                let shift = |v: __m256i, n: i32| match n {
                    0 => v,
                    2 => _mm256_srli_epi16(v, 2),
                    4 => _mm256_srli_epi16(v, 4),
                    _ => _mm256_srli_epi16(v, 6),
                };
                let value = |ql: __m256i, qh_shift: i32| {
                    let low = _mm256_and_si256(shift(ql, nibble_shift), mask);
                    let high = _mm256_slli_epi16(_mm256_and_si256(shift(qh, qh_shift), two), 4);
                    _mm256_or_si256(low, high)
                };
                let u = join(value(lo, bit_shift), value(hi, bit_shift + 2));
                let scales = sb
                    .add(192 + 8 * half + if upper { 4 } else { 0 })
                    .cast::<i8>();
                let d = f16_at(sb.add(208));
                let s = |i: usize| d * *scales.add(i) as f32;
                let per_lane = _mm512_setr_ps(
                    s(0),
                    s(0),
                    s(0),
                    s(0),
                    s(1),
                    s(1),
                    s(1),
                    s(1),
                    s(2),
                    s(2),
                    s(2),
                    s(2),
                    s(3),
                    s(3),
                    s(3),
                    s(3),
                );
                (u, per_lane, zero)
            }
        }
    }
}

/// Sub-block `j`'s 6-bit scale and minimum from a Q4_K super-block's 12 packed bytes.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (s, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (s as f32, m as f32)
}

/// One weight row (format `B`, `blocks` 32-value blocks at `w`) against the first `R` rows.
///
/// # Safety
/// The CPU must have the features enabled here ([`super::cpu_supported`]); `w` must hold the whole row
/// and each of the first `R` rows `blocks.div_ceil(2)` pairs.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot<B: BlockFormat, const R: usize>(
    w: &[u8],
    blocks: usize,
    rows: [&[ActPair]; ROW_TILE],
) -> [f32; ROW_TILE] {
    let mut acc = [_mm512_setzero_ps(); R];
    // Formats whose minimum is a float (Q4_1, Q4_K), and those with an integer offset.
    let has_minimum = B::HAS_MINIMUM;
    let has_offset = B::OFFSET != 0;
    let w = w.as_ptr();
    for pair in 0..blocks.div_ceil(2) {
        // SAFETY: `unpack` reads only blocks of this row (the second half of the last
        // pair only when it exists); rows hold `blocks.div_ceil(2)` pairs each (checked
        // by `matmul`).
        unsafe {
            // Decoding is bound by reading weights: ask for the bytes a few pairs ahead
            // (past the row's end lies the next row, or nothing a prefetch minds).
            let ahead = w.wrapping_add(pair * B::PAIR_BYTES + PREFETCH_AHEAD);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            let (u, d, minimum) = unpack::<B>(w, pair, blocks);
            for r in 0..R {
                let a = rows[r].get_unchecked(pair);
                let start = if has_offset {
                    _mm512_load_si512(a.offset_start.as_ptr().cast())
                } else {
                    _mm512_setzero_si512()
                };
                let dot = _mm512_dpbusd_epi32(start, u, _mm512_load_si512(a.qs.as_ptr().cast()));
                let scale = _mm512_mul_ps(d, _mm512_load_ps(a.scale.as_ptr()));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
                if has_minimum {
                    acc[r] = _mm512_fmadd_ps(minimum, _mm512_load_ps(a.mean_term.as_ptr()), acc[r]);
                }
            }
        }
    }
    let mut out = [0f32; ROW_TILE];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]);
    }
    out
}
