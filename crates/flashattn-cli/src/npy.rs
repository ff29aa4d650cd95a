//! Reading and writing NumPy .npy files: f32 out, f32/f16/f64 (and i32/i64 offsets) in.

use half::f16;
use npyz::{TypeChar, WriterBuilder};
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

/// A float array read from disk, converted to f32, with the element type it was stored in.
pub struct Array {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
    pub stored_as: &'static str,
}

fn open(path: &Path) -> Result<npyz::NpyFile<std::io::BufReader<File>>, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let npy = npyz::NpyFile::new(std::io::BufReader::new(file))
        .map_err(|e| format!("{}: not a readable .npy file: {e}", path.display()))?;
    if npy.order() != npyz::Order::C {
        return Err(format!("{}: Fortran-ordered arrays are not supported; save a C-contiguous array", path.display()));
    }
    Ok(npy)
}

fn type_of(npy: &npyz::NpyFile<std::io::BufReader<File>>) -> Option<(TypeChar, u64)> {
    match npy.dtype() {
        npyz::DType::Plain(t) => Some((t.type_char(), t.size_field())),
        _ => None,
    }
}

/// Reads a float array (f32, f16 or f64) as f32.
pub fn read_floats(path: &Path) -> Result<Array, String> {
    let npy = open(path)?;
    let shape = npy.shape().iter().map(|&n| n as usize).collect();
    let bad = |e: std::io::Error| format!("{}: {e}", path.display());
    let (data, stored_as) = match type_of(&npy) {
        Some((TypeChar::Float, 4)) => (npy.into_vec::<f32>().map_err(bad)?, "f32"),
        Some((TypeChar::Float, 2)) => {
            (npy.into_vec::<f16>().map_err(bad)?.into_iter().map(f16::to_f32).collect(), "f16")
        }
        Some((TypeChar::Float, 8)) => {
            (npy.into_vec::<f64>().map_err(bad)?.into_iter().map(|x| x as f32).collect(), "f64")
        }
        _ => {
            return Err(format!(
                "{}: expected a float32, float16 or float64 array, got dtype {}",
                path.display(),
                npy.dtype().descr()
            ))
        }
    };
    Ok(Array { data, shape, stored_as })
}

/// Reads a 1-D integer array (int32 or int64) of sequence offsets.
pub fn read_offsets(path: &Path) -> Result<Vec<i32>, String> {
    let npy = open(path)?;
    if npy.shape().len() != 1 {
        return Err(format!("{}: expected a 1-D array of offsets, got shape {:?}", path.display(), npy.shape()));
    }
    let bad = |e: std::io::Error| format!("{}: {e}", path.display());
    match type_of(&npy) {
        Some((TypeChar::Int, 4)) => npy.into_vec::<i32>().map_err(bad),
        Some((TypeChar::Int, 8)) => npy
            .into_vec::<i64>()
            .map_err(bad)?
            .into_iter()
            .map(|x| i32::try_from(x).map_err(|_| format!("{}: offset {x} does not fit in int32", path.display())))
            .collect(),
        _ => Err(format!("{}: expected an int32 or int64 array, got dtype {}", path.display(), npy.dtype().descr())),
    }
}

/// Writes an f32 array of the given shape.
pub fn write_f32(path: &Path, data: &[f32], shape: &[usize]) -> Result<(), String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let file = File::create(path).map_err(err)?;
    let shape: Vec<u64> = shape.iter().map(|&n| n as u64).collect();
    let mut w =
        npyz::WriteOptions::new().default_dtype().shape(&shape).writer(BufWriter::new(file)).begin_nd().map_err(err)?;
    w.extend(data.iter().copied()).map_err(err)?;
    w.finish().map_err(err)
}
