//! The AVX-512 VNNI kernels. A column's weights are unpacked to unsigned bytes, 64 per
//! 512-bit register in value order, then transposed so that each 32-bit lane holds one scale's
//! span ([`pack_column`]); a tile of activation rows and columns is then multiplied by
//! `vpdpbusd` ([`tile`]): `G` instructions give each lane its span's whole integer dot product,
//! and only then is it converted and scaled, once per span rather than once per 4 values.
//! Each format's constant offset is folded into the integer sum and the float minimums of
//! Q4_1 and Q4_K into the float one.

use std::arch::x86_64::*;

use super::WeightChunk;
use super::activations::{ActChunk, BLOCK};
use super::formats::{BlockFormat, Format, f16_at, q4k_chunk_scales};

/// Two blocks' 16 bytes of packed nibbles (the second may be absent: zero) as 64 bytes in
/// value order: first block's low nibbles (values 0..16), its high ones, then the second's.
///
/// # Safety
/// 16 bytes must be readable at `first` (and at `second` when given), and the CPU must have
/// AVX-512 F/BW and AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
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

/// Two 32-byte halves as one register.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn join(a: __m256i, b: __m256i) -> __m512i {
    _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1)
}

/// Pair `pair` (values `64 * pair..`, the second half absent past `blocks` 32-value
/// blocks) of weight row `w` in format `B`, as 64 unsigned bytes in value order.
///
/// # Safety
/// `w` must hold the whole row (`blocks` 32-value blocks of `B`; with `WHOLE`, both blocks
/// of the pair) and the CPU must have the features `pack_column` enables.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn unpack<B: BlockFormat, const WHOLE: bool>(
    w: *const u8,
    pair: usize,
    blocks: usize,
) -> __m512i {
    // SAFETY: every read stays inside the pair's blocks (the second block of a pair only
    // when `2 * pair + 1 < blocks`), which the caller vouches are in `w`.
    unsafe {
        match B::FORMAT {
            // The 32-value formats: two consecutive blocks.
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q8_0 => {
                let p = w.add(2 * pair * B::BYTES);
                // `WHOLE`: the caller knows the second block is there (no branch for it).
                let second = (WHOLE || 2 * pair + 1 < blocks).then(|| p.add(B::BYTES));
                match B::FORMAT {
                    Format::Q4_0 => nibbles(p.add(2), second.map(|q| q.add(2))),
                    Format::Q4_1 => nibbles(p.add(4), second.map(|q| q.add(4))),
                    Format::Q5_0 | Format::Q5_1 => {
                        // The fifth bits, then the nibbles, after the f16 scale (Q5_1: and
                        // minimum).
                        let at = if B::FORMAT == Format::Q5_0 { 2 } else { 4 };
                        let bits = |q: *const u8| {
                            let h = q.add(at);
                            u32::from_le_bytes([*h, *h.add(1), *h.add(2), *h.add(3)]) as u64
                        };
                        let high_bits = bits(p) | second.map_or(0, |q| bits(q) << 32);
                        let fifth = _mm512_maskz_mov_epi8(high_bits, _mm512_set1_epi8(0x10));
                        let low = nibbles(p.add(at + 4), second.map(|q| q.add(at + 4)));
                        _mm512_or_si512(low, fifth)
                    }
                    _ => {
                        // Signed bytes moved to 0..=255 by flipping the sign bit (q + 128).
                        let a = _mm256_loadu_si256(p.add(2).cast());
                        let b = second.map_or(_mm256_setzero_si256(), |q| {
                            _mm256_loadu_si256(q.add(2).cast())
                        });
                        _mm512_xor_si512(join(a, b), _mm512_set1_epi8(-128))
                    }
                }
            }
            // The K-quants: a pair is one 256-bit half per block, as the AVX2 kernels
            // unpack it.
            Format::Q4K | Format::Q5K | Format::Q6K => {
                let [low, high] = super::avx2::unpack::<B>(w, pair, blocks);
                join(low, high)
            }
        }
    }
}

