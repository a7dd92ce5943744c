//! Writing a GGUF file (version 3) front to back: the header — metadata and the tensor
//! directory, whose offsets follow from each tensor's shape and type alone — then each
//! tensor's data as it is produced, so no tensor waits in memory for the others.

use std::io::{self, Seek, Write};

use candle_core::quantized::GgmlDType;

/// GGUF's default data alignment (`general.alignment`).
pub const ALIGNMENT: u64 = 32;

/// A metadata value, of the kinds duet writes.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strings(Vec<String>),
    I32s(Vec<i32>),
}

/// One tensor's entry in the directory.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    /// Rows then columns (or one length for a vector), as in safetensors; written
    /// innermost first, as GGUF wants.
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorEntry {
    pub fn bytes(&self) -> u64 {
        let elements: usize = self.shape.iter().product();
        (elements / self.dtype.block_size() * self.dtype.type_size()) as u64
    }
}

/// Writes the header for `metadata` and `tensors`; the data of each tensor must follow, in
/// the same order, each one padded with [`pad`].
pub fn write_header(
    out: &mut impl Write,
    metadata: &[(String, MetaValue)],
    tensors: &[TensorEntry],
) -> io::Result<()> {
    out.write_all(b"GGUF")?;
    out.write_all(&3u32.to_le_bytes())?;
    out.write_all(&(tensors.len() as u64).to_le_bytes())?;
    out.write_all(&(metadata.len() as u64).to_le_bytes())?;
    for (key, value) in metadata {
        write_string(out, key)?;
        write_value(out, value)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        write_string(out, &t.name)?;
        out.write_all(&(t.shape.len() as u32).to_le_bytes())?;
        for dim in t.shape.iter().rev() {
            out.write_all(&(*dim as u64).to_le_bytes())?;
        }
        out.write_all(&type_id(t.dtype).to_le_bytes())?;
        out.write_all(&offset.to_le_bytes())?;
        offset += t.bytes().next_multiple_of(ALIGNMENT);
    }
    Ok(())
}

/// Pads the file with zeros to the next aligned offset (after the header, after each tensor).
pub fn pad(out: &mut (impl Write + Seek)) -> io::Result<()> {
    let at = out.stream_position()?;
    let zeros = [0u8; ALIGNMENT as usize];
    out.write_all(&zeros[..(at.next_multiple_of(ALIGNMENT) - at) as usize])
}

fn write_string(out: &mut impl Write, s: &str) -> io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s.as_bytes())
}

fn write_value(out: &mut impl Write, value: &MetaValue) -> io::Result<()> {
    const U32: u32 = 4;
    const I32: u32 = 5;
    const F32: u32 = 6;
    const BOOL: u32 = 7;
    const STRING: u32 = 8;
    const ARRAY: u32 = 9;
    let array_header = |out: &mut dyn Write, item: u32, len: usize| -> io::Result<()> {
        out.write_all(&ARRAY.to_le_bytes())?;
        out.write_all(&item.to_le_bytes())?;
        out.write_all(&(len as u64).to_le_bytes())
    };
    match value {
        MetaValue::U32(v) => {
            out.write_all(&U32.to_le_bytes())?;
            out.write_all(&v.to_le_bytes())
        }
        MetaValue::I32(v) => {
            out.write_all(&I32.to_le_bytes())?;
            out.write_all(&v.to_le_bytes())
        }
        MetaValue::F32(v) => {
            out.write_all(&F32.to_le_bytes())?;
            out.write_all(&v.to_le_bytes())
        }
        MetaValue::Bool(v) => {
            out.write_all(&BOOL.to_le_bytes())?;
            out.write_all(&[u8::from(*v)])
        }
        MetaValue::Str(s) => {
            out.write_all(&STRING.to_le_bytes())?;
            write_string(out, s)
        }
        MetaValue::Strings(items) => {
            array_header(out, STRING, items.len())?;
            items.iter().try_for_each(|s| write_string(out, s))
        }
        MetaValue::I32s(items) => {
            array_header(out, I32, items.len())?;
            items
                .iter()
                .try_for_each(|v| out.write_all(&v.to_le_bytes()))
        }
    }
}

/// ggml's number for each type.
fn type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{Content, Value};

    #[test]
    fn candle_reads_back_what_is_written() {
        let tensors = vec![
            TensorEntry {
                name: "a".into(),
                shape: vec![3],
                dtype: GgmlDType::F32,
            },
            TensorEntry {
                name: "b".into(),
                shape: vec![2, 32],
                dtype: GgmlDType::Q8_0,
            },
        ];
        let metadata = vec![
            (
                "general.architecture".to_string(),
                MetaValue::Str("llama".into()),
            ),
            ("n".to_string(), MetaValue::U32(7)),
            ("f".to_string(), MetaValue::F32(0.5)),
            ("ok".to_string(), MetaValue::Bool(true)),
            (
                "words".to_string(),
                MetaValue::Strings(vec!["x".into(), "yz".into()]),
            ),
            ("ids".to_string(), MetaValue::I32s(vec![1, -2])),
        ];
        let mut file = std::io::Cursor::new(Vec::new());
        write_header(&mut file, &metadata, &tensors).unwrap();
        pad(&mut file).unwrap();
        file.write_all(&[0u8; 12]).unwrap();
        pad(&mut file).unwrap();
        file.write_all(&[0u8; 68]).unwrap();
        file.set_position(0);
        let content = Content::read(&mut file).unwrap();
        assert_eq!(content.metadata["n"].to_u32().unwrap(), 7);
        assert_eq!(content.metadata["f"].to_f32().unwrap(), 0.5);
        assert!(content.metadata["ok"].to_bool().unwrap());
        match &content.metadata["ids"] {
            Value::Array(v) => assert_eq!(v.len(), 2),
            other => panic!("{other:?}"),
        }
        let b = &content.tensor_infos["b"];
        assert_eq!(b.shape.dims(), &[2, 32]);
        assert_eq!(b.ggml_dtype, GgmlDType::Q8_0);
        assert_eq!(b.offset, 32);
        assert!(content.tensor_data_offset.is_multiple_of(ALIGNMENT));
    }
}
