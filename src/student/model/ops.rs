//! The transformer's small per-row operations on plain `f32` rows: RMS normalisation, the
//! SwiGLU gate, residual adds and rotary position embeddings.
//!
//! Every function computes each row on its own, in a fixed order. That makes a row's result
//! independent of which other rows share the pass, so a prompt read in one pass, in chunks,
//! from a cached prefix or beside other sequences gives bit-identical logits: greedy answers
//! do not change with the prompt cache or with batching.

/// `out = x / sqrt(mean(x^2) + eps) * weight`, row by row (`weight.len()` values per row).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (row, out) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mean_square = sum_of_squares(row) / n as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
}

/// `x += y`.
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Adds `bias` to every row of `x`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add(row, bias);
    }
}

/// `gate = silu(gate) * up`: the SwiGLU feed-forward's gate.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// How a model's rotary embedding pairs the values of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Neighbours (2i, 2i+1): llama as llama.cpp's converter stores it.
    Interleaved,
    /// Halves (i, i + d/2): qwen2 ("neox" in llama.cpp).
    Halves,
}

/// Rotary tables: `cos`/`sin` of position x frequency, `head_dim / 2` per position.
pub struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    layout: RopeLayout,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32, positions: usize, layout: RopeLayout) -> Self {
        let half = head_dim / 2;
        let inverse: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in &inverse {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            cos,
            sin,
            half,
            layout,
        }
    }

    /// Positions the tables cover.
    pub fn positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates `rows` (each `heads` heads of `2 * half` values) for positions `pos, pos+1, ...`.
    pub fn apply(&self, rows: &mut [f32], heads: usize, pos: usize) {
        let head_dim = 2 * self.half;
        for (i, row) in rows.chunks_exact_mut(heads * head_dim).enumerate() {
            let at = (pos + i) * self.half;
            let (cos, sin) = (&self.cos[at..at + self.half], &self.sin[at..at + self.half]);
            for head in row.chunks_exact_mut(head_dim) {
                for j in 0..self.half {
                    let (a, b) = match self.layout {
                        RopeLayout::Interleaved => (2 * j, 2 * j + 1),
                        RopeLayout::Halves => (j, j + self.half),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos[j] - x1 * sin[j];
                    head[b] = x0 * sin[j] + x1 * cos[j];
                }
            }
        }
    }
}

/// Lanes the reductions below keep apart, so that they vectorize in a fixed order.
const LANES: usize = 16;

/// `sum(a * b)`, in `LANES` running sums.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn sum_of_squares(a: &[f32]) -> f32 {
    dot(a, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_scales_rows_to_unit_root_mean_square() {
        let x = [3.0, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let mut out = [0.0; 8];
        rms_norm(&x, &[1.0, 1.0, 2.0, 1.0], 0.0, &mut out);
        assert!((out[0] - 3.0 / 2.5).abs() < 1e-6 && (out[1] - 4.0 / 2.5).abs() < 1e-6);
        assert_eq!(&out[4..], &[1.0, 1.0, 2.0, 1.0]);
    }

    #[test]
    fn rope_rotates_the_pairs_of_each_layout_by_position() {
        // Position 1, one frequency (head_dim 2): rotation by 1 radian.
        for layout in [RopeLayout::Interleaved, RopeLayout::Halves] {
            let rope = Rope::new(2, 10_000.0, 4, layout);
            let mut row = [1.0, 0.0];
            rope.apply(&mut row, 1, 1);
            assert!((row[0] - 1f32.cos()).abs() < 1e-6 && (row[1] - 1f32.sin()).abs() < 1e-6);
        }
        // head_dim 4: interleaved pairs (0,1),(2,3); halves pair (0,2),(1,3).
        let mut inter = [1.0, 0.0, 0.0, 0.0];
        Rope::new(4, 10_000.0, 2, RopeLayout::Interleaved).apply(&mut inter, 1, 1);
        let mut halves = [1.0, 0.0, 0.0, 0.0];
        Rope::new(4, 10_000.0, 2, RopeLayout::Halves).apply(&mut halves, 1, 1);
        assert!(inter[1] > 0.8 && inter[2] == 0.0);
        assert!(halves[2] > 0.8 && halves[1] == 0.0);
    }

    #[test]
    fn dot_handles_tails() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let expected = (0..19).map(|i| (i * i) as f32).sum::<f32>();
        assert_eq!(dot(&a, &a), expected);
    }
}