/// The scales and minimums of chunk `c`'s first `spans` (9 to 16) spans in lane order
/// ([`super::lane_span`]); zero past them. Gathered 16 at a time: one scalar extraction
/// per span cost as much as the rest of unpacking when decoding.
///
/// # Safety
/// The chunk's spans must lie inside the row at `w`; the CPU must have AVX-512 F and F16C.
// Always inlined, so without `target_feature` of its own (Rust forbids both): left as a
// call, it cost a twentieth of decoding. Its callers carry the AVX-512 features.
#[inline(always)]
unsafe fn span_scales<B: BlockFormat, const G: usize>(
    w: *const u8,
    c: usize,
    spans: usize,
) -> (__m512, __m512) {
    // Lane `l` holds span `lane_span(l)`: the mask of lanes whose span exists (all of them
    // but in a row's last chunk).
    let mask = if spans == 16 {
        u16::MAX
    } else {
        (0..16)
            .filter(|&lane| super::lane_span(lane, G) < spans)
            .fold(0u16, |mask, lane| mask | 1 << lane)
    };
    // SAFETY: every gathered or loaded byte belongs to a span below `spans` of chunk `c`,
    // which the caller vouches lie in the row.
    unsafe {
        match B::FORMAT {
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q8_0 => {
                // Each block starts with its f16 scale (Q4_1, Q5_1: then its f16 minimum).
                let offsets: [i32; 16] =
                    std::array::from_fn(|l| (super::lane_span(l, G) * B::BYTES) as i32);
                let base = w.add(c * 16 * B::BYTES);
                let words = _mm512_mask_i32gather_epi32::<1>(
                    _mm512_setzero_si512(),
                    mask,
                    _mm512_loadu_si512(offsets.as_ptr().cast()),
                    base.cast(),
                );
                let scale = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words));
                let minimum = if B::HAS_MINIMUM {
                    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(words)))
                } else {
                    _mm512_setzero_ps()
                };
                (scale, minimum)
            }
            Format::Q4K | Format::Q5K => {
                let (scale, minimum) = q4k_chunk_scales::<B>(w, c, 16 * c + spans);
                (
                    _mm512_loadu_ps(scale.as_ptr()),
                    _mm512_loadu_ps(minimum.as_ptr()),
                )
            }
            Format::Q6K => {
                // One super-block per chunk: 16 signed scales in span order, then `d`.
                let sb = w.add(c * B::BYTES);
                let scales =
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(sb.add(192).cast())));
                let order: [i32; 16] = std::array::from_fn(|l| super::lane_span(l, G) as i32);
                let in_lanes =
                    _mm512_permutexvar_ps(_mm512_loadu_si512(order.as_ptr().cast()), scales);
                let d = _mm512_set1_ps(f16_at(sb.add(208)));
                (_mm512_maskz_mul_ps(mask, in_lanes, d), _mm512_setzero_ps())
            }
        }
    }
}

/// The permutation indices of transpose stage `bit`: the stage swaps register-index bit `bit`
/// with lane-index bit `bit` between the registers `r` and `r | 1 << bit` (`high`: the one
/// with the bit set). Bit 4 of an index picks `vpermt2d`'s second source.
const fn stage_indices(bit: usize, high: bool) -> [i32; 16] {
    let mut out = [0; 16];
    let mut lane = 0;
    while lane < 16 {
        let source = (lane >> bit) & 1;
        let old_lane = if high {
            lane | (1 << bit)
        } else {
            lane & !(1 << bit)
        };
        out[lane] = (old_lane | (source << 4)) as i32;
        lane += 1;
    }
    out
}

const STAGES: [[[i32; 16]; 2]; 3] = [
    [stage_indices(0, false), stage_indices(0, true)],
    [stage_indices(1, false), stage_indices(1, true)],
    [stage_indices(2, false), stage_indices(2, true)],
];

