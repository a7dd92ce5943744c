//! Causal grouped-query attention of a sequence's new rows against its key/value cache,
//! straight over the cache's buffers: no copies of keys, no mask tensor, one work item per
//! (row, key/value head) on candle's CPU thread pool. Each row is computed alone, in a fixed order
//! (see [`ops`](super::ops) on why that matters).

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

/// For `t` query rows at positions `pos..pos + t` (`queries`: `t * heads * head_dim`), attends
/// over cache positions `0..=own position` (`keys`/`values`: `[position][kv_head][head_dim]`)
/// and writes `t * heads * head_dim` values to `out`.
///
/// A work item is one row and one key/value head with all the query heads that share it,
/// so each cached key and value is widened from f16 once per item, not once per query head.
pub fn attend(
    h: Heads,
    queries: &[f32],
    keys: &[f16],
    values: &[f16],
    pos: usize,
    out: &mut [f32],
) {
    let row = h.heads * h.head_dim;
    let t = queries.len() / row;
    assert_eq!(out.len(), queries.len(), "one output per query value");
    let group = h.heads / h.kv_heads;
    let scale = 1.0 / (h.head_dim as f32).sqrt();
    let out_addr = out.as_mut_ptr() as usize;

    let fast = simd_supported(h.head_dim);
    for_each_range(t * h.kv_heads, |items| {
        SCRATCH.with(|scratch| {
            let scratch = &mut *scratch.borrow_mut();
            for item in items {
                let (i, kv_head) = (item / h.kv_heads, item % h.kv_heads);
                let first_head = kv_head * group;
                let q = &queries[i * row + first_head * h.head_dim..][..group * h.head_dim];
                let item = Item {
                    h,
                    kv_head,
                    len: pos + i + 1,
                    scale,
                };
                // SAFETY: the query heads of one (row, key/value head) are a contiguous
                // slice of `out` that belongs to this item alone.
                let o = unsafe {
                    item_slice::<f32>(
                        out_addr,
                        i * row + first_head * h.head_dim,
                        group * h.head_dim,
                    )
                };
                #[cfg(target_arch = "x86_64")]
                if fast {
                    // SAFETY: `simd_supported` checked the CPU and the head size.
                    unsafe {
                        match h.head_dim {
                            64 => x86::attend_item::<4, 4>(&item, q, keys, values, scratch, o),
                            _ => x86::attend_item::<8, 2>(&item, q, keys, values, scratch, o),
                        }
                    };
                    continue;
                }
                let _ = fast;
                attend_item(&item, q, keys, values, scratch, o);
            }
        });
    });
}

/// One work item: a row's query heads that share key/value head `kv_head`.
struct Item {
    h: Heads,
    kv_head: usize,
    /// Cache positions the row sees (its own included).
    len: usize,
    scale: f32,
}

/// Per worker: scores (`group` rows of the sequence's length) and one widened key/value.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    wide: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Whether the AVX-512 path runs for heads of `head_dim` values (64 or 128) on this CPU.
fn simd_supported(head_dim: usize) -> bool {
    matches!(head_dim, 64 | 128) && crate::student::kernels::cpu_supported()
}

/// Any CPU: each cached key and value widened to f32 once per item.
fn attend_item(
    item: &Item,
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let (hd, len) = (item.h.head_dim, item.len);
    let kv_row = item.h.kv_heads * hd;
    scratch.scores.resize(q.len() / hd * len, 0.0);
    scratch.wide.resize(hd, 0.0);
    for j in 0..len {
        let key = &keys[j * kv_row + item.kv_head * hd..][..hd];
        key.convert_to_f32_slice(&mut scratch.wide);
        for (g, q) in q.chunks_exact(hd).enumerate() {
            scratch.scores[g * len + j] = dot(q, &scratch.wide) * item.scale;
        }
    }
    softmax_rows(&mut scratch.scores, len);
    out.fill(0.0);
    for j in 0..len {
        let value = &values[j * kv_row + item.kv_head * hd..][..hd];
        value.convert_to_f32_slice(&mut scratch.wide);
        for (g, o) in out.chunks_exact_mut(hd).enumerate() {
            add_scaled(o, scratch.scores[g * len + j], &scratch.wide);
        }
    }
}

