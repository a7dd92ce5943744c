//! duet's own quantized matrix products for the GGUF block formats most files are made of
//! (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K).
//!
//! candle runs Q4_1 and Q5_0 through scalar Rust loops; profiling SmolLM2 and Qwen2.5 showed
//! 60-70% of generation time inside them. Here the activations are quantized to 8 bits once
//! per product ([`activations`]) and each group of weight rows is unpacked once per product
//! into a buffer ([`WeightChunk`]) that a tile of up to [`ROW_TILE`] activation rows by
//! [`COLUMN_TILE`] columns is multiplied against ([`avx512`], or [`avx2`] on CPUs without
//! AVX-512 VNNI, with AVX-VNNI's byte products where the CPU has them), on all threads ([`pool`]). The [`Tier`] is picked when the process starts.
//!
//! Both sides share one layout: 16 spans of values per chunk, one per 32-bit lane, a span
//! being what one weight scale covers (32 values, or 16 for Q6_K); lane `l` holds span
//! [`lane_span`]`(l, G)`, and register `j` of a chunk holds values `4j..4j + 4` of every
//! lane's span (a row's last chunk is padded with zeros). Integer sums then cover a whole
//! span before they are scaled, so prompts
//! (many rows against each unpacked column) cost little more than the multiply-adds; a row
//! takes the same instructions in the same order whatever rows it is multiplied with, so
//! answers are the same alone, batched and from the prompt cache. The block formats and
//! their sizes are types in [`formats`]. All tiers give the same bits. Other formats, and
//! the portable tier, go through candle's kernels (`model/weights.rs` decides).

pub mod activations;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod formats;
pub mod pool;

pub use activations::release_scratch;
use activations::{ActChunk, BLOCK, chunks_per_row, with_quantized};
pub use formats::Format;
#[cfg(target_arch = "x86_64")]
use formats::{BlockFormat, with_block};
use pool::{ThreadBuffer, for_each_range, thread_buffer};
use std::sync::OnceLock;

use crate::config::Kernels;

/// Activation rows multiplied with each column at a time.
pub const ROW_TILE: usize = 4;
/// Columns (weight rows) multiplied with each activation row at a time.
pub const COLUMN_TILE: usize = 4;
/// Weight rows unpacked by a worker at a time, for every activation row.
const COLUMN_CHUNK: usize = 16;

/// The span (of 16 per chunk) in lane `lane` of a chunk of `groups`-group spans: the
/// order the transpose in `avx512::pack_column` leaves them in.
pub const fn lane_span(lane: usize, groups: usize) -> usize {
    (lane % groups) * (16 / groups) + lane / groups
}

/// One weight row's 16 spans, laid out like [`ActChunk`]: unsigned bytes (the format's
/// offset added), each lane's scale and (Q4_1, Q4_K) minimum.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct WeightChunk<const G: usize> {
    pub u: [[u8; 64]; G],
    pub scale: [f32; 16],
    pub minimum: [f32; 16],
}

impl<const G: usize> Default for WeightChunk<G> {
    fn default() -> Self {
        Self {
            u: [[0; 64]; G],
            scale: [0.0; 16],
            minimum: [0.0; 16],
        }
    }
}

thread_buffer!(WeightChunk<8>);
thread_buffer!(WeightChunk<4>);

/// The instruction-set level duet's own kernels run at, one per process ([`select`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// AVX-512 F/BW/VL with VNNI, FMA and F16C.
    Avx512,
    /// AVX2's kernels with AVX-VNNI's `vpdpbusd` for their byte products: the same bits.
    AvxVnni,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// Nothing of duet's own: candle's kernels and plain Rust, on any CPU.
    Portable,
}