/// `G` registers of 16 spans in value order (register `p`, lane `s * G + d`: group `d` of span
/// `p * 16 / G + s`) to the kernels' layout (register `d`, lane `s * G + p`), in log2(G)
/// stages of two-source permutes.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn transpose<const G: usize>(mut regs: [__m512i; G]) -> [__m512i; G] {
    // SAFETY: register-only arithmetic; the caller vouches for the CPU features.
    unsafe {
        let mut bit = 0;
        while 1 << bit < G {
            let low = _mm512_loadu_si512(STAGES[bit][0].as_ptr().cast());
            let high = _mm512_loadu_si512(STAGES[bit][1].as_ptr().cast());
            for r in 0..G {
                if r & (1 << bit) == 0 {
                    let (a, b) = (regs[r], regs[r | 1 << bit]);
                    regs[r] = _mm512_permutex2var_epi32(a, low, b);
                    regs[r | 1 << bit] = _mm512_permutex2var_epi32(a, high, b);
                }
            }
            bit += 1;
        }
        regs
    }
}

/// How far ahead of the pair being unpacked weights are prefetched (measured on
/// SmolLM2 decoding: 512 bytes +17%, 1,024 +30%, 2,048 +7%).
const PREFETCH_AHEAD: usize = 1024;

/// Unpacks one weight row (format `B`, `blocks` 32-value blocks) into `out`, one
/// [`WeightChunk`] per 16 spans; spans past the row's end are zero.
///
/// # Safety
/// The CPU must have the features enabled here ([`super::avx512_in_use`]); `w` must hold the
/// whole row and `out` `blocks * 32 / (64 * G)` rounded up chunks; `G` must be `B::GROUPS`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn pack_column<B: BlockFormat, const G: usize>(
    w: &[u8],
    blocks: usize,
    out: &mut [WeightChunk<G>],
) {
    debug_assert_eq!(G, B::GROUPS);
    for (c, chunk) in out.iter_mut().enumerate() {
        // SAFETY: the caller vouches for the row and the features.
        unsafe { pack_chunk::<B, G>(w.as_ptr(), blocks, c, chunk) };
    }
}

/// Chunk `c` of row `w` (`G` registers of 64 values, pairs past `blocks` blocks zero) in
/// value order, prefetching ahead.
///
/// # Safety
/// `w` must hold the row's `blocks` blocks; the CPU must have the features of [`tile`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn unpack_chunk<B: BlockFormat, const G: usize>(
    w: *const u8,
    blocks: usize,
    c: usize,
) -> [__m512i; G] {
    // SAFETY: `unpack_pair` reads only pairs inside the row.
    std::array::from_fn(|p| unsafe { unpack_pair::<B, G>(w, blocks, c, p) })
}

/// Pair `p` of chunk `c` of row `w`: zero past the row's end; prefetches ahead.
///
/// # Safety
/// As [`unpack_chunk`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn unpack_pair<B: BlockFormat, const G: usize>(
    w: *const u8,
    blocks: usize,
    c: usize,
    p: usize,
) -> __m512i {
    let pair = c * G + p;
    // SAFETY: only pairs inside the row are unpacked; a prefetch may point anywhere.
    unsafe {
        // Decoding is bound by reading weights: ask for the bytes a few pairs ahead, every
        // pair (past the row's end lies the next row, or nothing a prefetch minds).
        let ahead = w.wrapping_add(pair * B::PAIR_BYTES + PREFETCH_AHEAD);
        _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
        if (c + 1) * 2 * G <= blocks {
            // Most chunks: every block there.
            unpack::<B, true>(w, pair, blocks)
        } else if 2 * pair < blocks {
            unpack::<B, false>(w, pair, blocks)
        } else {
            _mm512_setzero_si512()
        }
    }
}

/// Chunk `c` of row `w` in the kernels' layout (see [`super::lane_span`]).
///
/// # Safety
/// As [`unpack_chunk`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn pack_chunk<B: BlockFormat, const G: usize>(
    w: *const u8,
    blocks: usize,
    c: usize,
    chunk: &mut WeightChunk<G>,
) {
    let chunk_spans = (blocks * 32 / (4 * G) - 16 * c).min(16);
    // SAFETY: `unpack_chunk` and the scale readers read only pairs and spans inside the
    // row; the stores go to `chunk`'s own registers.
    unsafe {
        let natural = unpack_chunk::<B, G>(w, blocks, c);
        for (group, reg) in chunk.u.iter_mut().zip(transpose(natural)) {
            _mm512_store_si512(group.as_mut_ptr().cast(), reg);
        }
        let (scale, minimum) = span_scales::<B, G>(w, c, chunk_spans);
        _mm512_store_ps(chunk.scale.as_mut_ptr(), scale);
        _mm512_store_ps(chunk.minimum.as_mut_ptr(), minimum);
    }
}

