//! The AVX2 kernels: the AVX-512 kernels' layout and arithmetic in 256-bit halves, for the
//! CPUs most laptops have (Intel client CPUs since Haswell, AMD before Zen 4).
//!
//! A chunk's 64-byte register rows are two halves of eight 32-bit lanes each; every lane goes
//! through the same integer sums (`vpmaddubsw` then `vpmaddwd`, which cannot overflow for the
//! formats' value ranges), the same conversion, scaling and [`fold`] as on AVX-512, and a
//! (row, column)'s 16 lanes are added in the same pairwise order ([`sum_lanes`]). The results
//! are therefore the AVX-512 kernels' bits, which a test checks. Prompts and decoding both
//! multiply packed columns ([`pack_column`], [`tile`]): one path, so a row's result does
//! not depend on the rows beside it.

use std::arch::x86_64::*;

use super::WeightChunk;
use super::activations::ActChunk;
use super::formats::{BlockFormat, Format, q4k_chunk_scales, span_scale};

/// One block's 16 bytes of packed nibbles as its 32 values in order: low nibbles, then high.
///
/// # Safety
/// 16 bytes must be readable at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller vouches for the 16 bytes.
    let packed = unsafe { _mm_loadu_si128(p.cast()) };
    let mask = _mm_set1_epi8(0x0f);
    let low = _mm_and_si128(packed, mask);
    let high = _mm_and_si128(_mm_srli_epi16::<4>(packed), mask);
    _mm256_set_m128i(high, low)
}

/// `0x10` in byte `i` where bit `i` of `bits` is set (Q5_0's fifth bits), zero elsewhere.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn fifth_bits(bits: u32) -> __m256i {
    // Byte i gets byte i / 8 of `bits`; or-ing every bit but bit i % 8 leaves all ones
    // exactly where bit i was set.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_setr_epi64x(
            0,
            0x0101_0101_0101_0101,
            0x0202_0202_0202_0202,
            0x0303_0303_0303_0303,
        ),
    );
    let others = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    let set = _mm256_cmpeq_epi8(others, _mm256_set1_epi64x(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Pair `pair` (values `64 * pair..`; the second block absent past `blocks` 32-value blocks:
/// zero) of weight row `w` in format `B`, as 64 unsigned bytes in value order, in two halves.
///
/// # Safety
/// `w` must hold the whole row (`blocks` 32-value blocks of `B`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn unpack<B: BlockFormat>(
    w: *const u8,
    pair: usize,
    blocks: usize,
) -> [__m256i; 2] {
    // SAFETY: every read stays inside the pair's blocks (the second block of a pair only
    // when `2 * pair + 1 < blocks`), which the caller vouches are in `w`.
    unsafe {
        match B::FORMAT {
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q8_0 => {
                let first = w.add(2 * pair * B::BYTES);
                let block = |p: *const u8| match B::FORMAT {
                    Format::Q4_0 => nibbles(p.add(2)),
                    Format::Q4_1 => nibbles(p.add(4)),
                    Format::Q5_0 | Format::Q5_1 => {
                        // The fifth bits, then the nibbles, after the f16 scale (Q5_1: and
                        // minimum).
                        let h = p.add(if B::FORMAT == Format::Q5_0 { 2 } else { 4 });
                        let bits = u32::from_le_bytes([*h, *h.add(1), *h.add(2), *h.add(3)]);
                        _mm256_or_si256(nibbles(h.add(4)), fifth_bits(bits))
                    }
                    // Signed bytes moved to 0..=255 by flipping the sign bit (q + 128).
                    _ => _mm256_xor_si256(
                        _mm256_loadu_si256(p.add(2).cast()),
                        _mm256_set1_epi8(-128),
                    ),
                };
                let second = if 2 * pair + 1 < blocks {
                    block(first.add(B::BYTES))
                } else {
                    _mm256_setzero_si256()
                };
                [block(first), second]
            }
            // Q4_K: 32 bytes of nibbles per pair, low nibbles first.
            Format::Q4K => {
                let sb = w.add(pair / 4 * B::BYTES);
                let q = _mm256_loadu_si256(sb.add(16 + 32 * (pair % 4)).cast());
                let mask = _mm256_set1_epi8(0x0f);
                [
                    _mm256_and_si256(q, mask),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask),
                ]
            }
            // Q5_K: Q4_K's nibbles (after 32 bytes of fifth bits), and bits 2j, 2j + 1 of
            // those 32 bytes for pair j of the super-block.
            Format::Q5K => {
                let sb = w.add(pair / 4 * B::BYTES);
                let j = pair % 4;
                let q = _mm256_loadu_si256(sb.add(48 + 32 * j).cast());
                let qh = _mm256_loadu_si256(sb.add(16).cast());
                let mask = _mm256_set1_epi8(0x0f);
                let fifth = |bit: usize| {
                    let bit = _mm256_set1_epi8(1 << bit);
                    let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
                };
                [
                    _mm256_or_si256(_mm256_and_si256(q, mask), fifth(2 * j)),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask),
                        fifth(2 * j + 1),
                    ),
                ]
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
                let mask = _mm256_set1_epi8(0x0f);
                let two = _mm256_set1_epi8(3);
                let shift = |v: __m256i, n: u32| match n {
                    0 => v,
                    2 => _mm256_srli_epi16::<2>(v),
                    4 => _mm256_srli_epi16::<4>(v),
                    _ => _mm256_srli_epi16::<6>(v),
                };
                let (nibble_shift, bit_shift) = if upper { (4, 4) } else { (0, 0) };
                let value = |ql: __m256i, qh_shift: u32| {
                    let low = _mm256_and_si256(shift(ql, nibble_shift), mask);
                    let high = _mm256_slli_epi16::<4>(_mm256_and_si256(shift(qh, qh_shift), two));
                    _mm256_or_si256(low, high)
                };
                [value(lo, bit_shift), value(hi, bit_shift + 2)]
            }
        }
    }
}