impl Tier {
    /// The name `student.kernels` and `/health` use.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Avx512 => "avx512",
            Tier::AvxVnni => "avx-vnni",
            Tier::Avx2 => "avx2",
            Tier::Portable => "portable",
        }
    }

    /// Whether this CPU has the tier's instructions.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                Tier::Avx512 => {
                    avx2 && has!("avx512f")
                        && has!("avx512bw")
                        && has!("avx512vl")
                        && has!("avx512vnni")
                }
                Tier::AvxVnni => avx2 && has!("avxvnni"),
                Tier::Avx2 => avx2,
                Tier::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Tier::Portable
        }
    }

    /// The best tier this CPU has.
    pub fn best() -> Self {
        [Tier::Avx512, Tier::AvxVnni, Tier::Avx2, Tier::Portable]
            .into_iter()
            .find(|tier| tier.available())
            .unwrap_or(Tier::Portable)
    }
}

static TIER: OnceLock<Tier> = OnceLock::new();

/// Chooses the tier for this process from `student.kernels`, before the first product: the
/// best this CPU has for `auto`; a tier it lacks is an error naming what it has.
pub fn select(kernels: Kernels) -> Result<Tier, String> {
    let wanted = match kernels {
        Kernels::Auto => Tier::best(),
        Kernels::Avx512 => Tier::Avx512,
        Kernels::AvxVnni => Tier::AvxVnni,
        Kernels::Avx2 => Tier::Avx2,
        Kernels::Portable => Tier::Portable,
    };
    if !wanted.available() {
        return Err(format!(
            "student.kernels: this CPU cannot run the {} kernels (the best it has is {})",
            wanted.name(),
            Tier::best().name()
        ));
    }
    let chosen = *TIER.get_or_init(|| wanted);
    if chosen != wanted {
        return Err(format!(
            "student.kernels: the {} kernels are already in use",
            chosen.name()
        ));
    }
    Ok(chosen)
}

/// The tier in use: the one [`select`]ed, else the best this CPU has.
pub fn tier() -> Tier {
    *TIER.get_or_init(Tier::best)
}

/// Whether the AVX-512 kernels are in use.
pub fn avx512_in_use() -> bool {
    tier() == Tier::Avx512
}

/// Whether duet's matrix kernels are in use (AVX-512 or AVX2), rather than candle's.
pub fn kernels_in_use() -> bool {
    tier() != Tier::Portable
}

/// `dst (m x n) = lhs (m x k) @ weights^T`, where `weights` holds `n` rows of `k` values in
/// `format`'s GGUF blocks. Work is spread over the thread pool.
pub fn matmul(
    format: Format,
    weights: &[u8],
    mkn: (usize, usize, usize),
    lhs: &[f32],
    dst: &mut [f32],
) {
    matmul_on(tier(), format, weights, mkn, lhs, dst);
}

/// [`matmul`] on the kernels of `tier`, which the CPU must have (tests compare tiers).
fn matmul_on(
    tier: Tier,
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
    assert!(
        tier != Tier::Portable && tier.available(),
        "duet's kernels need AVX-512 VNNI or AVX2"
    );
    let (block_values, block_bytes) = (format.block_values(), format.block_bytes());
    assert!(
        k.is_multiple_of(block_values),
        "rows of {k} values are not whole blocks"
    );
    assert_eq!(
        weights.len(),
        n * (k / block_values * block_bytes),
        "weights of {n}x{k} {format:?}"
    );
    assert_eq!(lhs.len(), m * k, "activations of {m}x{k}");
    assert!(dst.len() >= m * n, "output of {m}x{n}");
    #[cfg(target_arch = "x86_64")]
    with_block!(format, B => product::<B, { B::GROUPS }>(tier, weights, (m, k, n), lhs, dst));
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no kernels on this architecture; Format::for_dtype returns None");
}

