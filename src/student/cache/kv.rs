//! One sequence's key/value cache: per layer, the keys and the values of every position,
//! token-major (`[position][kv_head][head_dim]`), sized once for what the sequence was
//! admitted for (prompt plus `max_tokens`) and written in place, so no token reallocates or
//! copies it. Zeroed allocations are lazily backed by the kernel: positions a sequence never
//! reaches never become resident memory.
//!
//! Values are stored as f16, as llama.cpp does by default: half the memory of f32, and half
//! the bytes each generated token reads back, which is what slows decoding as the context
//! grows.

use half::f16;
use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;

pub struct KvCache {
    /// Per layer: (keys, values), each `capacity * row` values.
    layers: Vec<(Vec<f16>, Vec<f16>)>,
    layer_count: usize,
    /// Floats per position in one layer's keys (or values): kv_heads * head_dim.
    row: usize,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for `layer_count` layers of `row` floats per position (key/value heads
    /// times head size); nothing is allocated until [`resize`](Self::resize).
    pub fn new(layer_count: usize, row: usize) -> Self {
        Self {
            layers: Vec::new(),
            layer_count,
            row,
            len: 0,
            capacity: 0,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions that fit without reallocating.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position after the first `len` (a reused prefix keeps its entries).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes room for `positions` in all, keeping what is held. Reallocates (and copies) only
    /// when the capacity is too small or, with `exact`, when it differs.
    pub fn resize(&mut self, positions: usize, exact: bool) {
        if positions <= self.capacity && !(exact && positions != self.capacity) {
            return;
        }
        let keep = self.len.min(positions) * self.row;
        let fresh = |old: Option<&Vec<f16>>| {
            // A zeroed allocation (u16 zeros, which the allocator hands out as fresh pages;
            // f16::ZERO would be written element by element): pages never written cost nothing.
            let mut buffer: Vec<f16> = vec![0u16; positions * self.row].reinterpret_into();
            if let Some(old) = old {
                buffer[..keep].copy_from_slice(&old[..keep]);
            }
            buffer
        };
        self.layers = (0..self.layer_count)
            .map(|i| {
                let old = self.layers.get(i);
                (fresh(old.map(|kv| &kv.0)), fresh(old.map(|kv| &kv.1)))
            })
            .collect();
        self.capacity = positions;
        self.len = self.len.min(positions);
    }

    /// Stores keys and values (`rows` positions of `row` floats each) from position `pos` of
    /// `layer`.
    pub fn write(&mut self, layer: usize, pos: usize, keys: &[f32], values: &[f32]) {
        let (k, v) = &mut self.layers[layer];
        let start = pos * self.row;
        k[start..start + keys.len()].convert_from_f32_slice(keys);
        v[start..start + values.len()].convert_from_f32_slice(values);
    }

    /// Keys and values of `layer`'s first `positions` positions.
    pub fn layer(&self, layer: usize, positions: usize) -> (&[f16], &[f16]) {
        let (k, v) = &self.layers[layer];
        let n = positions * self.row;
        (&k[..n], &v[..n])
    }

    /// Records that `positions` more positions were written.
    pub fn advance(&mut self, positions: usize) {
        self.len += positions;
        debug_assert!(self.len <= self.capacity);
    }

    /// Pretends to hold `len` positions, for tests of what holds caches.
    #[cfg(test)]
    pub fn set_len_for_tests(&mut self, len: usize) {
        assert!(len <= self.capacity);
        self.len = len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growing_keeps_what_is_held_and_truncating_forgets_the_rest() {
        // 2 layers, one key/value head of 2 values per position.
        let mut c = KvCache::new(2, 2);
        c.resize(2, false);
        c.write(1, 0, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0]);
        c.advance(2);
        c.resize(5, false);
        assert_eq!(c.capacity(), 5);
        let (k, v) = c.layer(1, 2);
        assert_eq!(k.to_f32_vec(), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(v.to_f32_vec(), [5.0, 6.0, 7.0, 8.0]);
        c.truncate(1);
        c.resize(1, true);
        assert_eq!((c.len(), c.capacity()), (1, 1));
        assert_eq!(c.layer(1, 1).0.to_f32_vec(), [1.0, 2.0]);
    }
}
