//! Which GGUF type each tensor becomes, and quantizing rows into it on every core.
//!
//! `q4_k_m` follows llama.cpp's Q4_K_M choices, so a file duet writes matches what users know
//! from llama.cpp: Q4_K, with Q6_K for the output head (the embedding table when the head
//! shares it) and for the value and down projections of the layers that matter most (the
//! first and last eighth, and every third between). `q8_0` is Q8_0 throughout. Vectors
//! (norms, biases) stay F32. Rows that do not fill whole 256-value super-blocks fall back the
//! way llama.cpp's do: Q4_K to Q5_0, Q6_K to Q8_0.

use std::io::Write;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{BlockQ4K, BlockQ5_0, BlockQ6K, BlockQ8_0, GgmlType};

use crate::config::Quantization;
use crate::student::kernels::pool;

/// What a weight is, for choosing its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The output head, or the embedding table that doubles as it.
    Head,
    Embedding,
    /// Attention's value projection of layer `i` (of `n`).
    Value {
        i: usize,
        n: usize,
    },
    /// The feed-forward down projection of layer `i` (of `n`).
    Down {
        i: usize,
        n: usize,
    },
    OtherMatrix,
    Vector,
}

/// The type a tensor with rows of `cols` values and `role` is stored as.
pub fn tensor_type(quantization: Quantization, role: Role, cols: usize) -> GgmlDType {
    let wanted = match (quantization, role) {
        (_, Role::Vector) => return GgmlDType::F32,
        (Quantization::Q8_0, _) => GgmlDType::Q8_0,
        (Quantization::Q4KM, Role::Head) => GgmlDType::Q6K,
        (Quantization::Q4KM, Role::Value { i, n } | Role::Down { i, n }) if more_bits(i, n) => {
            GgmlDType::Q6K
        }
        (Quantization::Q4KM, _) => GgmlDType::Q4K,
    };
    if cols.is_multiple_of(wanted.block_size()) {
        return wanted;
    }
    match wanted {
        _ if !cols.is_multiple_of(32) => GgmlDType::F16,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        _ => GgmlDType::Q8_0,
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third
/// layer between.
fn more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// Quantizes `values` (whole rows of `cols`) to `dtype` on every core and writes the
/// blocks to `out`; returns the bytes written.
pub fn write_quantized(
    dtype: GgmlDType,
    values: &[f32],
    cols: usize,
    out: &mut impl Write,
) -> std::io::Result<usize> {
    match dtype {
        GgmlDType::F32 => {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            out.write_all(&bytes)?;
            Ok(bytes.len())
        }
        GgmlDType::F16 => {
            let bytes: Vec<u8> = values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect();
            out.write_all(&bytes)?;
            Ok(bytes.len())
        }
        GgmlDType::Q4K => blocks::<BlockQ4K>(values, cols, out),
        GgmlDType::Q5_0 => blocks::<BlockQ5_0>(values, cols, out),
        GgmlDType::Q6K => blocks::<BlockQ6K>(values, cols, out),
        GgmlDType::Q8_0 => blocks::<BlockQ8_0>(values, cols, out),
        other => Err(std::io::Error::other(format!(
            "duet does not quantize to {other:?}"
        ))),
    }
}

fn blocks<T: GgmlType + Send>(
    values: &[f32],
    cols: usize,
    out: &mut impl Write,
) -> std::io::Result<usize> {
    let per_row = cols / T::BLCK_SIZE;
    let rows = values.len() / cols;
    let mut quantized = vec![T::zeros(); rows * per_row];
    let base = quantized.as_mut_ptr() as usize;
    pool::for_each_range(rows, |range| {
        // SAFETY: `range` is this piece's alone, so the blocks of its rows are written by
        // no one else, and `quantized` outlives the pool's job.
        let ys: &mut [T] =
            unsafe { pool::item_slice(base, range.start * per_row, range.len() * per_row) };
        T::from_float(&values[range.start * cols..range.end * cols], ys);
    });
    // SAFETY: `quantized` is a live `Vec<T>` of plain-old-data GGUF blocks; its bytes are
    // exactly the file's layout (`read_blocks` in `model::weights` relies on the same).
    let bytes = unsafe {
        std::slice::from_raw_parts(
            quantized.as_ptr().cast::<u8>(),
            std::mem::size_of_val(quantized.as_slice()),
        )
    };
    out.write_all(bytes)?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_keeps_more_bits_where_llama_cpp_does() {
        let q = Quantization::Q4KM;
        assert_eq!(tensor_type(q, Role::Head, 2048), GgmlDType::Q6K);
        assert_eq!(tensor_type(q, Role::Embedding, 2048), GgmlDType::Q4K);
        assert_eq!(tensor_type(q, Role::OtherMatrix, 2048), GgmlDType::Q4K);
        assert_eq!(tensor_type(q, Role::Vector, 2048), GgmlDType::F32);
        let down: Vec<bool> = (0..24)
            .map(|i| tensor_type(q, Role::Down { i, n: 24 }, 4864) == GgmlDType::Q6K)
            .collect();
        // 24 layers: 0-2 and 21-23, then every third from layer 5.
        let expected: Vec<usize> = vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23];
        let got: Vec<usize> = (0..24).filter(|&i| down[i]).collect();
        assert_eq!(got, expected);
        // Rows that do not fill a 256-value super-block.
        assert_eq!(tensor_type(q, Role::OtherMatrix, 576), GgmlDType::Q5_0);
        assert_eq!(tensor_type(q, Role::Head, 576), GgmlDType::Q8_0);
        assert_eq!(
            tensor_type(Quantization::Q8_0, Role::Head, 576),
            GgmlDType::Q8_0
        );
    }

    #[test]
    fn quantized_rows_come_back_close() {
        let cols = 512;
        let values: Vec<f32> = (0..cols * 6)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        for (dtype, tolerance) in [
            (GgmlDType::Q8_0, 0.02),
            (GgmlDType::Q6K, 0.05),
            (GgmlDType::Q4K, 0.25),
            (GgmlDType::Q5_0, 0.15),
        ] {
            let mut bytes = Vec::new();
            let written = write_quantized(dtype, &values, cols, &mut bytes).unwrap();
            assert_eq!(
                written,
                values.len() / dtype.block_size() * dtype.type_size()
            );
            let tensor = candle_core::quantized::QTensor::new(
                candle_core::quantized::QStorage::from_data(
                    std::borrow::Cow::Borrowed(&bytes),
                    &candle_core::Device::Cpu,
                    dtype,
                )
                .unwrap(),
                (6, cols),
            )
            .unwrap();
            let back = tensor
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let worst = values
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < tolerance, "{dtype:?}: worst error {worst}");
        }
    }
}
