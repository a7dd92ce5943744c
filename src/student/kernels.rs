//! duet's own quantized matrix products for the GGUF block formats its default models are
//! mostly made of (Q4_1, Q5_0, Q8_0), with AVX-512 VNNI integer dot products.
//!
//! candle runs these three formats through scalar Rust loops; profiling SmolLM2 and Qwen2.5
//! showed 60-70% of generation time inside them. Here the activations are quantized to 8 bits
//! once per call, every weight block is unpacked to 32 unsigned bytes once, and one
//! `vpdpbusd` multiplies it with up to four activation rows. Other formats, and CPUs without
//! VNNI, go through candle's kernels (`weights.rs` decides).

use candle_core::quantized::GgmlDType;

/// Values per block in all three formats.
const BLOCK: usize = 32;
/// Activation rows that share one unpacked weight block.
const ROW_TILE: usize = 4;
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
}

impl Format {
    /// The format for `dtype`, when this CPU can run its kernel.
    pub fn for_dtype(dtype: GgmlDType) -> Option<Self> {
        let format = match dtype {
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q8_0 => Self::Q8_0,
            _ => return None,
        };
        cpu_supported().then_some(format)
    }

    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q8_0 => 34,
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

/// 32 activations quantized to signed bytes, with the scale and `d * sum(qs)` the offset
/// terms of each format need.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ActBlock {
    qs: [i8; BLOCK],
    d: f32,
    ds: f32,
}

