//! NF4 block-wise quantization of frozen weights (Dettmers et al. 2023, "QLoRA: Efficient
//! Finetuning of Quantized LLMs", §3): each block of 64 consecutive values is scaled by its
//! absolute maximum and every value is rounded to the nearest of the 16 NormalFloat-4 levels.
//! Storage: 4 bits per value (two per byte) plus one f32 absmax per block (0.5 + 4/64 =
//! 0.5625 bytes per parameter), or with double quantization the absmax values themselves in
//! 8 bits with one f32 scale per 256 blocks (0.5 + 1/64 + 4/16384 ≈ 0.516 bytes per parameter).
//!
//! vramcal's double quantization is symmetric 8-bit absmax (bitsandbytes uses an 8-bit float
//! code with a mean offset); its memory is the same, its rounding slightly coarser.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The 16 NF4 levels (QLoRA, Appendix E; bitsandbytes' `NF4` code table).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Values per absmax block.
pub const BLOCK: usize = 64;
/// Absmax blocks per second-level scale with double quantization.
pub const BLOCK2: usize = 256;

/// Per-block scales.
#[derive(Debug, Clone)]
enum Absmax {
    F32(Vec<f32>),
    Double { q: Vec<u8>, scales: Vec<f32> },
}

/// A weight matrix in NF4.
#[derive(Debug, Clone)]
pub struct Nf4Tensor {
    codes: Vec<u8>,
    absmax: Absmax,
    shape: Vec<usize>,
    n: usize,
}

fn nearest_level(x: f32) -> u8 {
    // Levels are sorted: pick the nearest by midpoints.
    let mut best = 0u8;
    let mut dist = f32::INFINITY;
    for (i, &l) in NF4_LEVELS.iter().enumerate() {
        let d = (x - l).abs();
        if d < dist {
            dist = d;
            best = i as u8;
        }
    }
    best
}

impl Nf4Tensor {
    /// Quantizes `values` (row-major, `shape`).
    ///
    /// # Errors
    /// [`Error::InvalidValue`] if `values` does not match `shape` or holds non-finite values.
    pub fn quantize(values: &[f32], shape: &[usize], double_quant: bool) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != values.len() {
            return Err(Error::invalid(
                "NF4 input",
                values.len(),
                format!("shape {shape:?} needs {n} values"),
            ));
        }
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            return Err(Error::invalid("NF4 input", v, "weights must be finite"));
        }
        let blocks = n.div_ceil(BLOCK);
        let mut absmax = Vec::with_capacity(blocks);
        let mut codes = vec![0u8; n.div_ceil(2)];
        for b in 0..blocks {
            let chunk = &values[b * BLOCK..((b + 1) * BLOCK).min(n)];
            let m = chunk.iter().fold(0f32, |a, &v| a.max(v.abs()));
            absmax.push(m);
        }
        let absmax = if double_quant {
            let groups = blocks.div_ceil(BLOCK2);
            let mut q = Vec::with_capacity(blocks);
            let mut scales = Vec::with_capacity(groups);
            for g in 0..groups {
                let group = &absmax[g * BLOCK2..((g + 1) * BLOCK2).min(blocks)];
                let s = group.iter().fold(0f32, |a, &v| a.max(v)) / 255.0;
                scales.push(s);
                q.extend(group.iter().map(|&v| {
                    if s > 0.0 {
                        (v / s).round().clamp(0.0, 255.0) as u8
                    } else {
                        0
                    }
                }));
            }
            Absmax::Double { q, scales }
        } else {
            Absmax::F32(absmax)
        };
        let mut t = Nf4Tensor {
            codes: Vec::new(),
            absmax,
            shape: shape.to_vec(),
            n,
        };
        for (i, &v) in values.iter().enumerate() {
            let m = t.block_absmax(i / BLOCK);
            let c = nearest_level(if m > 0.0 { v / m } else { 0.0 });
            codes[i / 2] |= if i % 2 == 0 { c } else { c << 4 };
        }
        t.codes = codes;
        Ok(t)
    }

    /// The (possibly dequantized) absmax of block `b`.
    fn block_absmax(&self, b: usize) -> f32 {
        match &self.absmax {
            Absmax::F32(v) => v[b],
            Absmax::Double { q, scales } => q[b] as f32 * scales[b / BLOCK2],
        }
    }

    /// Shape of the quantized matrix.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Bytes held (codes and scales).
    pub fn bytes(&self) -> u64 {
        let scales = match &self.absmax {
            Absmax::F32(v) => v.len() * 4,
            Absmax::Double { q, scales } => q.len() + scales.len() * 4,
        };
        (self.codes.len() + scales) as u64
    }

    /// Dequantized values, row-major f32.
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n);
        for b in 0..self.n.div_ceil(BLOCK) {
            let m = self.block_absmax(b);
            for i in b * BLOCK..((b + 1) * BLOCK).min(self.n) {
                let byte = self.codes[i / 2];
                let c = if i % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                out.push(NF4_LEVELS[c as usize] * m);
            }
        }
        out
    }

    /// Dequantizes into a tensor of `dtype` on `device` (a transient full-precision copy).
    ///
    /// # Errors
    /// [`Error::Candle`].
    pub fn dequantize(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = Tensor::from_vec(self.dequantize_f32(), self.shape.as_slice(), device)?;
        Ok(t.to_dtype(dtype)?)
    }

    /// Largest spacing between adjacent NF4 levels times the largest block absmax: no value
    /// is further than half of this from its dequantized value.
    pub fn max_rounding_error(&self) -> f32 {
        let gap = NF4_LEVELS
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0f32, f32::max);
        let m = (0..self.n.div_ceil(BLOCK))
            .map(|b| self.block_absmax(b))
            .fold(0f32, f32::max);
        gap * m / 2.0
    }
}