/// The 4 x 4 transpose of 32-bit values within each 128-bit lane of four registers.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn transpose4(r: [__m256i; 4]) -> [__m256i; 4] {
    let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
    let t1 = _mm256_unpacklo_epi32(r[2], r[3]);
    let t2 = _mm256_unpackhi_epi32(r[0], r[1]);
    let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    [
        _mm256_unpacklo_epi64(t0, t1),
        _mm256_unpackhi_epi64(t0, t1),
        _mm256_unpacklo_epi64(t2, t3),
        _mm256_unpackhi_epi64(t2, t3),
    ]
}

/// `G` registers of 16 spans in value order (register `p`, lane `s * G + d`: group `d` of
/// span `p * 16 / G + s`), each in two halves of 8 lanes, to the kernels' layout (register
/// `d`, lane `s * G + p`): 8 x 8 transposes of each half for `G` = 8, 4 x 4 ones of each
/// 128-bit lane for `G` = 4.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn transpose<const G: usize>(natural: [[__m256i; 2]; G]) -> [[__m256i; 2]; G] {
    let mut out = natural;
    for h in 0..2 {
        let half: [__m256i; G] = std::array::from_fn(|p| natural[p][h]);
        if G == 4 {
            let t = transpose4([half[0], half[1], half[2], half[3]]);
            for d in 0..4 {
                out[d][h] = t[d];
            }
        } else {
            let a = transpose4([half[0], half[1], half[2], half[3]]);
            let b = transpose4([half[4], half[5], half[6], half[7]]);
            for d in 0..4 {
                out[d][h] = _mm256_permute2x128_si256::<0x20>(a[d], b[d]);
                out[d + 4][h] = _mm256_permute2x128_si256::<0x31>(a[d], b[d]);
            }
        }
    }
    out
}

/// Unpacks one weight row (format `B`, `blocks` 32-value blocks) into `out`, one
/// [`WeightChunk`] per 16 spans; spans past the row's end are zero.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` must hold the whole row and `out`
/// `blocks * 32 / (64 * G)` rounded up chunks; `G` must be `B::GROUPS`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn pack_column<B: BlockFormat, const G: usize>(
    w: &[u8],
    blocks: usize,
    out: &mut [WeightChunk<G>],
) {
    debug_assert_eq!(G, B::GROUPS);
    let spans = blocks * 32 / (4 * G);
    let w = w.as_ptr();
    for (c, chunk) in out.iter_mut().enumerate() {
        let natural: [[__m256i; 2]; G] = std::array::from_fn(|p| {
            let pair = c * G + p;
            if 2 * pair < blocks {
                // SAFETY: the pair starts inside the row (the caller vouches for the row).
                unsafe { unpack::<B>(w, pair, blocks) }
            } else {
                [_mm256_setzero_si256(); 2]
            }
        });
        for (group, halves) in chunk.u.iter_mut().zip(transpose(natural)) {
            // SAFETY: each store is of 32 bytes into a 64-byte row.
            unsafe {
                _mm256_storeu_si256(group.as_mut_ptr().cast(), halves[0]);
                _mm256_storeu_si256(group.as_mut_ptr().add(32).cast(), halves[1]);
            }
        }
        let chunk_spans = (spans - 16 * c).min(16);
        // SAFETY: the chunk's spans lie inside the row.
        unsafe { span_scales::<B, G>(w, c, chunk_spans, &mut chunk.scale, &mut chunk.minimum) };
    }
}