/// The dot products of `R` activation rows with `C` packed columns (format `B`, `chunks`
/// chunks each). Every (row, column) goes through the same
/// instructions in the same order whatever the tile's size, so a row's results do not depend
/// on the rows beside it.
///
/// # Safety
/// The CPU must have the features enabled here ([`super::avx512_in_use`]); every column and
/// row must hold `chunks` chunks; `G` must be `B::GROUPS`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn tile<B: BlockFormat, const G: usize, const R: usize, const C: usize>(
    columns: [&[WeightChunk<G>]; C],
    rows: [&[ActChunk<G>]; R],
    chunks: usize,
) -> [[f32; C]; R] {
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    // SAFETY: every chunk index is below `chunks`, which each column and row holds (the
    // caller vouches).
    unsafe {
        let at = |ch: usize| {
            (
                std::array::from_fn(|c| columns[c].get_unchecked(ch)),
                std::array::from_fn(|r| rows[r].get_unchecked(ch)),
            )
        };
        for ch in 0..chunks {
            let (w, a) = at(ch);
            accumulate::<B, G, R, C>(w, a, &mut acc);
        }
    }
    let flat: [__m512; 16] = std::array::from_fn(|i| {
        if i < R * C {
            acc[i / C][i % C]
        } else {
            _mm512_setzero_ps()
        }
    });
    const { assert!(R * C <= 16, "one register of sums per tile") };
    let mut sums = [0f32; 16];
    // SAFETY: the store is of 16 floats into a 16-float array; the features are enabled.
    unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), sum_lanes(flat)) };
    std::array::from_fn(|r| std::array::from_fn(|c| sums[r * C + c]))
}

/// Adds one chunk of every (row, column) pair to `acc`: integer sums over each lane's
/// values, then one conversion and scaling per lane ([`fold`]).
///
/// # Safety
/// The CPU must have the features of [`tile`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn accumulate<B: BlockFormat, const G: usize, const R: usize, const C: usize>(
    w: [&WeightChunk<G>; C],
    a: [&ActChunk<G>; R],
    acc: &mut [[__m512; C]; R],
) {
    // SAFETY: the loads are of aligned 64-byte arrays; the caller vouches for the features.
    unsafe {
        let mut sums = [[_mm512_setzero_si512(); C]; R];
        if B::OFFSET != 0 {
            for r in 0..R {
                let start = _mm512_load_si512(a[r].offset.as_ptr().cast());
                sums[r] = [start; C];
            }
        }
        for j in 0..G {
            let u: [__m512i; C] =
                std::array::from_fn(|c| _mm512_load_si512(w[c].u[j].as_ptr().cast()));
            for r in 0..R {
                let q = _mm512_load_si512(a[r].qs[j].as_ptr().cast());
                for c in 0..C {
                    sums[r][c] = _mm512_dpbusd_epi32(sums[r][c], u[c], q);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                let scale = _mm512_load_ps(w[c].scale.as_ptr());
                let minimum = _mm512_load_ps(w[c].minimum.as_ptr());
                acc[r][c] = fold::<B, G>(sums[r][c], scale, minimum, a[r], acc[r][c]);
            }
        }
    }
}

/// `acc` plus one chunk's integer lane sums (the offset included) of one (row, column):
/// converted, times the weight's and the activation's scales, plus the minimum's term. Both
/// kernels end every chunk here, so both give the same bits.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn fold<B: BlockFormat, const G: usize>(
    sums: __m512i,
    scale: __m512,
    minimum: __m512,
    a: &ActChunk<G>,
    acc: __m512,
) -> __m512 {
    // SAFETY: aligned loads of the chunk's own arrays; the caller vouches for the features.
    unsafe {
        let scale = _mm512_mul_ps(scale, _mm512_load_ps(a.scale.as_ptr()));
        let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc);
        if B::HAS_MINIMUM {
            _mm512_fmadd_ps(minimum, _mm512_load_ps(a.mean.as_ptr()), acc)
        } else {
            acc
        }
    }
}