/// [`matmul`] for block format `B`, whose spans have `G` groups.
#[cfg(target_arch = "x86_64")]
fn product<B: BlockFormat, const G: usize>(
    tier: Tier,
    weights: &[u8],
    (m, k, n): (usize, usize, usize),
    lhs: &[f32],
    dst: &mut [f32],
) where
    ActChunk<G>: ThreadBuffer,
    WeightChunk<G>: ThreadBuffer,
{
    let blocks = k / BLOCK;
    let row_bytes = k / B::VALUES * B::BYTES;
    let chunks = chunks_per_row(k, G);
    // Decoding steps (a few rows) multiply each pair of blocks as it is unpacked; prompts
    // unpack each column once for all their rows. Both give the same bits.
    let decoding = m <= ROW_TILE;
    with_quantized::<G, _>(lhs, (m, k), B::OFFSET, !decoding, |acts, _| {
        let dst_addr = dst.as_mut_ptr() as usize;
        let store = |row: usize, col: usize, value: f32| {
            // SAFETY: each (row, column) of dst belongs to exactly one work item, and dst
            // (at least `m * n` values) outlives `for_each_range`, which returns when all are
            // done.
            unsafe { *(dst_addr as *mut f32).add(row * n + col) = value };
        };
        let row = |i: usize| &acts[i * chunks..(i + 1) * chunks];
        if decoding {
            for_each_range(n.div_ceil(COLUMN_CHUNK), |groups| {
                for col in groups.start * COLUMN_CHUNK..n.min(groups.end * COLUMN_CHUNK) {
                    let w = &weights[col * row_bytes..(col + 1) * row_bytes];
                    // SAFETY: the tier's CPU features were asserted; `w` is the whole row and every
                    // activation row holds `chunks` chunks.
                    let sums: [f32; ROW_TILE] = unsafe {
                        match m {
                            1 => pad_row(dot_row_on::<B, G, 1>(tier, w, blocks, [row(0)], chunks)),
                            2 => pad_row(dot_row_on::<B, G, 2>(
                                tier,
                                w,
                                blocks,
                                [row(0), row(1)],
                                chunks,
                            )),
                            3 => pad_row(dot_row_on::<B, G, 3>(
                                tier,
                                w,
                                blocks,
                                [row(0), row(1), row(2)],
                                chunks,
                            )),
                            _ => dot_row_on::<B, G, 4>(
                                tier,
                                w,
                                blocks,
                                std::array::from_fn(row),
                                chunks,
                            ),
                        }
                    };
                    for (r, &sum) in sums.iter().enumerate().take(m) {
                        store(r, col, sum);
                    }
                }
            });
            return;
        }
        // Writes the tile of rows `first_row..` and columns `first_col..` (up to `columns`).
        let multiply =
            |panel: &[WeightChunk<G>], first_row: usize, first_col: usize, columns: usize| {
                let column = |c: usize| &panel[c * chunks..(c + 1) * chunks];
                let cols: [&[WeightChunk<G>]; COLUMN_TILE] = std::array::from_fn(column);
                let rows_left = m - first_row;
                let rows: [&[ActChunk<G>]; ROW_TILE] =
                    std::array::from_fn(|r| row(first_row + r.min(rows_left - 1)));
                // SAFETY: the tier's CPU features were asserted; every column and row holds `chunks`.
                let sums: [[f32; COLUMN_TILE]; ROW_TILE] = unsafe {
                    match rows_left {
                        1 => pad(tile_on::<B, G, 1, COLUMN_TILE>(
                            tier,
                            cols,
                            [rows[0]],
                            chunks,
                        )),
                        2 => pad(tile_on::<B, G, 2, COLUMN_TILE>(
                            tier,
                            cols,
                            [rows[0], rows[1]],
                            chunks,
                        )),
                        3 => pad(tile_on::<B, G, 3, COLUMN_TILE>(
                            tier,
                            cols,
                            [rows[0], rows[1], rows[2]],
                            chunks,
                        )),
                        _ => tile_on::<B, G, ROW_TILE, COLUMN_TILE>(tier, cols, rows, chunks),
                    }
                };
                for (r, sums) in sums.iter().enumerate().take(rows_left.min(ROW_TILE)) {
                    for (c, &sum) in sums.iter().enumerate().take(columns) {
                        store(first_row + r, first_col + c, sum);
                    }
                }
            };
        for_each_range(n.div_ceil(COLUMN_CHUNK), |groups| {
            WeightChunk::<G>::with_buffer(|panel| {
                for group in groups {
                    let first = group * COLUMN_CHUNK;
                    let columns = COLUMN_CHUNK.min(n - first);
                    let padded = columns.div_ceil(COLUMN_TILE) * COLUMN_TILE;
                    // `pack_column` writes every byte of a column's chunks: only the columns
                    // that pad the last tile need zeros.
                    if panel.len() < padded * chunks {
                        panel.resize(padded * chunks, WeightChunk::default());
                    }
                    panel[columns * chunks..padded * chunks].fill(WeightChunk::default());
                    for c in 0..columns {
                        let w = &weights[(first + c) * row_bytes..(first + c + 1) * row_bytes];
                        let out = &mut panel[c * chunks..(c + 1) * chunks];
                        // SAFETY: the tier's CPU features were asserted; `w` is the whole row and `out`
                        // holds its chunks.
                        unsafe { pack_column_on::<B, G>(tier, w, blocks, out) };
                    }
                    // Rows outer: a tile of activation rows stays in the L1 cache while every
                    // column of the group passes it.
                    for first_row in (0..m).step_by(ROW_TILE) {
                        for tile in (0..padded).step_by(COLUMN_TILE) {
                            let columns = (columns - tile).min(COLUMN_TILE);
                            multiply(&panel[tile * chunks..], first_row, first + tile, columns);
                        }
                    }
                }
            });
        });
    });
}

