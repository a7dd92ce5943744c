//! How close duet's prompt (prefill) matrix products come to what this CPU can do.
//!
//! Prints the machine's int8 multiply-add peak, measured with a loop of independent
//! `vpdpbusd` instructions on every core, then times duet's kernels on every weight matrix of
//! one transformer layer of a GGUF, with as many prompt rows as one prefill pass reads, and
//! prints each product's rate and its share of that peak.
//!
//! ```text
//! cargo run --release --example prefill_peak -- models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf [ROWS]
//! ```
//!
//! ROWS (default: a prefill pass's) changes the number of rows: 1 is a decoding step.

use std::fs::File;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use duet::student::model::MAX_PREFILL_ROWS;
use duet::student::model::weights::QuantMatrix;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: prefill_peak MODEL.gguf [ROWS]")?;
    let threads = std::thread::available_parallelism()?.get();
    let peak = int8_peak(threads);
    println!(
        "int8 multiply-add peak on {threads} threads: {:.0} GOPS (2 ops per multiply-add)",
        peak / 1e9
    );

    let mut file = File::open(&path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut names: Vec<&String> = content
        .tensor_infos
        .keys()
        .filter(|n| n.starts_with("blk.0.") && n.ends_with(".weight"))
        .collect();
    names.sort();
    let m = match std::env::args().nth(2) {
        Some(rows) => rows.parse()?,
        None => MAX_PREFILL_ROWS,
    };
    println!("{m} rows against each matrix of layer 0 of {path}:");
    println!(
        "{:<24} {:>6} {:>12} {:>9} {:>8}",
        "matrix", "format", "k x n", "GOPS", "of peak"
    );
    let (mut total_ops, mut total_time) = (0f64, Duration::ZERO);
    for name in names {
        let info = &content.tensor_infos[name];
        if info.shape.dims().len() != 2 {
            continue;
        }
        let matrix = QuantMatrix::read(&mut file, info, content.tensor_data_offset)?;
        let (n, k) = info.shape.dims2()?;
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 50.0)
            .collect();
        let mut out = vec![0f32; m * n];
        matrix.matmul(&x, m, &mut out)?; // warm-up: caches and buffers
        // Repeated for at least half a second, so the pool's start and stop weigh little.
        let (mut rounds, start) = (0, Instant::now());
        while rounds < 3 || start.elapsed() < Duration::from_millis(500) {
            matrix.matmul(&x, m, &mut out)?;
            rounds += 1;
        }
        let time = start.elapsed() / rounds;
        let ops = 2.0 * (m * k * n) as f64;
        total_ops += ops;
        total_time += time;
        println!(
            "{:<24} {:>6} {:>12} {:>9.0} {:>7.0}%",
            name,
            format!("{:?}", info.ggml_dtype),
            format!("{k} x {n}"),
            ops / time.as_secs_f64() / 1e9,
            100.0 * ops / time.as_secs_f64() / peak
        );
    }
    let rate = total_ops / total_time.as_secs_f64();
    println!(
        "layer 0 in all: {:.0} GOPS, {:.0}% of the int8 peak",
        rate / 1e9,
        100.0 * rate / peak
    );
    Ok(())
}

/// Multiply-add operations per second (`vpdpbusd`: 64 byte products added into 16 lanes, 128
/// operations) of `threads` threads running independent chains of them.
fn int8_peak(threads: usize) -> f64 {
    const ROUNDS: u64 = 20_000_000;
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| dpbusd_loop(ROUNDS));
        }
    });
    let instructions = (threads as u64 * ROUNDS * CHAINS as u64) as f64;
    instructions * 128.0 / start.elapsed().as_secs_f64()
}

/// Independent accumulators: enough to cover the instruction's latency on current cores.
const CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
fn dpbusd_loop(rounds: u64) -> i32 {
    if !std::arch::is_x86_feature_detected!("avx512vnni") {
        panic!("this measures AVX-512 VNNI, which this CPU lacks");
    }
    // SAFETY: the CPU feature was checked just above.
    unsafe { dpbusd_chains(rounds) }
}

/// # Safety
/// The CPU must have AVX-512 F and VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dpbusd_chains(rounds: u64) -> i32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_epi8(std::hint::black_box(3));
    let b = _mm512_set1_epi8(std::hint::black_box(-2));
    let mut acc = [_mm512_setzero_si512(); CHAINS];
    for _ in 0..rounds {
        for acc in acc.iter_mut() {
            *acc = _mm512_dpbusd_epi32(*acc, a, b);
        }
    }
    let total = acc
        .iter()
        .fold(_mm512_setzero_si512(), |t, a| _mm512_add_epi32(t, *a));
    std::hint::black_box(_mm512_reduce_add_epi32(total))
}

#[cfg(not(target_arch = "x86_64"))]
fn dpbusd_loop(_: u64) -> i32 {
    panic!("this measures AVX-512 VNNI, an x86-64 instruction set")
}
