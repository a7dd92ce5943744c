//! The student's weight matrices: read from the GGUF straight into the one buffer that is
//! kept (candle's reader copies each tensor once more, which for a large embedding table
//! adds its whole size to the peak), and multiplied in their quantized form.
//!
//! Formats with a kernel of duet's own (`student/kernels/`) are multiplied there, straight
//! from the GGUF's blocks; the rest through candle's quantized dot products
//! (`QuantizedType::matmul_t`), never `QMatMul`, which on AVX-512 machines keeps a re-tiled
//! copy of Q4_K/Q6_K/Q8_0 matrices beside the original, up to twice the weights' memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use candle_core::CpuStorage;
use candle_core::backend::BackendStorage;
use candle_core::quantized::gguf_file::TensorInfo;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, BlockQ8_1, BlockQ8K, GgmlType,
};
use candle_core::quantized::{GgmlDType, QuantizedType};

use crate::student::kernels::{self, Format};

/// A `rows x cols` matrix kept in its GGUF block format.
pub struct QuantMatrix {
    blocks: Box<dyn QuantizedType>,
    /// Set when duet's own kernel multiplies this format on this CPU.
    kernel: Option<Format>,
    rows: usize,
    cols: usize,
}

impl QuantMatrix {
    /// Reads the 2-D tensor `info` describes; tensor data begins at `data_offset`.
    pub fn read(file: &mut File, info: &TensorInfo, data_offset: u64) -> candle_core::Result<Self> {
        let (rows, cols) = info.shape.dims2()?;
        let dtype = info.ggml_dtype;
        if !cols.is_multiple_of(dtype.block_size()) {
            candle_core::bail!("rows of {cols} values do not fill whole {dtype:?} blocks");
        }
        let count = rows * cols / dtype.block_size();
        let start = data_offset + info.offset;
        if start + (count * dtype.type_size()) as u64 > file.metadata()?.len() {
            candle_core::bail!("tensor data runs past the end of the file");
        }
        file.seek(SeekFrom::Start(start))?;
        let blocks = match dtype {
            GgmlDType::F32 => read_blocks::<f32>(file, count)?,
            GgmlDType::F16 => read_blocks::<half::f16>(file, count)?,
            GgmlDType::BF16 => read_blocks::<half::bf16>(file, count)?,
            GgmlDType::Q4_0 => read_blocks::<BlockQ4_0>(file, count)?,
            GgmlDType::Q4_1 => read_blocks::<BlockQ4_1>(file, count)?,
            GgmlDType::Q5_0 => read_blocks::<BlockQ5_0>(file, count)?,
            GgmlDType::Q5_1 => read_blocks::<BlockQ5_1>(file, count)?,
            GgmlDType::Q8_0 => read_blocks::<BlockQ8_0>(file, count)?,
            GgmlDType::Q8_1 => read_blocks::<BlockQ8_1>(file, count)?,
            GgmlDType::Q2K => read_blocks::<BlockQ2K>(file, count)?,
            GgmlDType::Q3K => read_blocks::<BlockQ3K>(file, count)?,
            GgmlDType::Q4K => read_blocks::<BlockQ4K>(file, count)?,
            GgmlDType::Q5K => read_blocks::<BlockQ5K>(file, count)?,
            GgmlDType::Q6K => read_blocks::<BlockQ6K>(file, count)?,
            GgmlDType::Q8K => read_blocks::<BlockQ8K>(file, count)?,
        };
        Ok(Self {
            blocks,
            kernel: Format::for_dtype(dtype),
            rows,
            cols,
        })
    }

