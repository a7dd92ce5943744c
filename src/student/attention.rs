//! Causal grouped-query attention of a sequence's new rows against its key/value cache,
//! straight over the cache's buffers: no copies of keys, no mask tensor, one work item per
//! (row, head) on candle's CPU thread pool. Each row is computed alone, in a fixed order
//! (see `ops.rs` on why that matters).

use super::ops::dot;

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
pub fn attend(
    h: Heads,
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    pos: usize,
    out: &mut [f32],
) {
    let row = h.heads * h.head_dim;
    let kv_row = h.kv_heads * h.head_dim;
    let t = queries.len() / row;
    let group = h.heads / h.kv_heads;
    let scale = 1.0 / (h.head_dim as f32).sqrt();
    let out_addr = out.as_mut_ptr() as usize;

    thread_local! {
        static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    candle_core::utils::barrier_pool().execute_chunked(t * h.heads, |items| {
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            for item in items {
                let (i, head) = (item / h.heads, item % h.heads);
                let kv_head = head / group;
                let len = pos + i + 1;
                let q = &queries[i * row + head * h.head_dim..][..h.head_dim];
                scores.clear();
                scores.extend((0..len).map(|j| {
                    dot(q, &keys[j * kv_row + kv_head * h.head_dim..][..h.head_dim]) * scale
                }));
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let mut total = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    total += *s;
                }
                // SAFETY: every (row, head) slice of `out` belongs to exactly one item, and
                // `out` outlives `execute_chunked`, which returns when all items are done.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(
                        (out_addr as *mut f32).add(i * row + head * h.head_dim),
                        h.head_dim,
                    )
                };
                o.fill(0.0);
                for (j, &p) in scores.iter().enumerate() {
                    let v = &values[j * kv_row + kv_head * h.head_dim..][..h.head_dim];
                    let w = p / total;
                    for (a, &b) in o.iter_mut().zip(v) {
                        *a += w * b;
                    }
                }
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a direct evaluation of softmax(q k^T / sqrt(d)) v with the causal limit, for
    /// two query heads sharing one key/value head.
    #[test]
    fn matches_a_direct_evaluation() {
        let h = Heads {
            heads: 2,
            kv_heads: 1,
            head_dim: 3,
        };
        let (pos, t) = (2, 2);
        let keys: Vec<f32> = (0..(pos + t) * 3)
            .map(|i| ((i * 5 % 7) as f32) / 7.0)
            .collect();
        let values: Vec<f32> = (0..(pos + t) * 3).map(|i| i as f32).collect();
        let queries: Vec<f32> = (0..t * 6).map(|i| (i as f32 * 0.3).cos()).collect();
        let mut out = vec![0.0; t * 6];
        attend(h, &queries, &keys, &values, pos, &mut out);
        for i in 0..t {
            for head in 0..2 {
                let q = &queries[i * 6 + head * 3..][..3];
                let len = pos + i + 1;
                let logits: Vec<f32> = (0..len)
                    .map(|j| (0..3).map(|d| q[d] * keys[j * 3 + d]).sum::<f32>() / 3f32.sqrt())
                    .collect();
                let z: f32 = logits.iter().map(|l| l.exp()).sum();
                for d in 0..3 {
                    let expected: f32 = (0..len)
                        .map(|j| logits[j].exp() / z * values[j * 3 + d])
                        .sum();
                    let got = out[i * 6 + head * 3 + d];
                    assert!((got - expected).abs() < 1e-4, "{got} vs {expected}");
                }
            }
        }
    }
}