/// Each `len`-long row of `scores` becomes its softmax.
fn softmax_rows(scores: &mut [f32], len: usize) {
    for row in scores.chunks_exact_mut(len) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut total = 0f32;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            total += *s;
        }
        for s in row.iter_mut() {
            *s /= total;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Item, Scratch, f16, softmax_rows};
    use std::arch::x86_64::*;

    /// [`super::attend_item`] with keys and values widened inside 512-bit registers, 16
    /// values at a time, for heads of `16 * CHUNKS` values; the weighted values of `HEADS`
    /// query heads are summed together (their accumulators fill most registers).
    ///
    /// Each key and value is widened once per position and used by every query head of the
    /// group (widening them per head cost as much as the arithmetic). Every sum keeps the
    /// order it has for a row alone, so a row's result does not depend on the rows beside it.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and VL, F16C and FMA, and the head `16 * CHUNKS` values.
    #[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
    pub(super) unsafe fn attend_item<const CHUNKS: usize, const HEADS: usize>(
        item: &Item,
        q: &[f32],
        keys: &[f16],
        values: &[f16],
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let (hd, len) = (item.h.head_dim, item.len);
        assert_eq!(hd, 16 * CHUNKS);
        let kv_row = item.h.kv_heads * hd;
        let group = q.len() / hd;
        let base = item.kv_head * hd;
        assert!(keys.len() >= (len - 1) * kv_row + base + hd && values.len() >= keys.len());
        assert!(out.len() >= group * hd);
        scratch.scores.resize(group * len, 0.0);
        let (keys, values, q) = (
            keys.as_ptr().cast::<u16>(),
            values.as_ptr().cast::<u16>(),
            q.as_ptr(),
        );
        let mut wide = [_mm512_setzero_ps(); CHUNKS];
        // SAFETY: every pointer below stays inside the slices checked above.
        unsafe {
            for j in 0..len {
                let key = keys.add(j * kv_row + base);
                for (c, w) in wide.iter_mut().enumerate() {
                    *w = _mm512_cvtph_ps(_mm256_loadu_si256(key.add(16 * c).cast()));
                }
                for g in 0..group {
                    let mut acc = _mm512_setzero_ps();
                    for (c, w) in wide.iter().enumerate() {
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(g * hd + 16 * c)), *w, acc);
                    }
                    scratch.scores[g * len + j] = _mm512_reduce_add_ps(acc) * item.scale;
                }
            }
            softmax_rows(&mut scratch.scores, len);
            let scores = scratch.scores.as_ptr();
            for first in (0..group).step_by(HEADS) {
                let heads = HEADS.min(group - first);
                let mut acc = [[_mm512_setzero_ps(); CHUNKS]; HEADS];
                for j in 0..len {
                    let value = values.add(j * kv_row + base);
                    for (c, w) in wide.iter_mut().enumerate() {
                        *w = _mm512_cvtph_ps(_mm256_loadu_si256(value.add(16 * c).cast()));
                    }
                    for (g, acc) in acc.iter_mut().enumerate().take(heads) {
                        let weight = _mm512_set1_ps(*scores.add((first + g) * len + j));
                        for (a, w) in acc.iter_mut().zip(&wide) {
                            *a = _mm512_fmadd_ps(weight, *w, *a);
                        }
                    }
                }
                for (g, acc) in acc.iter().enumerate().take(heads) {
                    for (c, a) in acc.iter().enumerate() {
                        _mm512_storeu_ps(out.as_mut_ptr().add((first + g) * hd + 16 * c), *a);
                    }
                }
            }
        }
    }
}

