use super::*;

/// SmolLM2's and Qwen2.5's groups (3 and 7 query heads per key/value head), heads of 128
/// values, and heads of 3 (the portable path only).
const LAYOUTS: [(usize, usize, usize); 4] = [(6, 2, 3), (9, 3, 64), (14, 2, 64), (6, 2, 128)];

fn heads((heads, kv_heads, head_dim): (usize, usize, usize)) -> Heads {
    Heads {
        heads,
        kv_heads,
        head_dim,
    }
}

/// Deterministic noise in `[-1, 1)`.
fn noise(i: usize, seed: u64) -> f32 {
    let mut x = (i as u64 ^ seed.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Queries, keys and values for `positions` cache positions and the last `t` of them as rows.
/// Keys grow with their position, so a row's maximum score keeps moving to later blocks and
/// its running sums get rescaled.
fn inputs(h: Heads, positions: usize, t: usize) -> (Vec<f32>, Vec<f16>, Vec<f16>) {
    let kv_row = h.kv_heads * h.head_dim;
    let queries = (0..t * h.heads * h.head_dim)
        .map(|i| 2.0 * noise(i, 1))
        .collect();
    let keys = (0..positions * kv_row)
        .map(|i| f16::from_f32(noise(i, 2) * (1.0 + (i / kv_row) as f32 / 100.0)))
        .collect();
    let values = (0..positions * kv_row)
        .map(|i| f16::from_f32(5.0 * noise(i, 3)))
        .collect();
    (queries, keys, values)
}

/// softmax(q k^T / sqrt(d)) v over positions `0..=own`, evaluated directly in f64.
fn direct(h: Heads, queries: &[f32], keys: &[f16], values: &[f16], pos: usize) -> Vec<f32> {
    let (hd, row, kv_row) = (h.head_dim, h.heads * h.head_dim, h.kv_heads * h.head_dim);
    let t = queries.len() / row;
    let mut out = vec![0.0; queries.len()];
    for i in 0..t {
        for head in 0..h.heads {
            let kv = head / (h.heads / h.kv_heads);
            let q = &queries[i * row + head * hd..][..hd];
            let len = pos + i + 1;
            let logits: Vec<f64> = (0..len)
                .map(|j| {
                    let key = &keys[j * kv_row + kv * hd..][..hd];
                    let dot: f64 = q.iter().zip(key).map(|(&a, b)| a as f64 * b.to_f64()).sum();
                    dot / (hd as f64).sqrt()
                })
                .collect();
            let max = logits.iter().fold(f64::NEG_INFINITY, |m, &l| m.max(l));
            let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let z: f64 = weights.iter().sum();
            for d in 0..hd {
                let sum: f64 = (0..len)
                    .map(|j| weights[j] * values[j * kv_row + kv * hd + d].to_f64())
                    .sum();
                out[i * row + head * hd + d] = (sum / z) as f32;
            }
        }
    }
    out
}

/// The kernels `attend` may run for heads of `head_dim` values on this CPU: the portable one
/// always (also compiled for AVX2), the AVX2 and AVX-512 ones where the CPU has them.
fn kernels(head_dim: usize) -> Vec<Kernel> {
    use crate::student::kernels::Tier;
    let mut kernels = vec![Kernel::Portable];
    if Tier::Avx2.available() {
        kernels.push(Kernel::PortableAvx2);
    }
    if matches!(head_dim, 64 | 128) {
        if Tier::Avx2.available() {
            kernels.push(Kernel::Avx2);
        }
        if Tier::Avx512.available() {
            kernels.push(Kernel::Avx512);
        }
    }
    kernels
}

/// Rows `pos..pos + t` through `attend_with`, handed only the cache up to the last row, as
/// the model hands it.
fn run(
    kernel: Kernel,
    h: Heads,
    all: &(Vec<f32>, Vec<f16>, Vec<f16>),
    pos: usize,
    rows: std::ops::Range<usize>,
) -> Vec<f32> {
    let (row, kv_row) = (h.heads * h.head_dim, h.kv_heads * h.head_dim);
    let (queries, keys, values) = all;
    let queries = &queries[rows.start * row..rows.end * row];
    let cache = (pos + rows.end) * kv_row;
    let mut out = vec![0.0; queries.len()];
    attend_with(
        kernel,
        h,
        queries,
        &keys[..cache],
        &values[..cache],
        pos + rows.start,
        &mut out,
    );
    out
}

/// Both kernels against the direct evaluation, for rows that cross several key blocks and
/// query blocks, from the start of the sequence and after a cached prefix.
#[test]
fn matches_a_direct_evaluation() {
    for layout in LAYOUTS {
        let h = heads(layout);
        for (pos, t) in [(5, 3), (0, 1), (0, 300), (45, 259)] {
            let all = inputs(h, pos + t, t);
            let expected = direct(h, &all.0, &all.1, &all.2, pos);
            for kernel in kernels(h.head_dim) {
                let got = run(kernel, h, &all, pos, 0..t);
                for (i, (a, b)) in got.iter().zip(&expected).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-3,
                        "{layout:?} pos {pos} t {t} {kernel:?}: value {i}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

/// A row's result does not depend on the rows beside it: rows read in two calls (the second
/// resuming at the split), or one alone as while decoding, give the bits of one call for all.
#[test]
fn rows_alone_or_together_give_the_same_bits() {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for layout in LAYOUTS {
        let h = heads(layout);
        let row = h.heads * h.head_dim;
        for pos in [0, 45] {
            let t = 300;
            let all = inputs(h, pos + t, t);
            for kernel in kernels(h.head_dim) {
                let together = bits(&run(kernel, h, &all, pos, 0..t));
                for split in [1, 16, 37, 64, 100, 211, 299] {
                    let mut parts = run(kernel, h, &all, pos, 0..split);
                    parts.extend(run(kernel, h, &all, pos, split..t));
                    assert!(
                        bits(&parts) == together,
                        "{layout:?} pos {pos} split {split}"
                    );
                }
                for i in [0, 1, 18, 19, 63, 64, 65, 127, 128, 200, 299] {
                    let alone = bits(&run(kernel, h, &all, pos, i..i + 1));
                    assert!(
                        alone == together[i * row..][..row],
                        "{layout:?} pos {pos} row {i}"
                    );
                }
            }
        }
    }
}

/// The vectorised `exp` against `f32::exp`: within 2 ulp from the smallest subnormal to the
/// largest finite result, exactly 1 at 0, 0 at -inf and below, infinite above.
#[cfg(target_arch = "x86_64")]
#[test]
fn vector_exp_matches_f32_exp() {
    use std::arch::x86_64::*;
    if !crate::student::kernels::avx512_in_use() {
        return;
    }
    let exp = |x: f32| {
        // SAFETY: the CPU has AVX-512 F (checked above).
        unsafe { _mm512_cvtss_f32(tiled_x86::exp(_mm512_set1_ps(x))) }
    };
    let mut worst = 0;
    for i in 0..=2_000_000 {
        let x = -110.0 + 200.0 * i as f32 / 2e6;
        let (got, want) = (exp(x), x.exp());
        if want.is_infinite() {
            assert!(got.is_infinite(), "exp({x}) = {got}");
            continue;
        }
        let ulps = got.to_bits().abs_diff(want.to_bits());
        assert!(ulps <= 2, "exp({x}) = {got}, not {want}");
        worst = worst.max(ulps);
    }
    assert!(
        worst >= 1,
        "the sweep reached results that round differently"
    );
    assert_eq!(exp(0.0), 1.0);
    assert_eq!(exp(-0.0), 1.0);
    for x in [f32::NEG_INFINITY, -1e30, -200.0, -104.0] {
        assert_eq!(exp(x).to_bits(), 0f32.to_bits(), "exp({x})");
    }
    assert_eq!(exp(f32::INFINITY), f32::INFINITY);
    assert!(exp(f32::NAN).is_nan());
}

/// Wall-clock seconds of one layer's attention for a 3,500-token prompt at Qwen2.5-0.5B's
/// geometry and SmolLM2's: all rows in one call, in the 256-row passes the model makes, and
/// one row decoded after 300 and after 3,500 positions:
/// `cargo test --release --lib attention::tests::timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing() {
    let t = 3500;
    for layout in [(14, 2, 64), (9, 3, 64)] {
        let h = heads(layout);
        let row = h.heads * h.head_dim;
        let (queries, keys, values) = inputs(h, t, t);
        let cache = |positions: usize| positions * h.kv_heads * h.head_dim;
        let mut out = vec![0.0; queries.len()];
        let best = |runs: usize, f: &mut dyn FnMut()| {
            (0..5)
                .map(|_| {
                    let start = std::time::Instant::now();
                    (0..runs).for_each(|_| f());
                    start.elapsed().as_secs_f64() / runs as f64
                })
                .fold(f64::INFINITY, f64::min)
        };
        let once = best(1, &mut || attend(h, &queries, &keys, &values, 0, &mut out));
        let passes = best(1, &mut || {
            for pos in (0..t).step_by(256) {
                let end = t.min(pos + 256);
                let (q, o) = (
                    &queries[pos * row..end * row],
                    &mut out[pos * row..end * row],
                );
                attend(h, q, &keys[..cache(end)], &values[..cache(end)], pos, o);
            }
        });
        let mut decode = |pos: usize| {
            let q = &queries[pos * row..][..row];
            let (k, v) = (&keys[..cache(pos + 1)], &values[..cache(pos + 1)]);
            1e6 * best(200, &mut || attend(h, q, k, v, pos, &mut out[..row]))
        };
        let (short, long) = (decode(299), decode(t - 1));
        println!(
            "{layout:?}: {t} rows in one call {once:.4}s, in 256-row passes {passes:.4}s; \
             one row after 300 {short:.1}us, after {t} {long:.1}us"
        );
    }
}

/// The portable path's `exp` against the library's, and exactly 1 and 0 where masking needs.
#[test]
fn portable_exp_is_close_to_the_librarys() {
    let mut xs: Vec<f32> = (0..20_000).map(|i| -104.0 + i as f32 * 0.0096).collect();
    xs.extend([0.0, f32::NEG_INFINITY, -200.0, -87.5, -0.5, 1e-7]);
    let mut ours = xs.clone();
    super::exp_in_place(&mut ours);
    for (&x, &e) in xs.iter().zip(&ours) {
        let want = x.exp();
        assert!(
            (e - want).abs() <= want * 2e-7 || (e - want).abs() < 1e-44,
            "exp({x}) = {e}, not {want}"
        );
    }
    assert_eq!(ours[20_000], 1.0);
    assert_eq!(ours[20_001], 0.0);
    assert_eq!(ours[20_002], 0.0);
}

/// The AVX2 kernel's `exp` gives the portable one's bits, lane for lane.
#[test]
#[cfg(target_arch = "x86_64")]
fn avx2_exp_gives_the_portable_bits() {
    use std::arch::x86_64::*;
    if !crate::student::kernels::Tier::Avx2.available() {
        eprintln!("skipped: this CPU has no AVX2");
        return;
    }
    let mut xs: Vec<f32> = (0..40_000).map(|i| -110.0 + i as f32 * 0.005).collect();
    xs.extend([0.0, -0.0, f32::NEG_INFINITY, -200.0, 1e-7, 88.0, -104.0]);
    while !xs.len().is_multiple_of(8) {
        xs.push(0.5);
    }
    let mut portable = xs.clone();
    super::exp_in_place(&mut portable);
    for (x, want) in xs.chunks_exact(8).zip(portable.chunks_exact(8)) {
        let mut got = [0f32; 8];
        // SAFETY: AVX2 and FMA were checked above; 8 floats are loaded and stored.
        unsafe {
            let v = super::tiled_avx2::exp(_mm256_loadu_ps(x.as_ptr()));
            _mm256_storeu_ps(got.as_mut_ptr(), v);
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(want), "exp of {x:?}");
    }
}
