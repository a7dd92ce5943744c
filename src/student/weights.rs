//! The student's weight matrices: read from the GGUF straight into the one buffer that is
//! kept (candle's reader copies each tensor once more, which for a large embedding table
//! adds its whole size to the peak), and multiplied in their quantized form.
//!
//! duet multiplies through candle's quantized dot products (`QuantizedType::matmul_t`)
//! rather than `QMatMul`: on AVX-512 machines `QMatMul` also keeps a re-tiled copy of
//! Q4_K/Q6_K/Q8_0 matrices beside the original, up to twice the weights' memory. Formats
//! with a kernel of duet's own (`kernels.rs`) are multiplied there instead.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use candle_core::backend::BackendStorage;
use candle_core::quantized::gguf_file::TensorInfo;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, BlockQ8_1, BlockQ8K, GgmlType,
};
use candle_core::quantized::{GgmlDType, QuantizedType};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

use super::kernels::{self, Format};

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

    /// `x @ self^T`: the last dimension of `x` (f32) must be `cols`.
    pub fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// Rows `ids`, dequantized to f32: a `(ids.len(), cols)` tensor.
    pub fn rows(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        match self.blocks.embedding(ids, self.rows, self.cols)? {
            CpuStorage::F32(values) => {
                Tensor::from_vec(values, (ids.len(), self.cols), &Device::Cpu)
            }
            other => candle_core::bail!("embedding rows came back as {:?}", other.dtype()),
        }
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

impl CustomOp1 for QuantMatrix {
    fn name(&self) -> &'static str {
        "duet-quant-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!(
                "quantized matmul takes f32 activations, got {:?}",
                storage.dtype()
            );
        };
        let shape = layout.shape();
        let k = shape.dims().last().copied().unwrap_or(0);
        if k != self.cols || !layout.is_contiguous() {
            candle_core::bail!(
                "activations {shape:?} do not fit a {}x{} matrix",
                self.rows,
                self.cols
            );
        }
        let lhs = &values[layout.start_offset()..layout.start_offset() + shape.elem_count()];
        let m = shape.elem_count() / k;
        let mut out = vec![0f32; m * self.rows];
        match self.kernel {
            Some(format) => kernels::matmul(format, self.raw(), (m, k, self.rows), lhs, &mut out),
            None => self.blocks.matmul_t((m, k, self.rows), lhs, &mut out)?,
        }
        let mut dims = shape.dims().to_vec();
        *dims.last_mut().expect("checked above") = self.rows;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
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

    /// Writes a GGUF holding one Q8_0 matrix, reads it back through `QuantMatrix`, and
    /// checks products and rows against candle's dequantized reference.
    #[test]
    fn matches_candles_dequantized_reference() {
        let (rows, cols) = (48, 64);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let dense = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&dense, GgmlDType::Q8_0).unwrap();
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

        let x = Tensor::from_vec(
            (0..2 * cols).map(|i| (i as f32).sin()).collect::<Vec<_>>(),
            (1, 2, cols),
            &Device::Cpu,
        )
        .unwrap();
        let ours = m
            .matmul(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let expected = x
            .broadcast_matmul(&reference.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Activations are quantized to 8 bits too, so allow 1% of each dot product's
        // absolute mass.
        let mass = x
            .abs()
            .unwrap()
            .broadcast_matmul(&reference.abs().unwrap().t().unwrap())
            .unwrap();
        let mass = mass.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for ((a, b), m) in ours.iter().zip(&expected).zip(&mass) {
            assert!((a - b).abs() <= 0.01 * m, "{a} vs {b} (mass {m})");
        }
        let row = m
            .rows(&[5])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let expected_row = reference.get(5).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(row, expected_row);
        assert_eq!(m.bytes(), rows * cols / 32 * 34);
    }
}
