//! Causal grouped-query attention of a sequence's new rows against its key/value cache,
//! computed tile by tile with an online softmax (as FlashAttention does), straight over the
//! cache's buffers: no copy of the cache, no mask tensor, no score row as long as the sequence.
//!
//! A work item is a query block: up to [`QUERY_VECTORS`] query vectors, those of consecutive
//! rows for all the query heads that share one key/value head. It walks the cache in key
//! blocks of [`KEY_BLOCK`] positions. Each block's keys and values are widened from f16 once per
//! item and used by every query vector in it; each vector keeps the running maximum of its
//! scores and the running sum of their exponentials, and rescales its weighted values when the
//! maximum grows. The AVX-512 kernel ([`tiled_x86`]) thus works on whole blocks with vector
//! arithmetic over 16 keys or 16 head values, where computing a row at a time needed a
//! horizontal sum and a scalar `exp` per key and head: long prompts went quadratic in slow
//! instructions.
//!
//! A row's result must not depend on the rows beside it (see [`ops`](super::ops) on why): a
//! row read alone while decoding gives the same bits as inside a prompt, a batch, or after a
//! cached prefix. So key blocks start at multiples of [`KEY_BLOCK`] counted from position 0,
//! never from a query block's first row; every query vector goes through the same operations
//! in the same order whatever shares its item; positions after a row's own score `-inf`, weigh
//! exactly zero and leave its weighted values untouched; and a vector skips the key blocks
//! that start after its position.

#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod tiled_avx2;
#[cfg(target_arch = "x86_64")]
mod tiled_x86;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::ops::dot;
use crate::student::kernels::pool::{for_each_range, item_slice};

/// The attention geometry of a model.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Cache positions per key block: four registers of 16 scores per query vector, so a tile
/// of four vectors keeps 16 accumulators. 128 measured 4% faster for heads of 64 values but
/// 20% slower for heads of 128 (the transposed keys, 64 KiB, no longer fit in L1).
const KEY_BLOCK: usize = 64;

/// Query vectors per work item, at most: enough that widening a key block costs little beside
/// the arithmetic that uses it (112 measured 2-3% slower, 56 8%), few enough that a 256-row
/// prompt pass still makes several items per thread.
const QUERY_VECTORS: usize = 224;

/// For `t` query rows at positions `pos..pos + t` (`queries`: `t * heads * head_dim`), attends
/// over cache positions `0..=own position` (`keys`/`values`: `[position][kv_head][head_dim]`,
/// at least `pos + t` positions) and writes `t * heads * head_dim` values to `out`.
pub fn attend(
    h: Heads,
    queries: &[f32],
    keys: &[f16],
    values: &[f16],
    pos: usize,
    out: &mut [f32],
) {
    attend_with(
        Kernel::for_heads(h.head_dim),
        h,
        queries,
        keys,
        values,
        pos,
        out,
    );
}

/// [`attend`] through `kernel`.
fn attend_with(
    kernel: Kernel,
    h: Heads,
    queries: &[f32],
    keys: &[f16],
    values: &[f16],
    pos: usize,
    out: &mut [f32],
) {
    let (hd, row, kv_row) = (h.head_dim, h.heads * h.head_dim, h.kv_heads * h.head_dim);
    let t = queries.len() / row;
    assert_eq!(out.len(), queries.len(), "one output per query value");
    assert!(
        keys.len() >= (pos + t) * kv_row && values.len() >= (pos + t) * kv_row,
        "the cache holds every row's own position"
    );
    let group = h.heads / h.kv_heads;
    let rows_per_item = (QUERY_VECTORS / group).max(1);
    let blocks = t.div_ceil(rows_per_item);
    let scale = 1.0 / (hd as f32).sqrt();
    let out_addr = out.as_mut_ptr() as usize;

    for_each_range(blocks * h.kv_heads, |items| {
        SCRATCH.with(|scratch| {
            let s = &mut *scratch.borrow_mut();
            for item in items {
                // Last rows first: they see the most keys, so the short items fill the tail
                // and the threads finish together.
                let block = blocks - 1 - item / h.kv_heads;
                let kv_head = item % h.kv_heads;
                let rows = block * rows_per_item..t.min((block + 1) * rows_per_item);
                let heads = kv_head * group * hd..(kv_head + 1) * group * hd;
                let src = Source {
                    keys,
                    values,
                    kv_row,
                    base: kv_head * hd,
                    head_dim: hd,
                };
                let item = Item {
                    first: pos + rows.start,
                    rows: rows.len(),
                    group,
                };
                s.queries.clear();
                for r in rows.clone() {
                    let q = &queries[r * row..][heads.clone()];
                    s.queries.extend(q.iter().map(|&x| x * scale));
                }
                attend_item(kernel, &src, &item, s);
                for (r, result) in rows.zip(s.out.chunks_exact(heads.len())) {
                    // SAFETY: a row's query heads of one key/value head are a contiguous
                    // slice of `out` that belongs to this item alone.
                    let o =
                        unsafe { item_slice::<f32>(out_addr, r * row + heads.start, heads.len()) };
                    o.copy_from_slice(result);
                }
            }
        });
    });
}