/// The scales and minimums of chunk `c`'s first `spans` spans in lane order
/// ([`super::lane_span`]) into `scale` and `minimum`; zero past them. The 32-value formats' are gathered
/// 8 at a time (a scalar conversion per span cost as much as unpacking them).
///
/// # Safety
/// The chunk's spans must lie inside the row at `w`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn span_scales<B: BlockFormat, const G: usize>(
    w: *const u8,
    c: usize,
    spans: usize,
    scale: &mut [f32; 16],
    minimum: &mut [f32; 16],
) {
    if B::VALUES == 32 {
        // Each block starts with its f16 scale (Q4_1, Q5_1: then its f16 minimum).
        let base = w.wrapping_add(c * 16 * B::BYTES);
        for h in 0..2 {
            let lanes: [usize; 8] = std::array::from_fn(|i| super::lane_span(8 * h + i, G));
            let offsets: [i32; 8] = std::array::from_fn(|i| (lanes[i] * B::BYTES) as i32);
            let present: [i32; 8] = std::array::from_fn(|i| -i32::from(lanes[i] < spans));
            // SAFETY: only the words of spans below `spans`, which lie in the row, are read.
            let words = unsafe {
                _mm256_mask_i32gather_epi32::<1>(
                    _mm256_setzero_si256(),
                    base.cast(),
                    _mm256_loadu_si256(offsets.as_ptr().cast()),
                    _mm256_loadu_si256(present.as_ptr().cast()),
                )
            };
            let halves = |v: __m256i| {
                // The low 16 bits of each word, in order, widened from f16.
                let packed = _mm256_packus_epi32(v, v);
                let ordered = _mm256_permute4x64_epi64::<0b10_00>(packed);
                _mm256_cvtph_ps(_mm256_castsi256_si128(ordered))
            };
            let mask = _mm256_set1_epi32(0xffff);
            // SAFETY: 8 floats at `8 * h` of 16-float arrays.
            unsafe {
                let scales = halves(_mm256_and_si256(words, mask));
                _mm256_storeu_ps(scale.as_mut_ptr().add(8 * h), scales);
                let minimums = if B::HAS_MINIMUM {
                    halves(_mm256_srli_epi32::<16>(words))
                } else {
                    _mm256_setzero_ps()
                };
                _mm256_storeu_ps(minimum.as_mut_ptr().add(8 * h), minimums);
            }
        }
        return;
    }
    if matches!(B::FORMAT, Format::Q4K | Format::Q5K) {
        // SAFETY: the chunk's spans lie inside the row.
        (*scale, *minimum) = unsafe { q4k_chunk_scales::<B>(w, c, 16 * c + spans) };
        return;
    }
    for lane in 0..16 {
        let span = 16 * c + super::lane_span(lane, G);
        (scale[lane], minimum[lane]) = if span - 16 * c < spans {
            // SAFETY: the span lies inside the row.
            unsafe { span_scale::<B>(w, span) }
        } else {
            (0.0, 0.0)
        };
    }
}

/// Rows and columns multiplied together at a time: AVX2 has 16 registers, half of what a
/// 4 x 4 tile's sums would need.
const SUB_TILE: usize = 2;

/// The dot products of `R` activation rows with `C` packed columns (format `B`, `chunks`
/// chunks each), as [`super::avx512::tile`] computes them, to the bit; with `VNNI`, the byte
/// products are AVX-VNNI's (see [`add_dot4`]).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C, and AVX-VNNI for `VNNI`; every column and row must
/// hold `chunks` chunks; `G` must be `B::GROUPS`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile<
    B: BlockFormat,
    const G: usize,
    const R: usize,
    const C: usize,
    const VNNI: bool,