/// `out += w * v`.
fn add_scaled(out: &mut [f32], w: f32, v: &[f32]) {
    for (o, &x) in out.iter_mut().zip(v) {
        *o += w * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// softmax(q k^T / sqrt(d)) v over positions `0..=own`, evaluated directly.
    fn direct(h: Heads, queries: &[f32], keys: &[f16], values: &[f16], pos: usize) -> Vec<f32> {
        let (hd, row, kv_row) = (h.head_dim, h.heads * h.head_dim, h.kv_heads * h.head_dim);
        let t = queries.len() / row;
        let mut out = vec![0.0; queries.len()];
        for i in 0..t {
            for head in 0..h.heads {
                let kv = head / (h.heads / h.kv_heads);
                let q = &queries[i * row + head * hd..][..hd];
                let len = pos + i + 1;
                let logits: Vec<f32> = (0..len)
                    .map(|j| {
                        (0..hd)
                            .map(|d| q[d] * keys[j * kv_row + kv * hd + d].to_f32())
                            .sum::<f32>()
                            / (hd as f32).sqrt()
                    })
                    .collect();
                let z: f32 = logits.iter().map(|l| l.exp()).sum();
                for d in 0..hd {
                    out[i * row + head * hd + d] = (0..len)
                        .map(|j| logits[j].exp() / z * values[j * kv_row + kv * hd + d].to_f32())
                        .sum();
                }
            }
        }
        out
    }

    /// Both paths against the direct evaluation: head_dim 3 (portable only), 64 and 128
    /// (the AVX-512 path where the CPU has it), with 3 and 7 query heads per key/value head
    /// (SmolLM2's and Qwen2.5's groups). A row's result must not depend on the rows beside
    /// it: each row alone gives the same bits as all rows together.
    #[test]
    fn matches_a_direct_evaluation() {
        for (heads, kv_heads, head_dim) in [(6, 2, 3), (6, 2, 64), (14, 2, 64), (6, 2, 128)] {
            let h = Heads {
                heads,
                kv_heads,
                head_dim,
            };
            let group = heads / kv_heads;
            let (pos, t) = (5, 3);
            let kv_len = (pos + t) * kv_heads * head_dim;
            let keys: Vec<f16> = (0..kv_len)
                .map(|i| f16::from_f32(((i * 5 % 7) as f32) / 7.0 - 0.4))
                .collect();
            let values: Vec<f16> = (0..kv_len)
                .map(|i| f16::from_f32((i % 11) as f32 - 5.0))
                .collect();
            let row = heads * head_dim;
            let queries: Vec<f32> = (0..t * row).map(|i| (i as f32 * 0.3).cos()).collect();
            let expected = direct(h, &queries, &keys, &values, pos);

            let mut out = vec![0.0; queries.len()];
            attend(h, &queries, &keys, &values, pos, &mut out);
            for i in 0..t {
                let mut alone = vec![0.0; row];
                attend(
                    h,
                    &queries[i * row..][..row],
                    &keys,
                    &values,
                    pos + i,
                    &mut alone,
                );
                assert_eq!(alone, out[i * row..][..row], "row {i} alone");
            }
            let mut portable = vec![0.0; queries.len()];
            let mut scratch = Scratch::default();
            for i in 0..t {
                for kv_head in 0..kv_heads {
                    let item = Item {
                        h,
                        kv_head,
                        len: pos + i + 1,
                        scale: 1.0 / (head_dim as f32).sqrt(),
                    };
                    let heads = i * row + kv_head * group * head_dim
                        ..i * row + (kv_head + 1) * group * head_dim;
                    attend_item(
                        &item,
                        &queries[heads.clone()],
                        &keys,
                        &values,
                        &mut scratch,
                        &mut portable[heads],
                    );
                }
            }
            for (got, want) in [(&out, &expected), (&portable, &expected)] {
                for (a, b) in got.iter().zip(want.iter()) {
                    assert!((a - b).abs() < 1e-3, "head_dim {head_dim}: {a} vs {b}");
                }
            }
        }
    }
}
