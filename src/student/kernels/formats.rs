//! The GGUF block formats duet's kernels read, one type each (as candle's `k_quants` does):
//! the block's layout as a `#[repr(C)]` struct whose size is checked at compile time, and
//! the constants the kernels need. Every block size and offset constant a kernel uses comes
//! from here (the byte positions inside a block are the structs' field layouts).

use candle_core::quantized::GgmlDType;
use half::f16;

/// A block format with a kernel, chosen at run time from a tensor's dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// What a kernel needs to know about a block format, at compile time.
pub trait BlockFormat {
    const FORMAT: Format;
    /// Weights per block.
    const VALUES: usize;
    /// Bytes per block.
    const BYTES: usize;
    /// What is subtracted from each stored unsigned value; the minimums of Q4_1 and Q4_K
    /// are floats, applied apart ([`HAS_MINIMUM`](Self::HAS_MINIMUM)).
    const OFFSET: i32;
    const HAS_MINIMUM: bool;
    /// Bytes per 64 weights (K-quants: on average over a super-block).
    const PAIR_BYTES: usize = Self::BYTES * 64 / Self::VALUES;
    /// Groups of 4 values in the span one scale covers: 8 (32 values), or 4 for Q6_K's
    /// scales per 16. A kernel lane sums one such span (see `kernels/mod.rs`).
    const GROUPS: usize;
}

/// 32 weights: 4-bit values and one f16 scale: `w = d * (q - 8)`.
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; 16],
}

/// 32 weights: 4-bit values, an f16 scale and an f16 minimum: `w = d * q + m`.
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}

/// 32 weights: 4-bit values with a fifth bit packed apart, one f16 scale: `w = d * (q - 16)`.
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// 32 weights: 4-bit values with a fifth bit packed apart, an f16 scale and minimum:
/// `w = d * q + m`.
#[repr(C)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// 32 weights: signed bytes and one f16 scale: `w = d * q`.
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}

/// A super-block of 256: 4-bit values, and per 32 a 6-bit scale and minimum under f16
/// super-scales: `w = d * sc * q - dmin * m`.
#[repr(C)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; 128],
}

/// A super-block of 256: Q4_K's scales and 4-bit values, and a fifth bit per value packed
/// apart (bit `2j` / `2j + 1` of byte `l` for value `l` of sub-blocks `2j` / `2j + 1`).
#[repr(C)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}

/// A super-block of 256: 6-bit values split in 4 + 2 bits, a signed 8-bit scale per 16
/// under an f16 super-scale: `w = d * sc * (q - 32)`.
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    pub d: f16,
}

macro_rules! block_format {
    ($block:ty, $format:ident, values: $values:literal, bytes: $bytes:literal, offset: $offset:literal, minimum: $minimum:literal, groups: $groups:literal) => {
        // The layout GGUF files use: a mismatch would read every weight wrong.
        const _: () = assert!(std::mem::size_of::<$block>() == $bytes);
        impl BlockFormat for $block {
            const FORMAT: Format = Format::$format;
            const VALUES: usize = $values;
            const BYTES: usize = $bytes;
            const OFFSET: i32 = $offset;
            const HAS_MINIMUM: bool = $minimum;
            const GROUPS: usize = $groups;
        }
    };
}

block_format!(BlockQ4_0, Q4_0, values: 32, bytes: 18, offset: 8, minimum: false, groups: 8);
block_format!(BlockQ4_1, Q4_1, values: 32, bytes: 20, offset: 0, minimum: true, groups: 8);
block_format!(BlockQ5_0, Q5_0, values: 32, bytes: 22, offset: 16, minimum: false, groups: 8);
block_format!(BlockQ5_1, Q5_1, values: 32, bytes: 24, offset: 0, minimum: true, groups: 8);
block_format!(BlockQ8_0, Q8_0, values: 32, bytes: 34, offset: 128, minimum: false, groups: 8);
block_format!(BlockQ4K, Q4K, values: 256, bytes: 144, offset: 0, minimum: true, groups: 8);
block_format!(BlockQ5K, Q5K, values: 256, bytes: 176, offset: 0, minimum: true, groups: 8);
block_format!(BlockQ6K, Q6K, values: 256, bytes: 210, offset: 32, minimum: false, groups: 4);

/// Runs `$body` with `$B` bound to the block type of the [`Format`] `$format`.
macro_rules! with_block {
    ($format:expr, $B:ident => $body:expr) => {
        match $format {
            $crate::student::kernels::formats::Format::Q4_0 => {
                type $B = $crate::student::kernels::formats::BlockQ4_0;
                $body
            }
            $crate::student::kernels::formats::Format::Q5_1 => {
                type $B = $crate::student::kernels::formats::BlockQ5_1;
                $body
            }
            $crate::student::kernels::formats::Format::Q5K => {
                type $B = $crate::student::kernels::formats::BlockQ5K;
                $body
            }
            $crate::student::kernels::formats::Format::Q4_1 => {
                type $B = $crate::student::kernels::formats::BlockQ4_1;
                $body
            }
            $crate::student::kernels::formats::Format::Q5_0 => {
                type $B = $crate::student::kernels::formats::BlockQ5_0;
                $body
            }
            $crate::student::kernels::formats::Format::Q8_0 => {
                type $B = $crate::student::kernels::formats::BlockQ8_0;
                $body
            }
            $crate::student::kernels::formats::Format::Q4K => {
                type $B = $crate::student::kernels::formats::BlockQ4K;
                $body
            }
            $crate::student::kernels::formats::Format::Q6K => {
                type $B = $crate::student::kernels::formats::BlockQ6K;
                $body
            }
        }
    };
}
pub(crate) use with_block;