>(
    columns: [&[WeightChunk<G>]; C],
    rows: [&[ActChunk<G>]; R],
    chunks: usize,
) -> [[f32; C]; R] {
    let mut out = [[0f32; C]; R];
    for r0 in (0..R).step_by(SUB_TILE) {
        for c0 in (0..C).step_by(SUB_TILE) {
            let columns: [&[WeightChunk<G>]; SUB_TILE] =
                std::array::from_fn(|i| columns[(c0 + i).min(C - 1)]);
            // SAFETY: the caller vouches for the rows, columns and features.
            unsafe {
                if r0 + 1 < R {
                    let lanes =
                        sub_tile::<B, G, 2, VNNI>(columns, [rows[r0], rows[r0 + 1]], chunks);
                    add_up(&lanes, r0, c0, &mut out);
                } else {
                    // A lone last row (decoding one sequence): no second row's work.
                    let lanes = sub_tile::<B, G, 1, VNNI>(columns, [rows[r0]], chunks);
                    add_up(&lanes, r0, c0, &mut out);
                }
            }
        }
    }
    out
}

/// Each (row, column)'s lanes of a sub-tile at `(r0, c0)` added up into `out` (columns
/// past `C`, which padded the sub-tile, dropped).
fn add_up<const RS: usize, const R: usize, const C: usize>(
    lanes: &[[[f32; 16]; SUB_TILE]; RS],
    r0: usize,
    c0: usize,
    out: &mut [[f32; C]; R],
) {
    for (i, lanes) in lanes.iter().enumerate() {
        for (j, lanes) in lanes.iter().enumerate() {
            if c0 + j < C {
                out[r0 + i][c0 + j] = sum_lanes(lanes);
            }
        }
    }
}

/// The 16 lane sums of a tile of `R` rows (1 or 2) by 2 columns, half by half over all
/// chunks.
///
/// # Safety
/// As [`tile`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sub_tile<B: BlockFormat, const G: usize, const R: usize, const VNNI: bool>(
    w: [&[WeightChunk<G>]; SUB_TILE],
    a: [&[ActChunk<G>]; R],
    chunks: usize,
) -> [[[f32; 16]; SUB_TILE]; R] {
    let mut lanes = [[[0f32; 16]; SUB_TILE]; R];
    for h in 0..2 {
        let at = 8 * h;
        let mut acc = [[_mm256_setzero_ps(); SUB_TILE]; R];
        for ch in 0..chunks {
            // SAFETY: `ch < chunks`, which every row and column holds (the caller vouches);
            // every load is of 32 bytes inside a 64-byte row or a 16-value array.
            unsafe {
                let w: [&WeightChunk<G>; SUB_TILE] =
                    std::array::from_fn(|c| w[c].get_unchecked(ch));
                let a: [&ActChunk<G>; R] = std::array::from_fn(|r| a[r].get_unchecked(ch));
                let mut sums = [[_mm256_setzero_si256(); SUB_TILE]; R];
                // Q8_0 is multiplied signed (see `dot4`): its offset is not added.
                if B::OFFSET != 0 && B::FORMAT != Format::Q8_0 {
                    for r in 0..R {
                        let start = _mm256_loadu_si256(a[r].offset.as_ptr().add(at).cast());
                        sums[r] = [start; SUB_TILE];
                    }
                }
                for j in 0..G {
                    let u: [__m256i; SUB_TILE] = std::array::from_fn(|c| {
                        _mm256_load_si256(w[c].u[j].as_ptr().add(4 * at).cast())
                    });
                    for r in 0..R {
                        let q = _mm256_load_si256(a[r].qs[j].as_ptr().add(4 * at).cast());
                        for c in 0..SUB_TILE {
                            sums[r][c] = add_dot4::<B, VNNI>(sums[r][c], u[c], q);
                        }
                    }
                }
                for r in 0..R {
                    for c in 0..SUB_TILE {
                        acc[r][c] = fold::<B, G>(
                            sums[r][c],
                            (&w[c].scale, &w[c].minimum),
                            a[r],
                            at,
                            acc[r][c],
                        );
                    }
                }
            }
        }
        for r in 0..R {
            for c in 0..SUB_TILE {
                // SAFETY: 8 floats stored into 8 of the 16.
                unsafe { _mm256_storeu_ps(lanes[r][c].as_mut_ptr().add(at), acc[r][c]) };
            }
        }
    }
    lanes
}

