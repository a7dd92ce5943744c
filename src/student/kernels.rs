//! duet's own quantized matrix products for the GGUF block formats most files are made of
//! (Q4_1, Q5_0, Q8_0, Q4_K, Q6_K), with AVX-512 VNNI integer dot products.
//!
//! candle runs Q4_1 and Q5_0 through scalar Rust loops; profiling SmolLM2 and Qwen2.5 showed
//! 60-70% of generation time inside them. Here the activations are quantized to 8 bits once
//! per call (per 32 values, scales rounded to f16 as llama.cpp does), 64 weights at a time are
//! unpacked to unsigned bytes (one 512-bit register), and one `vpdpbusd` per activation row
//! multiplies them with up to eight rows. Each format's constant offset (Q5_0's 16, Q6_K's 32,
//! Q8_0's 128 after moving signed bytes to unsigned) is folded into the integer accumulator
//! from sums computed once per activation block, and the float minimums of Q4_1 and Q4_K into
//! the float one, so the inner loop is five instructions per row and 64 weights. Other
//! formats, and CPUs without AVX-512 VNNI, go through candle's kernels (`weights.rs` decides).

use candle_core::quantized::GgmlDType;

/// Values per block in all three formats.
const BLOCK: usize = 32;
/// Activation rows that share one unpacked pair of weight blocks.
const ROW_TILE: usize = 8;
/// Weight rows handed to a worker at a time.
const COLUMN_CHUNK: usize = 16;

/// A block format with a kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// 16 bytes of 4-bit values, an f16 scale and an f16 minimum: `w = d * q + m`.
    Q4_1,
    /// 4-bit values with a fifth bit packed apart, one f16 scale: `w = d * (q - 16)`.
    Q5_0,
    /// 32 signed bytes and one f16 scale: `w = d * q`.
    Q8_0,
    /// Super-blocks of 256: 4-bit values, and per 32 a 6-bit scale and minimum under f16
    /// super-scales: `w = d * sc * q - dmin * m`.
    Q4K,
    /// Super-blocks of 256: 6-bit values split in 4 + 2 bits, a signed 8-bit scale per 16
    /// under an f16 super-scale: `w = d * sc * (q - 32)`.
    Q6K,
}

impl Format {
    /// The format for `dtype`, when this CPU can run its kernel.
    pub fn for_dtype(dtype: GgmlDType) -> Option<Self> {
        let format = match dtype {
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        };
        cpu_supported().then_some(format)
    }

    /// What is subtracted from each stored unsigned value (the minimums of Q4_1 and Q4_K
    /// are floats, applied apart).
    fn offset(self) -> i32 {
        match self {
            Self::Q4_1 | Self::Q4K => 0,
            Self::Q5_0 => 16,
            Self::Q8_0 => 128,
            Self::Q6K => 32,
        }
    }

    /// Values per stored block, and the block's bytes.
    fn block(self) -> (usize, usize) {
        match self {
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q6K => (256, 210),
        }
    }
}

/// Whether this CPU has the instructions the kernels use.
pub fn cpu_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static SUPPORTED: OnceLock<bool> = OnceLock::new();
        *SUPPORTED.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Two blocks (64 values) of activations quantized to signed bytes, laid out the way the