/// Quantizes one row of activations the way llama.cpp's Q8_0/Q8_1 do (scale = max |x| / 127).
fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    for (chunk, block) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inverse = if d == 0.0 { 0.0 } else { 1.0 / d };
        let mut sum = 0i32;
        for (q, &v) in block.qs.iter_mut().zip(chunk) {
            *q = (v * inverse).round() as i8;
            sum += *q as i32;
        }
        block.d = d;
        block.ds = d * sum as f32;
    }
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
    let blocks_per_row = k / BLOCK;
    let row_bytes = blocks_per_row * format.block_bytes();
    assert_eq!(
        weights.len(),
        n * row_bytes,
        "weights of {n}x{k} {format:?}"
    );
    assert_eq!(lhs.len(), m * k, "activations of {m}x{k}");
    assert!(dst.len() >= m * n, "output of {m}x{n}");

    thread_local! {
        // Reused across calls: quantized activations are rebuilt for every product, and a
        // fresh allocation per matrix would be one per layer per token.
        static SCRATCH: std::cell::RefCell<Vec<ActBlock>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        scratch.resize(m * blocks_per_row, ActBlock::default());
        for (row, out) in lhs
            .chunks_exact(k)
            .zip(scratch.chunks_exact_mut(blocks_per_row))
        {
            quantize_row(row, out);
        }
        let acts: &[ActBlock] = &scratch;
        let dst_addr = dst.as_mut_ptr() as usize;
        let chunks = n.div_ceil(COLUMN_CHUNK);
        candle_core::utils::barrier_pool().execute_chunked(chunks, |range| {
            let first = range.start * COLUMN_CHUNK;
            let last = n.min(range.end * COLUMN_CHUNK);
            let mut tile_start = 0;
            while tile_start < m {
                let tile = ROW_TILE.min(m - tile_start);
                for col in first..last {
                    let w = &weights[col * row_bytes..(col + 1) * row_bytes];
                    let rows: [&[ActBlock]; ROW_TILE] = std::array::from_fn(|r| {
                        let i = tile_start + r.min(tile - 1);
                        &acts[i * blocks_per_row..(i + 1) * blocks_per_row]
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

/// Dot products of one weight row with up to four activation rows (`tile` of them are real).
fn dot_tile(
    format: Format,
    w: &[u8],
    blocks: usize,
    rows: [&[ActBlock]; ROW_TILE],
    tile: usize,
) -> [f32; ROW_TILE] {
    #[cfg(target_arch = "x86_64")]
    {
        debug_assert!(cpu_supported());
        // SAFETY: `matmul` is only reached through a `Format` from `for_dtype`, which checks
        // the CPU features; slices were length-checked by `matmul`.
        unsafe {
            match (format, tile) {
                (Format::Q4_1, 1) => x86::dot::<0, 1>(w, blocks, rows),
                (Format::Q4_1, _) => x86::dot::<0, ROW_TILE>(w, blocks, rows),
                (Format::Q5_0, 1) => x86::dot::<1, 1>(w, blocks, rows),
                (Format::Q5_0, _) => x86::dot::<1, ROW_TILE>(w, blocks, rows),
                (Format::Q8_0, 1) => x86::dot::<2, 1>(w, blocks, rows),
                (Format::Q8_0, _) => x86::dot::<2, ROW_TILE>(w, blocks, rows),
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
    use super::{ActBlock, ROW_TILE};
    use std::arch::x86_64::*;

    /// Reads a little-endian f16 at `p`.
    #[inline(always)]
    unsafe fn f16_at(p: *const u8) -> f32 {
        unsafe { half::f16::from_bits(u16::from_le_bytes([*p, *p.add(1)])).to_f32() }
    }

    /// 16 bytes of packed nibbles as 32 bytes: low nibbles (values 0..16) then high ones.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        unsafe {
            let packed = _mm_loadu_si128(p.cast());
            let mask = _mm_set1_epi8(0x0f);
            let low = _mm_and_si128(packed, mask);
            let high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
            _mm256_set_m128i(high, low)
        }
    }

    /// Block `p` of format `F` as 32 unsigned bytes `u`, its scale `d`, and `c` such that the
    /// block's dot product with activations `a` is `d * da * sum(u * qa) + c * da * sum(qa)`.
    #[inline(always)]
    unsafe fn unpack<const F: u8>(p: *const u8) -> (__m256i, f32, f32) {
        unsafe {
            match F {
                0 => (nibbles(p.add(4)), f16_at(p), f16_at(p.add(2))),
                1 => {
                    let high_bits =
                        u32::from_le_bytes([*p.add(2), *p.add(3), *p.add(4), *p.add(5)]);
                    let fifth = _mm256_maskz_mov_epi8(high_bits, _mm256_set1_epi8(0x10));
                    let d = f16_at(p);
                    (_mm256_or_si256(nibbles(p.add(6)), fifth), d, -16.0 * d)
                }
                _ => {
                    // Signed bytes moved to 0..=255 by flipping the sign bit (q + 128).
                    let q = _mm256_loadu_si256(p.add(2).cast());
                    let d = f16_at(p);
                    (_mm256_xor_si256(q, _mm256_set1_epi8(-128)), d, -128.0 * d)
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn horizontal_sum(v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// One weight row (format `F`, `blocks` blocks at `w`) against the first `R` rows.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn dot<const F: u8, const R: usize>(
        w: &[u8],
        blocks: usize,
        rows: [&[ActBlock]; ROW_TILE],
    ) -> [f32; ROW_TILE] {
        let block_bytes = w.len() / blocks;
        let mut acc = [_mm256_setzero_ps(); R];
        let mut offset = [0f32; R];
        let w = w.as_ptr();
        for b in 0..blocks {
            // SAFETY: b < blocks and w holds `blocks` blocks; rows hold `blocks` blocks each.
            unsafe {
                let (u, d, c) = unpack::<F>(w.add(b * block_bytes));
                for r in 0..R {
                    let a = rows[r].get_unchecked(b);
                    let q = _mm256_loadu_si256(a.qs.as_ptr().cast());
                    let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, q);
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * a.d), acc[r]);
                    offset[r] += c * a.ds;
                }
            }
        }
        let mut out = [0f32; ROW_TILE];
        for r in 0..R {
            // SAFETY: the features were enabled for this function.
            out[r] = unsafe { horizontal_sum(acc[r]) } + offset[r];
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ5_0, BlockQ8_0, GgmlType};
    use candle_core::{Device, Tensor};

    /// Every kernel, against candle's dequantized weights times the unquantized activations
    /// (loosely: activations lose precision to 8 bits) and against candle's own quantized
    /// product, which quantizes activations the same way but keeps their scales in f16
    /// (within 0.1%), for 1 to 9 activation
    /// rows (whole and partial row tiles) and a partial column chunk. Activations have a
    /// non-zero mean so that each format's offset term matters.
    #[test]
    fn kernels_match_candles_dequantized_reference() {
        if !cpu_supported() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let (n, k) = (37, 128);
        let values: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 2003) as f32 / 1001.0 - 1.0) * 0.8)
            .collect();
        let dense = Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            let format = Format::for_dtype(dtype).unwrap();
            let q = QTensor::quantize(&dense, dtype).unwrap();
            let bytes = q.data().unwrap().to_vec();
            let reference = q.dequantize(&Device::Cpu).unwrap();
            for m in 1..=9 {
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
                    _ => candle_product::<BlockQ8_0>(&bytes, (m, k, n), &x, &mut candles),
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
                    let c = candles[i];
                    assert!(
                        (a - c).abs() <= 1e-3 * s,
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
    fn quantized_rows_keep_their_sum_and_scale() {
        let x: Vec<f32> = (0..64).map(|i| i as f32 - 20.0).collect();
        let mut out = [ActBlock::default(); 2];
        quantize_row(&x, &mut out);
        assert_eq!(out[0].qs[0], -127); // -20 is the largest magnitude of the first block
        assert!((out[0].d - 20.0 / 127.0).abs() < 1e-6);
        let sum: i32 = out[1].qs.iter().map(|&q| q as i32).sum();
        assert!((out[1].ds - out[1].d * sum as f32).abs() < 1e-4);
    }
}