/// Which kernel attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// [`tiled_x86`]: AVX-512, heads of 64 or 128 values.
    Avx512,
    /// [`tiled_avx2`]: AVX2 with FMA and F16C, heads of 64 or 128 values.
    Avx2,
    /// [`portable_item`] compiled for AVX2: the AVX2 tiers' other head sizes.
    PortableAvx2,
    /// [`portable_item`]: any CPU and head size.
    Portable,
}

impl Kernel {
    /// The fastest kernel the tier in use has for heads of `head_dim` values.
    fn for_heads(head_dim: usize) -> Self {
        use crate::student::kernels::{Tier, tier};
        match (tier(), head_dim) {
            (Tier::Avx512, 64 | 128) => Kernel::Avx512,
            (Tier::AvxVnni | Tier::Avx2, 64 | 128) => Kernel::Avx2,
            (Tier::AvxVnni | Tier::Avx2, _) => Kernel::PortableAvx2,
            _ => Kernel::Portable,
        }
    }
}

/// Runs one item through `kernel`; the results land in `s.out`.
fn attend_item(kernel: Kernel, src: &Source, item: &Item, s: &mut Scratch) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `Kernel::for_heads` picked the kernel for this tier's CPU features and this
    // head size (tests pick only kernels the CPU has).
    unsafe {
        match (kernel, src.head_dim) {
            (Kernel::Avx512, 64) => return tiled_x86::attend_item::<4>(src, item, s),
            (Kernel::Avx512, _) => return tiled_x86::attend_item::<8>(src, item, s),
            (Kernel::Avx2, 64) => return tiled_avx2::attend_item::<8>(src, item, s),
            (Kernel::Avx2, _) => return tiled_avx2::attend_item::<16>(src, item, s),
            (Kernel::PortableAvx2, _) => return portable_item_avx2(src, item, s),
            (Kernel::Portable, _) => {}
        }
    }
    let _ = kernel;
    portable_item(src, item, s);
}

/// [`portable_item`] compiled for AVX2, which vectorizes its loops twice as wide as a plain
/// x86-64 build can; the same operations in the same order, so the same bits.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn portable_item_avx2(src: &Source, item: &Item, s: &mut Scratch) {
    portable_item(src, item, s);
}

/// The keys and values of one key/value head in the cache.
struct Source<'a> {
    keys: &'a [f16],
    values: &'a [f16],
    /// Values per cached position (all key/value heads).
    kv_row: usize,
    /// Where this head's values start in a position.
    base: usize,
    head_dim: usize,
}

impl Source<'_> {
    fn key(&self, position: usize) -> &[f16] {
        &self.keys[position * self.kv_row + self.base..][..self.head_dim]
    }

    fn value(&self, position: usize) -> &[f16] {
        &self.values[position * self.kv_row + self.base..][..self.head_dim]
    }
}

/// One work item: `rows` consecutive rows from position `first`, `group` query vectors each.
struct Item {
    first: usize,
    rows: usize,
    group: usize,
}

/// The part of one key block an item needs.
struct Block {
    /// The block's first position: a multiple of [`KEY_BLOCK`].
    start: usize,
    /// Positions from `start` that the item's last row sees (the others see fewer).
    keys: usize,
    /// The first query vector that sees any of them: rows before the block skip it.
    first_vector: usize,
}

impl Item {
    fn vectors(&self) -> usize {
        self.rows * self.group
    }

    /// The position of vector `v`'s row: the last one it sees.
    fn position(&self, v: usize) -> usize {
        self.first + v / self.group
    }

    /// The key blocks any row of the item sees, in order.
    fn blocks(&self) -> impl Iterator<Item = Block> + use<'_> {
        let last = self.first + self.rows - 1;
        (0..=last).step_by(KEY_BLOCK).map(move |start| Block {
            start,
            keys: KEY_BLOCK.min(last + 1 - start),
            first_vector: start.saturating_sub(self.first) * self.group,
        })
    }
}