/// `acc` plus each 32-bit lane's sum of its 4 products `u * q` (unsigned weight bytes, signed
/// activations). The 16-bit pair sums of `vpmaddubsw` stay below 2 * 63 * 127 for the 4-, 5-
/// and 6-bit formats; Q8_0's bytes (up to 255) could overflow them, so its weights are
/// multiplied signed, `|w| * (q with w's sign)`: the same sum less the offset term.
///
/// With `VNNI`, one `vpdpbusd` does it all; no pair sum saturates, so the integers are the
/// same. It is written as `asm!` because the intrinsic inlines only into functions compiled
/// with AVX-VNNI, and these kernels are compiled once, for AVX2, for both.
///
/// # Safety
/// With `VNNI`, the CPU must have AVX-VNNI.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn add_dot4<B: BlockFormat, const VNNI: bool>(
    mut acc: __m256i,
    u: __m256i,
    q: __m256i,
) -> __m256i {
    let (u, q) = if B::FORMAT == Format::Q8_0 {
        let w = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
        (_mm256_sign_epi8(w, w), _mm256_sign_epi8(q, w))
    } else {
        (u, q)
    };
    if VNNI {
        // SAFETY: the caller vouches for AVX-VNNI; the instruction touches only registers.
        unsafe {
            std::arch::asm!(
                "{{vex}} vpdpbusd {acc}, {u}, {q}",
                acc = inout(ymm_reg) acc,
                u = in(ymm_reg) u,
                q = in(ymm_reg) q,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    } else {
        let pairs = _mm256_maddubs_epi16(u, q);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// `acc` plus one chunk's integer lane sums for lanes `at..at + 8`, as the AVX-512
/// kernels' `fold` does lane by lane.
///
/// # Safety
/// `at` must be 0 or 8.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fold<B: BlockFormat, const G: usize>(
    sums: __m256i,
    (scale, minimum): (&[f32; 16], &[f32; 16]),
    a: &ActChunk<G>,
    at: usize,
    acc: __m256,
) -> __m256 {
    // SAFETY: 8 floats at `at` of 16-float arrays.
    unsafe {
        let scale = _mm256_mul_ps(
            _mm256_loadu_ps(scale.as_ptr().add(at)),
            _mm256_loadu_ps(a.scale.as_ptr().add(at)),
        );
        let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
        if B::HAS_MINIMUM {
            _mm256_fmadd_ps(
                _mm256_loadu_ps(minimum.as_ptr().add(at)),
                _mm256_loadu_ps(a.mean.as_ptr().add(at)),
                acc,
            )
        } else {
            acc
        }
    }
}

/// The 16 lanes added as the AVX-512 kernels' `sum_lanes` does: adjacent pairs, then
/// adjacent pairs of those, and so on.
fn sum_lanes(lanes: &[f32; 16]) -> f32 {
    let mut v = *lanes;
    let mut live = 16;
    while live > 1 {
        for i in 0..live / 2 {
            v[i] = v[2 * i] + v[2 * i + 1];
        }
        live /= 2;
    }
    v[0]
}

/// The 8 lanes of each of `v` added up: lane `i` is the sum of `v[i]`'s lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn sum_each(v: [__m256i; 8]) -> __m256i {
    let t: [__m256i; 4] = std::array::from_fn(|i| _mm256_hadd_epi32(v[2 * i], v[2 * i + 1]));
    let (u0, u1) = (_mm256_hadd_epi32(t[0], t[1]), _mm256_hadd_epi32(t[2], t[3]));
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(u0, u1),
        _mm256_permute2x128_si256::<0x31>(u0, u1),
    )
}

/// Decoding: one weight row (format `B`, `blocks` blocks) against `R` activation rows whose
/// chunks hold their values in value order (`activations::quantize_row` with `interleaved`
/// false). Each pair of blocks is multiplied as it is unpacked; the integer sums of every
/// span (exact, in whatever order) are put in lane order and [`fold`]ed and added up as
/// [`tile`] does: the same bits, without packing the row first.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` must hold the row and every row `chunks`
/// chunks; `G` must be `B::GROUPS`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_row<B: BlockFormat, const G: usize, const R: usize, const VNNI: bool>(
    w: &[u8],
    blocks: usize,
    rows: [&[ActChunk<G>]; R],
    chunks: usize,
) -> [f32; R] {
    let spans = blocks * 32 / (4 * G);
    let w = w.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let (mut scale, mut minimum) = ([0f32; 16], [0f32; 16]);
    for c in 0..chunks {
        // SAFETY: every chunk index is below `chunks`, which each row holds.
        let a: [&ActChunk<G>; R] = std::array::from_fn(|r| unsafe { rows[r].get_unchecked(c) });
        // Each row's span sums in span order.
        let mut by_span = [[0i32; 16]; R];
        for half in 0..2 {
            // Pairs `first..first + G / 2` of the chunk: 8 of its 16 spans.
            let first = half * G / 2;
            let mut dots = [[_mm256_setzero_si256(); 8]; R];
            for p in 0..G / 2 {
                let pair = c * G + first + p;
                if 2 * pair >= blocks {
                    break;
                }
                // Decoding waits on memory: ask for the bytes a few pairs ahead (as the
                // AVX-512 kernel does; past the row's end a prefetch minds nothing).
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(pair * B::PAIR_BYTES + 1024).cast());
                // SAFETY: the pair starts inside the row.
                let u = unsafe { unpack::<B>(w, pair, blocks) };
                for r in 0..R {
                    for (k, u) in u.iter().enumerate() {
                        // SAFETY: 32 bytes of the pair's 64-byte row.
                        let q = unsafe {
                            _mm256_load_si256(a[r].qs[first + p].as_ptr().add(32 * k).cast())
                        };
                        // SAFETY: the caller vouches for AVX-VNNI where `VNNI`.
                        dots[r][2 * p + k] =
                            unsafe { add_dot4::<B, VNNI>(_mm256_setzero_si256(), *u, q) };
                    }
                }
            }
            for r in 0..R {
                let mut sums = [0i32; 8];
                if G == 8 {
                    // dots[2p + k]: span 2 * (first + p) + k, one per register.
                    // SAFETY: 8 integers into an 8-integer array.
                    unsafe { _mm256_storeu_si256(sums.as_mut_ptr().cast(), sum_each(dots[r])) };
                    by_span[r][8 * half..8 * half + 8].copy_from_slice(&sums);
                } else {
                    // Q6_K: dots[2p + k] holds spans 4 * (first + p) + 2k (lanes 0..4) and
                    // + 1 (lanes 4..8); adding lanes within each half-register gives them.
                    let d = dots[r];
                    for i in 0..G / 2 {
                        let t = _mm256_hadd_epi32(d[2 * i], d[2 * i + 1]);
                        let quad = _mm256_hadd_epi32(t, t);
                        let mut lanes = [0i32; 8];
                        // SAFETY: 8 integers into an 8-integer array.
                        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), quad) };
                        // Lane 0: register 2i's first 4, lane 1: register 2i + 1's; lanes
                        // 4 and 5 the same for their last 4.
                        let base = 4 * (first + i);
                        by_span[r][base] = lanes[0];
                        by_span[r][base + 2] = lanes[1];
                        by_span[r][base + 1] = lanes[4];
                        by_span[r][base + 3] = lanes[5];
                    }
                }
            }
        }
        let chunk_spans = (spans - 16 * c).min(16);
        // SAFETY: the chunk's spans lie inside the row.
        unsafe { span_scales::<B, G>(w, c, chunk_spans, &mut scale, &mut minimum) };
        for r in 0..R {
            let in_lanes: [i32; 16] = std::array::from_fn(|l| by_span[r][super::lane_span(l, G)]);
            for (h, acc) in acc[r].iter_mut().enumerate() {
                // SAFETY: 8 integers at `8 * h` of 16-integer arrays.
                unsafe {
                    let mut sums = _mm256_loadu_si256(in_lanes.as_ptr().add(8 * h).cast());
                    if B::OFFSET != 0 && B::FORMAT != Format::Q8_0 {
                        let offset = _mm256_loadu_si256(a[r].offset.as_ptr().add(8 * h).cast());
                        sums = _mm256_add_epi32(sums, offset);
                    }
                    *acc = fold::<B, G>(sums, (&scale, &minimum), a[r], 8 * h, *acc);
                }
            }
        }
    }
    std::array::from_fn(|r| {
        let mut lanes = [0f32; 16];
        // SAFETY: 8 floats each into a 16-float array.
        unsafe {
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[r][1]);
        }
        sum_lanes(&lanes)
    })
}
