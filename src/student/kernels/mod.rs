//! duet's own quantized matrix products for the GGUF block formats most files are made of
//! (Q4_1, Q5_0, Q8_0, Q4_K, Q6_K), used straight on the GGUF blocks (no repacked copy).
//!
//! candle runs Q4_1 and Q5_0 through scalar Rust loops; profiling SmolLM2 and Qwen2.5 showed
//! 60-70% of generation time inside them. Here the activations are quantized to 8 bits once
//! per product ([`activations`]), and each weight row is multiplied with up to eight of them
//! at once by the instruction-set kernels ([`avx512`]), on all threads ([`pool`]). The block
//! formats and their sizes are types in [`formats`]. Other formats, and CPUs without
//! AVX-512 VNNI, go through candle's kernels (`model/weights.rs` decides).

pub mod activations;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod formats;
pub mod pool;

pub use activations::release_scratch;
use activations::{ActPair, BLOCK, with_quantized};
pub use formats::Format;
#[cfg(target_arch = "x86_64")]
use formats::with_block;
use pool::for_each_range;

/// Activation rows that share one unpacked pair of weight blocks.
const ROW_TILE: usize = 8;
/// Weight rows handed to a worker at a time.
const COLUMN_CHUNK: usize = 16;

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

/// `dst (m x n) = lhs (m x k) @ weights^T`, where `weights` holds `n` rows of `k` values in
/// `format`'s GGUF blocks. Work is spread over the thread pool.
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
    let (block_values, block_bytes) = (format.block_values(), format.block_bytes());
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

    with_quantized(lhs, (m, k), format.offset(), |acts, pairs_per_row| {
        let dst_addr = dst.as_mut_ptr() as usize;
        let chunks = n.div_ceil(COLUMN_CHUNK);
        for_each_range(chunks, |range| {
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
                        // and dst outlives `for_each_range`, which returns when all are done.
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
        // SAFETY: `matmul` asserted the CPU features and the slices' lengths.
        unsafe {
            with_block!(format, B => match tile {
                1 => avx512::dot::<B, 1>(w, blocks, rows),
                2 => avx512::dot::<B, 2>(w, blocks, rows),
                4 => avx512::dot::<B, 4>(w, blocks, rows),
                _ => avx512::dot::<B, 8>(w, blocks, rows),
            })
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (format, w, blocks, rows, tile);
        unreachable!("no kernels on this architecture; Format::for_dtype returns None")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::student::kernels::activations::{ActPair, quantize_row};
    use candle_core::quantized::k_quants::{self, GgmlType};
    use candle_core::quantized::{GgmlDType, QTensor};
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
            let k = if format.block_values() == 256 {
                512
            } else {
                96
            };
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
                        candle_product::<k_quants::BlockQ4_1>(&bytes, (m, k, n), &x, &mut candles)
                    }
                    GgmlDType::Q5_0 => {
                        candle_product::<k_quants::BlockQ5_0>(&bytes, (m, k, n), &x, &mut candles)
                    }
                    GgmlDType::Q8_0 => {
                        candle_product::<k_quants::BlockQ8_0>(&bytes, (m, k, n), &x, &mut candles)
                    }
                    GgmlDType::Q4K => {
                        candle_product::<k_quants::BlockQ4K>(&bytes, (m, k, n), &x, &mut candles)
                    }
                    _ => candle_product::<k_quants::BlockQ6K>(&bytes, (m, k, n), &x, &mut candles),
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
                    let close = if format.block_values() == 256 {
                        1e-2
                    } else {
                        1e-3
                    };
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