/// kernels read them: per 32-bit lane of a 512-bit register (4 values; lanes 0-7 are the first
/// block, 8-15 the second) its block's scale, and the offset terms.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct ActPair {
    qs: [i8; 2 * BLOCK],
    /// The block's scale `d`, repeated in its 8 lanes.
    scale: [f32; 16],
    /// `-offset * (sum of the lane's 4 values)`: the integer start of `sum((u - offset) * q)`.
    offset_start: [i32; 16],
    /// `d * sum(q) / 8` in each of the block's lanes (Q4_1: times the block minimum).
    mean_term: [f32; 16],
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
fn quantize_row(x: &[f32], offset: i32, out: &mut [ActPair]) {
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

/// The `len` values at `start` of the `T` buffer at address `base`, for a pool work item
/// that owns exactly that part of a buffer shared by all items.
///
/// # Safety
/// No other item may touch the range while the returned slice lives, and the buffer (at
/// least `start + len` values) must outlive it: true inside `execute_chunked`, which returns
/// when all items are done.
pub(super) unsafe fn item_slice<'a, T>(base: usize, start: usize, len: usize) -> &'a mut [T] {
    unsafe { std::slice::from_raw_parts_mut((base as *mut T).add(start), len) }
}

/// Frees this thread's quantized-activation buffer (the model is being unloaded).
pub fn release_scratch() {
    SCRATCH.with(|cell| *cell.borrow_mut() = Vec::new());
}

/// `dst (m x n) = lhs (m x k) @ weights^T`, where `weights` holds `n` rows of `k` values in
/// `format`'s GGUF blocks. Work is spread over candle's CPU thread pool.
pub fn matmul(
    format: Format,
    weights: &[u8],
    (m, k, n): (usize, usize, usize),
    lhs: &[f32],
    dst: &mut [f32],
) {
    assert!(
        k.is_multiple_of(BLOCK),
        "rows of {k} values are not whole blocks"
    );
    // A `Format` is public: make sure nobody built one on a CPU the kernels cannot run on.
    assert!(cpu_supported(), "duet's kernels need AVX-512 VNNI");
    let (block_values, block_bytes) = format.block();
    assert!(
        k.is_multiple_of(block_values),
        "rows of {k} values are not whole blocks"
    );
    let blocks_per_row = k / BLOCK;
    let row_bytes = k / block_values * block_bytes;
    assert_eq!(
        weights.len(),
        n * row_bytes,
        "weights of {n}x{k} {format:?}"
    );
    assert_eq!(lhs.len(), m * k, "activations of {m}x{k}");
    assert!(dst.len() >= m * n, "output of {m}x{n}");

    let pairs_per_row = blocks_per_row.div_ceil(2);

    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        // Every element is overwritten by `quantize_row`: only growth needs initialising.
        scratch.resize(m * pairs_per_row, ActPair::default());
        let quantize = |rows: std::ops::Range<usize>, out: &mut [ActPair]| {
            for (row, out) in lhs[rows.start * k..rows.end * k]
                .chunks_exact(k)
                .zip(out.chunks_exact_mut(pairs_per_row))
            {
                quantize_row(row, format.offset(), out);
            }
        };
        if m == 1 {
            quantize(0..1, &mut scratch);
        } else {
            // A prompt's rows are quantized on all threads.
            let scratch_addr = scratch.as_mut_ptr() as usize;
            candle_core::utils::barrier_pool().execute_chunked(m, |rows| {
                // SAFETY: each range of rows owns its own part of the scratch buffer.
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
        let acts: &[ActPair] = &scratch;
        let dst_addr = dst.as_mut_ptr() as usize;
        let chunks = n.div_ceil(COLUMN_CHUNK);
        candle_core::utils::barrier_pool().execute_chunked(chunks, |range| {
            let first = range.start * COLUMN_CHUNK;
            let last = n.min(range.end * COLUMN_CHUNK);
            let mut tile_start = 0;
            while tile_start < m {
                let tile = match m - tile_start {
                    8.. => 8,
                    4..=7 => 4,
                    2..=3 => 2,
                    _ => 1,
                };
                for col in first..last {
                    let w = &weights[col * row_bytes..(col + 1) * row_bytes];
                    let rows: [&[ActPair]; ROW_TILE] = std::array::from_fn(|r| {
                        let i = tile_start + r.min(tile - 1);
                        &acts[i * pairs_per_row..(i + 1) * pairs_per_row]
                    });
                    let sums = dot_tile(format, w, blocks_per_row, rows, tile);
                    for (r, sum) in sums.iter().take(tile).enumerate() {
                        // SAFETY: each (row, column) of dst belongs to exactly one work item,
                        // and dst outlives `execute_chunked`, which returns when all are done.
                        unsafe {
                            *(dst_addr as *mut f32).add((tile_start + r) * n + col) = *sum;
                        }
                    }
                }
                tile_start += tile;
            }
        });
    });
}

/// Dot products of one weight row with the first `tile` (1, 2, 4 or 8) activation rows.
fn dot_tile(
    format: Format,
    w: &[u8],
    blocks: usize,
    rows: [&[ActPair]; ROW_TILE],
    tile: usize,
) -> [f32; ROW_TILE] {
    #[cfg(target_arch = "x86_64")]
    {
        debug_assert!(cpu_supported());
        macro_rules! by_tile {
            ($f:literal) => {
                match tile {
                    1 => x86::dot::<$f, 1>(w, blocks, rows),
                    2 => x86::dot::<$f, 2>(w, blocks, rows),
                    4 => x86::dot::<$f, 4>(w, blocks, rows),
                    _ => x86::dot::<$f, 8>(w, blocks, rows),
                }
            };
        }
        // SAFETY: `matmul` is only reached through a `Format` from `for_dtype`, which checks
        // the CPU features; slices were length-checked by `matmul`.
        unsafe {
            match format {
                Format::Q4_1 => by_tile!(0),
                Format::Q5_0 => by_tile!(1),
                Format::Q8_0 => by_tile!(2),
                Format::Q4K => by_tile!(3),
                Format::Q6K => by_tile!(4),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (format, w, blocks, rows, tile);
        unreachable!("no kernels on this architecture; Format::for_dtype returns None")
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ActPair, ROW_TILE};
    use std::arch::x86_64::*;

    /// Reads a little-endian f16 at `p`.
    #[inline(always)]
    unsafe fn f16_at(p: *const u8) -> f32 {
        unsafe { half::f16::from_bits(u16::from_le_bytes([*p, *p.add(1)])).to_f32() }
    }

    /// Two blocks' 16 bytes of packed nibbles (the second may be absent: zero) as 64 bytes in
    /// value order: first block's low nibbles (values 0..16), its high ones, then the second's.
    #[inline(always)]
    unsafe fn nibbles(first: *const u8, second: Option<*const u8>) -> __m512i {
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
    /// Bytes per 64 values in each format (K-quants: on average over a super-block).
    const PAIR_BYTES: [usize; 5] = [40, 44, 68, 36, 52];

    /// Lanes 0-7 hold `a`, lanes 8-15 `b`.
    #[inline(always)]
    unsafe fn halves(a: f32, b: f32) -> __m512 {
        unsafe { _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(a), _mm512_set1_ps(b)) }
    }

    /// Two 32-byte halves as one register.
    #[inline(always)]
    unsafe fn join(a: __m256i, b: __m256i) -> __m512i {
        unsafe { _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1) }
    }

    /// Pair `pair` (values `64 * pair..`, the second half absent past `blocks` 32-value
    /// blocks) of weight row `w` in format `F`, as 64 unsigned bytes, the scale of each lane,
    /// and (Q4_1, Q4_K) the minimum of each lane.
    #[inline(always)]
    unsafe fn unpack<const F: u8>(
        w: *const u8,
        pair: usize,
        blocks: usize,
    ) -> (__m512i, __m512, __m512) {
        unsafe {
            let zero = _mm512_setzero_ps();
            match F {
                // Q4_1, Q5_0, Q8_0: two consecutive blocks of 32.
                0..=2 => {
                    let block_bytes = [20, 22, 34][F as usize];
                    let p = w.add(2 * pair * block_bytes);
                    let second = (2 * pair + 1 < blocks).then(|| p.add(block_bytes));
                    let d = halves(f16_at(p), second.map_or(0.0, |q| f16_at(q)));
                    match F {
                        0 => {
                            let minimum =
                                halves(f16_at(p.add(2)), second.map_or(0.0, |q| f16_at(q.add(2))));
                            (nibbles(p.add(4), second.map(|q| q.add(4))), d, minimum)
                        }
                        1 => {
                            let bits = |q: *const u8| {
                                u32::from_le_bytes([*q.add(2), *q.add(3), *q.add(4), *q.add(5)])
                                    as u64
                            };
                            let high_bits = bits(p) | second.map_or(0, |q| bits(q) << 32);
                            let fifth = _mm512_maskz_mov_epi8(high_bits, _mm512_set1_epi8(0x10));
                            let u =
                                _mm512_or_si512(nibbles(p.add(6), second.map(|q| q.add(6))), fifth);
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
                3 => {
                    let sb = w.add(pair / 4 * 144);
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
                _ => {
                    let sb = w.add(pair / 4 * 210);
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

    /// One weight row (format `F`, `blocks` blocks at `w`) against the first `R` rows.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn dot<const F: u8, const R: usize>(
        w: &[u8],
        blocks: usize,
        rows: [&[ActPair]; ROW_TILE],
    ) -> [f32; ROW_TILE] {
        let mut acc = [_mm512_setzero_ps(); R];
        // Formats whose minimum is a float (Q4_1, Q4_K), and those with an integer offset.
        let has_minimum = F == 0 || F == 3;
        let has_offset = !has_minimum;
        let w = w.as_ptr();
        for pair in 0..blocks.div_ceil(2) {
            // SAFETY: `unpack` reads only blocks of this row (the second half of the last
            // pair only when it exists); rows hold `blocks.div_ceil(2)` pairs each (checked
            // by `matmul`).
            unsafe {
                // Decoding is bound by reading weights: ask for the bytes a few pairs ahead
                // (past the row's end lies the next row, or nothing a prefetch minds).
                let ahead = w.wrapping_add(pair * PAIR_BYTES[F as usize] + PREFETCH_AHEAD);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                let (u, d, minimum) = unpack::<F>(w, pair, blocks);
                for r in 0..R {
                    let a = rows[r].get_unchecked(pair);
                    let start = if has_offset {
                        _mm512_load_si512(a.offset_start.as_ptr().cast())
                    } else {
                        _mm512_setzero_si512()
                    };
                    let dot =
                        _mm512_dpbusd_epi32(start, u, _mm512_load_si512(a.qs.as_ptr().cast()));
                    let scale = _mm512_mul_ps(d, _mm512_load_ps(a.scale.as_ptr()));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
                    if has_minimum {
                        acc[r] =
                            _mm512_fmadd_ps(minimum, _mm512_load_ps(a.mean_term.as_ptr()), acc[r]);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::quantized::k_quants::{
        BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ6K, BlockQ8_0, GgmlType,
    };
    use candle_core::{Device, Tensor};

    /// Every kernel, against candle's dequantized weights times the unquantized activations
    /// (loosely: activations lose precision to 8 bits) and against candle's own quantized
    /// product, which quantizes activations the same way (within 0.1%: for Q4_1 candle
    /// rounds the scaled block sum in f16 arithmetic, llama.cpp and duet round the f32
    /// product), for 1 to 17 activation
    /// rows (every tile size, whole and partial) and a partial column chunk. Activations have a
    /// non-zero mean so that each format's offset term matters.
    #[test]
    fn kernels_match_candles_dequantized_reference() {
        if !cpu_supported() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let n = 37;
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let format = Format::for_dtype(dtype).unwrap();
            // 96 values = 3 blocks: a whole pair and a lone last block; K-quants come in
            // super-blocks of 256: two of them.
            let k = if format.block().0 == 256 { 512 } else { 96 };
            // Magnitudes change every 16 values, so that every scale matters.
            let values: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919 % 2003) as f32 / 1001.0 - 1.0) * (1 + i / 16 % 5) as f32)
                .collect();
            let dense = Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&dense, dtype).unwrap();
            let bytes = q.data().unwrap().to_vec();
            let reference = q.dequantize(&Device::Cpu).unwrap();
            for m in 1..=17 {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i as f32) * 0.37).sin() + 0.3)
                    .collect();
                let mut ours = vec![0f32; m * n];
                matmul(format, &bytes, (m, k, n), &x, &mut ours);
                let mut candles = vec![0f32; m * n];
                match dtype {
                    GgmlDType::Q4_1 => {
                        candle_product::<BlockQ4_1>(&bytes, (m, k, n), &x, &mut candles)
                    }
                    GgmlDType::Q5_0 => {
                        candle_product::<BlockQ5_0>(&bytes, (m, k, n), &x, &mut candles)
                    }
                    GgmlDType::Q8_0 => {
                        candle_product::<BlockQ8_0>(&bytes, (m, k, n), &x, &mut candles)
                    }
                    GgmlDType::Q4K => {
                        candle_product::<BlockQ4K>(&bytes, (m, k, n), &x, &mut candles)
                    }
                    _ => candle_product::<BlockQ6K>(&bytes, (m, k, n), &x, &mut candles),
                }
                let xt = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
                let expected = xt.matmul(&reference.t().unwrap()).unwrap();
                let mass = xt
                    .abs()
                    .unwrap()
                    .matmul(&reference.abs().unwrap().t().unwrap())
                    .unwrap();
                let expected = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mass = mass.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (i, ((a, b), s)) in ours.iter().zip(&expected).zip(&mass).enumerate() {
                    // 8-bit activations: each product may be off by ~0.4% of its mass.
                    assert!(
                        (a - b).abs() <= 0.01 * s,
                        "{dtype:?} m={m} element {i}: {a} vs {b} (mass {s})"
                    );
                    // candle quantizes K-quant activations per 256 values, duet per 32.
                    let close = if format.block().0 == 256 { 1e-2 } else { 1e-3 };
                    let c = candles[i];
                    assert!(
                        (a - c).abs() <= close * s,
                        "{dtype:?} m={m} element {i}: {a} vs candle's {c} (mass {s})"
                    );
                }
            }
        }
    }

    /// candle's generic quantized product over the same GGUF bytes.
    fn candle_product<T: GgmlType>(
        bytes: &[u8],
        mkn: (usize, usize, usize),
        x: &[f32],
        dst: &mut [f32],
    ) {
        let count = bytes.len() / std::mem::size_of::<T>();
        let mut blocks: Vec<T> = Vec::with_capacity(count);
        // SAFETY: GGUF block structs are plain integers and half floats; every byte is copied.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), blocks.as_mut_ptr().cast(), bytes.len());
            blocks.set_len(count);
        }
        candle_core::quantized::k_quants::matmul(mkn, x, &blocks, dst).unwrap();
    }

    #[test]
    fn quantized_rows_carry_scales_and_offset_sums_per_lane() {
        let x: Vec<f32> = (0..96).map(|i| i as f32 - 20.0).collect();
        let mut out = [ActPair::default(); 2];
        out[1].qs = [5; 64]; // stale values from an earlier product
        out[1].scale = [1.0; 16];
        quantize_row(&x, 16, &mut out);
        assert_eq!(out[0].qs[0], -127); // -20 is the largest magnitude of the first block
        assert!((out[0].scale[7] - 20.0 / 127.0).abs() < 1e-4);
        assert!((out[0].scale[8] - 43.0 / 127.0).abs() < 1e-4); // second block: up to 43
        let lane: i32 = out[0].qs[4..8].iter().map(|&q| q as i32).sum();
        assert_eq!(out[0].offset_start[1], -16 * lane);
        let block: i32 = out[1].qs[..32].iter().map(|&q| q as i32).sum();
        let scaled_sum = out[1].scale[3] * block as f32; // both sides rounded to f16
        assert!((out[1].mean_term[3] * 8.0 - scaled_sum).abs() <= 2e-3 * scaled_sum.abs());
        // Three blocks: the last pair's second half stays empty.
        assert_eq!(out[1].qs[32..], [0; 32]);
        assert_eq!(out[1].scale[8..], [0.0; 8]);
    }
}