/// Per worker: the item's query vectors and their running state, and one widened key block.
#[derive(Default)]
struct Scratch {
    /// The item's query vectors scaled by `1/sqrt(head_dim)`: `[vector][head_dim]`.
    queries: Vec<f32>,
    /// Each vector's weighted values, unnormalised until [`Scratch::finish`].
    out: Vec<f32>,
    /// Each vector's largest score so far.
    max: Vec<f32>,
    /// Each vector's sum of `exp(score - max)` so far.
    sum: Vec<f32>,
    /// The factor the current block rescales each vector's `out` by (its maximum grew).
    rescale: Vec<f32>,
    /// Each vector's scores against the block, then their weights: `[vector][KEY_BLOCK]`.
    scores: Vec<f32>,
    /// The block's keys as f32: `[head_dim][KEY_BLOCK]` for the AVX-512 kernel (16 keys per
    /// register), `[KEY_BLOCK][head_dim]` for the portable one.
    keys: Vec<f32>,
    /// The block's values as f32: `[KEY_BLOCK][head_dim]`.
    values: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

impl Scratch {
    /// Resets the running state for `vectors` query vectors (already in `queries`).
    fn start(&mut self, vectors: usize, head_dim: usize) {
        assert_eq!(self.queries.len(), vectors * head_dim);
        self.out.clear();
        self.out.resize(vectors * head_dim, 0.0);
        for state in [&mut self.max, &mut self.sum, &mut self.rescale] {
            state.clear();
        }
        self.max.resize(vectors, f32::NEG_INFINITY);
        self.sum.resize(vectors, 0.0);
        self.rescale.resize(vectors, 1.0);
        self.scores.resize(vectors * KEY_BLOCK, 0.0);
        self.keys.resize(KEY_BLOCK * head_dim, 0.0);
        self.values.resize(KEY_BLOCK * head_dim, 0.0);
    }

    /// Divides each vector's weighted values by its sum of weights.
    fn finish(&mut self, head_dim: usize) {
        for (out, &sum) in self.out.chunks_exact_mut(head_dim).zip(&self.sum) {
            for o in out {
                *o /= sum;
            }
        }
    }
}

/// Any CPU and head size: the same blocks as the AVX-512 kernel, each vector's scores over
/// only the positions it sees, in scalar arithmetic.
#[inline(always)]
fn portable_item(src: &Source, item: &Item, s: &mut Scratch) {
    let hd = src.head_dim;
    s.start(item.vectors(), hd);
    for block in item.blocks() {
        for j in 0..block.keys {
            let (key, value) = (src.key(block.start + j), src.value(block.start + j));
            key.convert_to_f32_slice(&mut s.keys[j * hd..][..hd]);
            value.convert_to_f32_slice(&mut s.values[j * hd..][..hd]);
        }
        for v in block.first_vector..item.vectors() {
            let seen = block.keys.min(item.position(v) + 1 - block.start);
            let q = &s.queries[v * hd..][..hd];
            let scores = &mut s.scores[..seen];
            for (j, score) in scores.iter_mut().enumerate() {
                *score = dot(q, &s.keys[j * hd..][..hd]);
            }
            let block_max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let max = s.max[v].max(block_max);
            let rescale = (s.max[v] - max).exp();
            for score in scores.iter_mut() {
                *score -= max;
            }
            exp_in_place(scores);
            let mut total = 0f32;
            for &weight in scores.iter() {
                total += weight;
            }
            s.max[v] = max;
            s.sum[v] = s.sum[v] * rescale + total;
            let out = &mut s.out[v * hd..][..hd];
            for o in out.iter_mut() {
                *o *= rescale;
            }
            for (j, &weight) in scores.iter().enumerate() {
                add_scaled(out, weight, &s.values[j * hd..][..hd]);
            }
        }
    }
    s.finish(hd);
}

/// Cephes' `expf` polynomial for `(e^r - 1 - r) / r^2` on `|r| <= ln(2)/2`, highest power
/// first: both `exp`s evaluate it.
const EXP_POLYNOMIAL: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `e^x` for every value, within a few ulps of `f32::exp` (Cephes' `expf`, as the AVX-512
/// kernel's `exp`), in plain arithmetic that compiles to vector instructions where the
/// library's scalar `exp` cannot: `x = n ln 2 + r`, a polynomial for `e^r`, times `2^n` built
/// from its bits. `exp(0)` is exactly 1 and `exp(-inf)` exactly 0, which masking relies on.
#[inline(always)]
fn exp_in_place(values: &mut [f32]) {
    for v in values.iter_mut() {
        // Below -104 every result rounds to zero, above 88 it is out of range anyway.
        let x = v.clamp(-104.0, 88.0);
        // Round to nearest, ties to even, by adding and taking away 1.5 * 2^23.
        let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
        // ln 2 in two parts: n * 0.693359375 is exact, so r keeps its low bits.
        let r = x - n * (355.0 / 512.0);
        let r = r - n * -2.121_944_4e-4;
        let mut y = EXP_POLYNOMIAL[0];
        for c in &EXP_POLYNOMIAL[1..] {
            y = y * r + c;
        }
        let y = y * (r * r) + r + 1.0;
        // 2^n in two normal halves (n reaches -150, below the smallest normal exponent).
        let n = n as i32;
        let half = n / 2;
        let power = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
        *v = y * power(half) * power(n - half);
    }
}

/// `out += w * v`.
#[inline(always)]
fn add_scaled(out: &mut [f32], w: f32, v: &[f32]) {
    for (o, &x) in out.iter_mut().zip(v) {
        *o += w * x;
    }
}