/// [`avx2::pack_column`] or [`avx512::pack_column`].
///
/// # Safety
/// As theirs; the tier's CPU features must be there.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_column_on<B: BlockFormat, const G: usize>(
    tier: Tier,
    w: &[u8],
    blocks: usize,
    out: &mut [WeightChunk<G>],
) {
    // SAFETY: the caller vouches for the row, the output and the features.
    unsafe {
        match tier {
            Tier::Avx512 => avx512::pack_column::<B, G>(w, blocks, out),
            // Packing multiplies nothing: AVX-VNNI has nothing to add to it.
            _ => avx2::pack_column::<B, G>(w, blocks, out),
        }
    }
}

/// [`avx2::dot_row`] or [`avx512::dot_row`].
///
/// # Safety
/// As theirs; the tier's CPU features must be there.
#[cfg(target_arch = "x86_64")]
unsafe fn dot_row_on<B: BlockFormat, const G: usize, const R: usize>(
    tier: Tier,
    w: &[u8],
    blocks: usize,
    rows: [&[ActChunk<G>]; R],
    chunks: usize,
) -> [f32; R] {
    // SAFETY: the caller vouches for the row, the activations and the features.
    unsafe {
        match tier {
            Tier::Avx512 => avx512::dot_row::<B, G, R>(w, blocks, rows, chunks),
            Tier::AvxVnni => avx2::dot_row::<B, G, R, true>(w, blocks, rows, chunks),
            _ => avx2::dot_row::<B, G, R, false>(w, blocks, rows, chunks),
        }
    }
}

/// [`avx2::tile`] or [`avx512::tile`].
///
/// # Safety
/// As theirs; the tier's CPU features must be there.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_on<B: BlockFormat, const G: usize, const R: usize, const C: usize>(
    tier: Tier,
    columns: [&[WeightChunk<G>]; C],
    rows: [&[ActChunk<G>]; R],
    chunks: usize,
) -> [[f32; C]; R] {
    // SAFETY: the caller vouches for the rows, columns and features.
    unsafe {
        match tier {
            Tier::Avx512 => avx512::tile::<B, G, R, C>(columns, rows, chunks),
            Tier::AvxVnni => avx2::tile::<B, G, R, C, true>(columns, rows, chunks),
            _ => avx2::tile::<B, G, R, C, false>(columns, rows, chunks),
        }
    }
}

/// A column's sums for fewer rows than a tile's in a tile's array.
fn pad_row<const R: usize>(sums: [f32; R]) -> [f32; ROW_TILE] {
    std::array::from_fn(|r| if r < R { sums[r] } else { 0.0 })
}