impl Format {
    /// The format of a GGUF dtype, when duet has a kernel for it and this CPU can run it.
    pub fn for_dtype(dtype: GgmlDType) -> Option<Self> {
        let format = match dtype {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        };
        super::kernels_in_use().then_some(format)
    }

    /// Weights per stored block.
    pub fn block_values(self) -> usize {
        with_block!(self, B => B::VALUES)
    }

    /// Bytes per stored block.
    pub fn block_bytes(self) -> usize {
        with_block!(self, B => B::BYTES)
    }

    /// See [`BlockFormat::GROUPS`].
    pub fn groups(self) -> usize {
        with_block!(self, B => B::GROUPS)
    }

    /// See [`BlockFormat::OFFSET`].
    pub fn offset(self) -> i32 {
        with_block!(self, B => B::OFFSET)
    }
}

/// Reads a little-endian f16 at `p`.
///
/// # Safety
/// `p` and `p + 1` must be readable.
#[inline(always)]
pub unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller vouches for both bytes.
    unsafe { half::f16::from_bits(u16::from_le_bytes([*p, *p.add(1)])).to_f32() }
}

/// The scale and (Q4_1, Q4_K) minimum of span `span` (of `4 * B::GROUPS` values) of row `w`.
///
/// # Safety
/// The span must lie inside the row at `w`.
#[inline(always)]
pub unsafe fn span_scale<B: BlockFormat>(w: *const u8, span: usize) -> (f32, f32) {
    // SAFETY: every read stays inside the block or super-block holding the span.
    unsafe {
        match B::FORMAT {
            Format::Q4_1 | Format::Q5_1 => {
                let p = w.add(span * B::BYTES);
                (f16_at(p), f16_at(p.add(2)))
            }
            Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => (f16_at(w.add(span * B::BYTES)), 0.0),
            Format::Q4K | Format::Q5K => {
                let sb = w.add(span / 8 * B::BYTES);
                let scales = std::slice::from_raw_parts(sb.add(4), 12);
                let (s, m) = scale_min_k4(span % 8, scales);
                (f16_at(sb) * s, -f16_at(sb.add(2)) * m)
            }
            Format::Q6K => {
                let sb = w.add(span / 16 * B::BYTES);
                let scale = *sb.add(192 + span % 16).cast::<i8>();
                (f16_at(sb.add(208)) * scale as f32, 0.0)
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

/// The scales (`d * sc`) and minimums (`-dmin * m`) of a Q4_K super-block's 8 spans in span
/// order, unpacked from the 12 bytes all at once, 4 at a time in 32-bit words (as llama.cpp
/// does): the same values as [`span_scale`] one by one, at a fraction of the cost.
///
/// # Safety
/// The super-block's 144 bytes must be readable at `sb`.
#[inline(always)]
pub unsafe fn q4k_scales(sb: *const u8) -> ([f32; 8], [f32; 8]) {
    // SAFETY: the caller vouches for the super-block.
    let (d, dmin, packed) = unsafe {
        (
            f16_at(sb),
            f16_at(sb.add(2)),
            std::slice::from_raw_parts(sb.add(4), 12),
        )
    };
    let word = |i: usize| {
        u32::from_le_bytes([
            packed[4 * i],
            packed[4 * i + 1],
            packed[4 * i + 2],
            packed[4 * i + 3],
        ])
    };
    let (low6, low4, low2) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
    let (w0, w1, w2) = (word(0), word(1), word(2));
    // Spans 0..4 keep 6 bits of bytes 0..4 (scales) and 4..8 (minimums); spans 4..8 take 4
    // bits from bytes 8..12 and their top 2 from the first 8 bytes' top bits.
    let scales = [w0 & low6, (w2 & low4) | (((w0 >> 6) & low2) << 4)];
    let minimums = [w1 & low6, ((w2 >> 4) & low4) | (((w1 >> 6) & low2) << 4)];
    let byte = |words: [u32; 2], j: usize| (words[j / 4] >> (8 * (j % 4))) as u8 as f32;
    (
        std::array::from_fn(|j| d * byte(scales, j)),
        std::array::from_fn(|j| -dmin * byte(minimums, j)),
    )
}

/// The scales and minimums of a Q4_K or Q5_K (`B`) row's chunk `c` (two super-blocks, 16
/// spans of 32) in lane order (`kernels::lane_span` with 8 groups), zero past the row's `spans`.
///
/// # Safety
/// The row's `spans` spans must be readable at `w`.
#[inline(always)]
pub unsafe fn q4k_chunk_scales<B: BlockFormat>(
    w: *const u8,
    c: usize,
    spans: usize,
) -> ([f32; 16], [f32; 16]) {
    let (mut by_span, mut scale, mut minimum) = ([(0f32, 0f32); 16], [0f32; 16], [0f32; 16]);
    for half in 0..2 {
        let first = 16 * c + 8 * half;
        if first < spans {
            // SAFETY: the super-block holding spans `first..first + 8` is in the row.
            let (s, m) = unsafe { q4k_scales(w.add(first / 8 * B::BYTES)) };
            for j in 0..8 {
                by_span[8 * half + j] = (s[j], m[j]);
            }
        }
    }
    for lane in 0..16 {
        (scale[lane], minimum[lane]) = by_span[super::lane_span(lane, BlockQ4K::GROUPS)];
    }
    (scale, minimum)
}