/// Decoding: one weight row (format `B`, `blocks` blocks) against `R` activation rows whose
/// chunks hold their values in value order (`activations::quantize_row` with `interleaved`
/// false). Each pair of blocks is multiplied as it is unpacked, and the 16 lanes' worth of
/// partial sums of a chunk are added up in integers into the span order [`tile`] uses: the
/// same integer sums, [`fold`]ed the same way, so the same bits as [`tile`] without
/// rearranging the weights first.
///
/// # Safety
/// The CPU must have the features enabled here ([`super::avx512_in_use`]); `w` must hold the
/// row and every row `chunks` chunks; `G` must be `B::GROUPS`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_row<B: BlockFormat, const G: usize, const R: usize>(
    w: &[u8],
    blocks: usize,
    rows: [&[ActChunk<G>]; R],
    chunks: usize,
) -> [f32; R] {
    let mut acc = [[_mm512_setzero_ps(); 1]; R];
    let spans = blocks * 32 / (4 * G);
    let w = w.as_ptr();
    // SAFETY: every chunk index is below `chunks`, which each row holds; the row's chunks
    // are read by `unpack_chunk`, `span_scales` and `pack_chunk` inside its blocks.
    unsafe {
        let order: [i32; 16] = std::array::from_fn(|l| super::lane_span(l, G) as i32);
        let order = _mm512_loadu_si512(order.as_ptr().cast());
        for c in 0..chunks {
            let a: [&ActChunk<G>; R] = std::array::from_fn(|r| rows[r].get_unchecked(c));
            // Pairs of pairs as they are unpacked, their partial sums added at once: the
            // registers of a whole chunk for several rows would not fit.
            let mut halves = [[_mm512_setzero_si512(); 4]; R];
            for q in 0..G / 2 {
                if 2 * (c * G + 2 * q) >= blocks {
                    // Past the row's end (a last chunk's padding): nothing to add.
                    break;
                }
                let (u0, u1) = (
                    unpack_pair::<B, G>(w, blocks, c, 2 * q),
                    unpack_pair::<B, G>(w, blocks, c, 2 * q + 1),
                );
                for (half, a) in halves.iter_mut().zip(a) {
                    let d0 = _mm512_dpbusd_epi32(
                        _mm512_setzero_si512(),
                        u0,
                        _mm512_load_si512(a.qs[2 * q].as_ptr().cast()),
                    );
                    let d1 = _mm512_dpbusd_epi32(
                        _mm512_setzero_si512(),
                        u1,
                        _mm512_load_si512(a.qs[2 * q + 1].as_ptr().cast()),
                    );
                    half[q] = add_adjacent(d0, d1);
                }
            }
            let (scale, minimum) = span_scales::<B, G>(w, c, (spans - 16 * c).min(16));
            for r in 0..R {
                let h = &halves[r];
                let whole = if G == 8 {
                    add_adjacent(add_adjacent(h[0], h[1]), add_adjacent(h[2], h[3]))
                } else {
                    add_adjacent(h[0], h[1])
                };
                let mut sums = _mm512_permutexvar_epi32(order, whole);
                if B::OFFSET != 0 {
                    sums = _mm512_add_epi32(sums, _mm512_load_si512(a[r].offset.as_ptr().cast()));
                }
                acc[r][0] = fold::<B, G>(sums, scale, minimum, a[r], acc[r][0]);
            }
        }
        let flat: [__m512; 16] = std::array::from_fn(|i| {
            if i < R {
                acc[i][0]
            } else {
                _mm512_setzero_ps()
            }
        });
        let mut sums = [0f32; 16];
        _mm512_storeu_ps(sums.as_mut_ptr(), sum_lanes(flat));
        std::array::from_fn(|r| sums[r])
    }
}