/// A smaller tile's sums in a full tile's array.
fn pad<const R: usize>(sums: [[f32; COLUMN_TILE]; R]) -> [[f32; COLUMN_TILE]; ROW_TILE] {
    std::array::from_fn(|r| if r < R { sums[r] } else { [0.0; COLUMN_TILE] })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::student::kernels::activations::{RowScratch, quantize_row};
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
    /// The tiers of duet's kernels this CPU can run.
    fn tiers() -> Vec<Tier> {
        [Tier::Avx512, Tier::AvxVnni, Tier::Avx2]
            .into_iter()
            .filter(|t| t.available())
            .collect()
    }

    #[test]
    fn kernels_match_candles_dequantized_reference() {
        if tiers().is_empty() {
            eprintln!("skipped: this CPU has neither AVX-512 VNNI nor AVX2");
            return;
        }
        let n = 37;
        for tier in tiers() {
            for dtype in FORMATS
                .into_iter()
                .filter(|d| std::env::var("ONLY").map_or(true, |o| format!("{d:?}") == o))
            {
                let format = Format::for_dtype(dtype).unwrap();
                // 96 values = 3 blocks: a whole pair and a lone last block, in one partly filled
                // chunk; 1,120 fill two chunks and part of a third. K-quants come in super-blocks
                // of 256: two (one chunk of 32-value spans, two of Q6_K's 16-value ones) or three.
                let lengths = if format.block_values() == 256 {
                    [512, 768]
                } else {
                    [96, 1120]
                };
                for k in lengths {
                    // Magnitudes change every 16 values, so that every scale matters.
                    let values: Vec<f32> = (0..n * k)
                        .map(|i| {
                            ((i * 7919 % 2003) as f32 / 1001.0 - 1.0) * (1 + i / 16 % 5) as f32
                        })
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
                        matmul_on(tier, format, &bytes, (m, k, n), &x, &mut ours);
                        // candle 0.11's own product breaks on these shapes for Q4_0, Q5_1 and Q5_K (it
                        // writes past its scratch or panics): the dequantized reference alone checks them.
                        let candle_product: Option<Product> = match dtype {
                            GgmlDType::Q4_1 => Some(candle_product::<k_quants::BlockQ4_1>),
                            GgmlDType::Q5_0 => Some(candle_product::<k_quants::BlockQ5_0>),
                            GgmlDType::Q8_0 => Some(candle_product::<k_quants::BlockQ8_0>),
                            GgmlDType::Q4K => Some(candle_product::<k_quants::BlockQ4K>),
                            GgmlDType::Q6K => Some(candle_product::<k_quants::BlockQ6K>),
                            _ => None,
                        };
                        let candles = candle_product.map(|product| {
                            let mut candles = vec![0f32; m * n];
                            product(&bytes, (m, k, n), &x, &mut candles);
                            candles
                        });
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
                                "{tier:?} {dtype:?} k={k} m={m} element {i}: {a} vs {b} (mass {s})"
                            );
                            // candle quantizes K-quant activations per 256 values, duet per 32.
                            let close = if format.block_values() == 256 {
                                1e-2
                            } else {
                                1e-3
                            };
                            let Some(candles) = &candles else { continue };
                            let c = candles[i];
                            assert!(
                                (a - c).abs() <= close * s,
                                "{tier:?} {dtype:?} k={k} m={m} element {i}: {a} vs candle's {c} (mass {s})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Every GGUF format duet has a kernel for.
    const FORMATS: [GgmlDType; 8] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// A product `dst (m x n) = x (m x k) @ weights^T` over GGUF bytes.
    type Product = fn(&[u8], (usize, usize, usize), &[f32], &mut [f32]);

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

    /// A row's products are the same bits alone or in a small batch (decoding) as beside
    /// many rows (a prompt), whatever its place in a tile, for every format and chunk shape;
    /// and the same bits on every tier.
    #[test]
    fn a_rows_products_do_not_depend_on_the_rows_beside_it() {
        let n = 21;
        for dtype in FORMATS {
            // Each length's products on the first tier, for the others to match.
            let mut first_tier: Vec<Vec<f32>> = Vec::new();
            for tier in tiers() {
                let format = Format::for_dtype(dtype).unwrap();
                // Full chunks, a chunk of 12 spans, short last chunks of 2 and 8 spans.
                let lengths: &[usize] = if format.block_values() == 256 {
                    &[512, 768, 1280]
                } else {
                    &[896, 576, 768]
                };
                for (l, &k) in lengths.iter().enumerate() {
                    let values: Vec<f32> = (0..n * k)
                        .map(|i| ((i * 31 % 97) as f32 - 48.0) / 30.0)
                        .collect();
                    let dense = Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap();
                    let bytes = QTensor::quantize(&dense, dtype)
                        .unwrap()
                        .data()
                        .unwrap()
                        .to_vec();
                    let m = 11;
                    let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.11).cos()).collect();
                    let mut together = vec![0f32; m * n];
                    matmul_on(tier, format, &bytes, (m, k, n), &x, &mut together);
                    for i in 0..m {
                        let mut alone = vec![0f32; n];
                        matmul_on(
                            tier,
                            format,
                            &bytes,
                            (1, k, n),
                            &x[i * k..(i + 1) * k],
                            &mut alone,
                        );
                        assert_eq!(
                            alone,
                            together[i * n..(i + 1) * n],
                            "{dtype:?} k={k} row {i}"
                        );
                    }
                    let mut pair = vec![0f32; 3 * n];
                    matmul_on(tier, format, &bytes, (3, k, n), &x[4 * k..7 * k], &mut pair);
                    assert_eq!(pair, together[4 * n..7 * n], "{dtype:?} k={k} rows 4..7");
                    match first_tier.get(l) {
                        Some(first) => assert_eq!(&together, first, "{tier:?} {dtype:?} k={k}"),
                        None => first_tier.push(together),
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_rows_carry_scales_and_offset_sums_per_lane() {
        // 608 values: a full chunk of 16 spans of 32, then one of 3 spans.
        let x: Vec<f32> = (0..608).map(|i| (i % 200) as f32 - 20.0).collect();
        let mut out = [ActChunk::<8>::default(); 2];
        out[1].qs[3] = [5; 64]; // stale values from an earlier product
        quantize_row(&x, 16, true, &mut RowScratch::default(), &mut out);
        let (full, short) = (&out[0], &out[1]);
        // Lane 0 holds span 0, lane 8 span 1, lane 1 span 2 (the transpose's order).
        assert_eq!(
            [lane_span(0, 8), lane_span(8, 8), lane_span(1, 8)],
            [0, 1, 2]
        );
        assert_eq!(full.qs[0][0], -127); // -20 is the largest magnitude of the first block
        assert!((full.scale[0] - 20.0 / 127.0).abs() < 1e-4);
        assert!((full.scale[8] - 43.0 / 127.0).abs() < 1e-4); // second block: up to 43
        // Register 1, lane 8: values 4..8 of the second block (16..20 as numbers).
        let expected: Vec<i8> = (16..20)
            .map(|v: i32| (v as f32 * 127.0 / 43.0).round() as i8)
            .collect();
        assert_eq!(full.qs[1][32..36], expected[..]);
        let lane_sum = |chunk: &ActChunk<8>, lane: usize| -> i32 {
            (0..8)
                .map(|j| {
                    chunk.qs[j][4 * lane..4 * lane + 4]
                        .iter()
                        .map(|&q| q as i32)
                        .sum::<i32>()
                })
                .sum()
        };
        let block = lane_sum(full, 8);
        assert_eq!(full.offset[8], -16 * block);
        let scaled_sum = full.scale[8] * block as f32; // both sides rounded to f16
        assert!((full.mean[8] - scaled_sum).abs() <= 2e-3 * scaled_sum.abs());

        // The last chunk: spans 16..19 of the row in lanes 0, 8 and 1, the rest padding.
        let inverse = 1.0 / (155.0 / 127.0); // span 17's largest value: 155
        let expected: Vec<i8> = x[548..552]
            .iter()
            .map(|v| (v * inverse).round() as i8)
            .collect();
        // Lane 8 (span 17), register 1: its values 4..8 (row values 548..552).
        assert_eq!(short.qs[1][32..36], expected[..]);
        assert_eq!(short.offset[8], -16 * lane_sum(short, 8));
        assert_eq!(short.scale[2], 0.0); // lane 2: span 20, past the row's end
        assert!(
            short
                .qs
                .iter()
                .all(|reg| reg[8..12].iter().all(|&q| q == 0))
        );
    }
}