    /// `out = x @ self^T` for `m` rows of `cols` values; `out` holds `m * rows` values.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> candle_core::Result<()> {
        if x.len() != m * self.cols || out.len() != m * self.rows {
            candle_core::bail!(
                "{m} rows of {} activations do not fit a {}x{} matrix",
                x.len() / m.max(1),
                self.rows,
                self.cols
            );
        }
        let mkn = (m, self.cols, self.rows);
        match self.kernel {
            Some(format) => kernels::matmul(format, self.raw(), mkn, x, out),
            None => self.blocks.matmul_t(mkn, x, out)?,
        }
        Ok(())
    }

    /// Rows `ids`, dequantized: `ids.len() * cols` values into `out`.
    pub fn rows(&self, ids: &[u32], out: &mut Vec<f32>) -> candle_core::Result<()> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.rows) {
            candle_core::bail!("token {bad} is outside a table of {} rows", self.rows);
        }
        match self.blocks.embedding(ids, self.rows, self.cols)? {
            CpuStorage::F32(values) => *out = values,
            other => candle_core::bail!("embedding rows came back as {:?}", other.dtype()),
        }
        Ok(())
    }

    /// Values per row of the product (the matrix's rows).
    pub fn out_features(&self) -> usize {
        self.rows
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.blocks.storage_size_in_bytes()
    }

    /// The blocks as the GGUF stores them.
    fn raw(&self) -> &[u8] {
        // SAFETY: `as_ptr` points at the `Vec` of blocks, `storage_size_in_bytes` long, which
        // lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr(), self.bytes()) }
    }
}

/// `count` blocks of `T` read directly into a `Vec<T>`.
fn read_blocks<T: GgmlType + Send + Sync + 'static>(
    file: &mut File,
    count: usize,
) -> std::io::Result<Box<dyn QuantizedType>> {
    assert_eq!(
        std::mem::size_of::<T>(),
        T::DTYPE.type_size(),
        "GGUF block layout"
    );
    let bytes = count * std::mem::size_of::<T>();
    let mut blocks: Vec<T> = Vec::with_capacity(count);
    // SAFETY: the block types are `repr(C)` structs of integers and half floats (or plain
    // floats), for which every bit pattern is valid; the buffer is zeroed before it is
    // viewed as bytes and fully written by `read_exact` before the length is set.
    unsafe {
        std::ptr::write_bytes(blocks.as_mut_ptr(), 0, count);
        let buf = std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast::<u8>(), bytes);
        file.read_exact(buf)?;
        blocks.set_len(count);
    }
    Ok(Box::new(blocks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{QTensor, gguf_file};
    use candle_core::{Device, Tensor};

    /// Writes a GGUF holding one matrix, reads it back through `QuantMatrix`, and checks
    /// products and rows against candle's dequantized reference: Q8_0 goes through duet's
    /// kernel (on CPUs that have it), Q4_K through candle's.
    #[test]
    fn matches_candles_dequantized_reference() {
        let (rows, cols) = (48, 256);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let dense = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            let q = QTensor::quantize(&dense, dtype).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.gguf");
            let mut out = File::create(&path).unwrap();
            gguf_file::write(&mut out, &[], &[("w", &q)]).unwrap();
            drop(out);

            let mut file = File::open(&path).unwrap();
            let content = gguf_file::Content::read(&mut file).unwrap();
            let m = QuantMatrix::read(
                &mut file,
                &content.tensor_infos["w"],
                content.tensor_data_offset,
            )
            .unwrap();
            let reference = q.dequantize(&Device::Cpu).unwrap();

            let x: Vec<f32> = (0..2 * cols).map(|i| (i as f32).sin() + 0.2).collect();
            let mut ours = vec![0f32; 2 * rows];
            m.matmul(&x, 2, &mut ours).unwrap();
            let xt = Tensor::from_vec(x, (2, cols), &Device::Cpu).unwrap();
            let expected = xt.matmul(&reference.t().unwrap()).unwrap();
            let expected = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // Activations are quantized to 8 bits too, so allow 1% of each dot product's
            // absolute mass.
            let mass = xt
                .abs()
                .unwrap()
                .matmul(&reference.abs().unwrap().t().unwrap())
                .unwrap();
            let mass = mass.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for ((a, b), m) in ours.iter().zip(&expected).zip(&mass) {
                assert!(
                    (a - b).abs() <= 0.01 * m,
                    "{dtype:?}: {a} vs {b} (mass {m})"
                );
            }
            let mut row = Vec::new();
            m.rows(&[5], &mut row).unwrap();
            let expected_row = reference.get(5).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(row, expected_row);
            assert!(
                m.rows(&[rows as u32], &mut row).is_err(),
                "a token outside the table"
            );
            assert!(
                m.matmul(&[0.0; 3], 1, &mut [0.0; 48]).is_err(),
                "a wrong width"
            );
        }
    }
}