/// Lane `i`: the sum of register `i`'s lanes, each register's lanes added in the same
/// pairwise order whatever the others hold (so a row's result does not depend on the tile),
/// in four rounds of two-source permutes and adds (45 instructions for 16 sums).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn sum_lanes(mut v: [__m512; 16]) -> __m512 {
    // SAFETY: register-only arithmetic and loads of the two index arrays.
    unsafe {
        let (even, odd) = (
            _mm512_loadu_si512(EVEN.as_ptr().cast()),
            _mm512_loadu_si512(ODD.as_ptr().cast()),
        );
        let mut live = 16;
        while live > 1 {
            // Each register holds `16 / live` registers' partial sums, `live` lanes each;
            // adjacent lanes of one source are added, halving them.
            for i in 0..live / 2 {
                let (a, b) = (v[2 * i], v[2 * i + 1]);
                v[i] = _mm512_add_ps(
                    _mm512_permutex2var_ps(a, even, b),
                    _mm512_permutex2var_ps(a, odd, b),
                );
            }
            live /= 2;
        }
        v[0]
    }
}

/// Lanes of two registers, evens then odds, as `vpermt2d`/`vpermt2ps` indices.
const EVEN: [i32; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
const ODD: [i32; 16] = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31];

/// Adjacent lanes of `a` then of `b` added: `[a0 + a1, .., a14 + a15, b0 + b1, ..]`. Applied
/// to the partial sums of a chunk's registers in value order (register `p`, lane `s * G +
/// d`: group `d` of span `p * 16 / G + s`), pair by pair and then on the results, it leaves
/// one register of whole spans in value order (lane `i`: span `i`).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn add_adjacent(a: __m512i, b: __m512i) -> __m512i {
    // SAFETY: register-only arithmetic and loads of the two index arrays.
    unsafe {
        let even = _mm512_loadu_si512(EVEN.as_ptr().cast());
        let odd = _mm512_loadu_si512(ODD.as_ptr().cast());
        _mm512_add_epi32(
            _mm512_permutex2var_epi32(a, even, b),
            _mm512_permutex2var_epi32(a, odd, b),
        )
    }
}

/// `activations::quantize_block` in two registers; the same results to the bit: the same
/// maximum, division and product, and halves rounded away from zero as `f32::round` does.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn quantize_block(values: &[f32; BLOCK], q: &mut [i8; BLOCK]) -> f32 {
    // SAFETY: the loads and stores are of the two arrays' own 32 values and bytes.
    unsafe {
        let lo = _mm512_loadu_ps(values.as_ptr());
        let hi = _mm512_loadu_ps(values.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        let d = amax / 127.0;
        let inverse = _mm512_set1_ps(if d == 0.0 { 0.0 } else { 1.0 / d });
        let round = |v: __m512| {
            let scaled = _mm512_mul_ps(v, inverse);
            let whole = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(scaled);
            // The fraction is exact; from a half up, step away from zero.
            let fraction = _mm512_abs_ps(_mm512_sub_ps(scaled, whole));
            let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(fraction, _mm512_set1_ps(0.5));
            // 1.0 with `scaled`'s sign, by integer operations: the float ones need AVX-512 DQ.
            let sign = _mm512_and_si512(_mm512_castps_si512(scaled), _mm512_set1_epi32(i32::MIN));
            let step = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_castps_si512(_mm512_set1_ps(1.0)),
                sign,
            ));
            _mm512_cvttps_epi32(_mm512_mask_add_ps(whole, away, whole, step))
        };
        _mm_storeu_si128(q.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(round(lo)));
        _mm_storeu_si128(
            q.as_mut_ptr().add(16).cast(),
            _mm512_cvtepi32_epi8(round(hi)),
        );
        d
    }
}

/// `activations::interleave`: 16 spans' bytes in value order to the kernels' layout.
///
/// # Safety
/// The CPU must have AVX-512 F; `values` must hold `64 * G` bytes.
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn interleave<const G: usize>(values: &[i8], out: &mut [[i8; 64]; G]) {
    // SAFETY: the loads read the caller's `64 * G` bytes, the stores fill `out`.
    unsafe {
        let natural: [__m512i; G] =
            std::array::from_fn(|p| _mm512_loadu_si512(values.as_ptr().add(64 * p).cast()));
        for (group, reg) in out.iter_mut().zip(transpose(natural)) {
            _mm512_storeu_si512(group.as_mut_ptr().cast(), reg);
        }
    }
}
