//! 8-bit AdamW with blockwise quantized states, as bitsandbytes' `AdamW8bit` (HF
//! `optim=adamw_bnb_8bit`) keeps and updates them (Dettmers et al. 2022, "8-bit Optimizers via
//! Block-wise Quantization"; bitsandbytes 0.50 `optim/optimizer.py` `Optimizer2State`,
//! `functional.py` `create_dynamic_map`, `backends/cpu/ops.py`
//! `_optimizer_update_8bit_blockwise_cpu` and `backends/default/ops.py` `quantize_blockwise`).
//!
//! Memory, exact: for a parameter of `n ≥ 4096` elements (`min_8bit_size`), each moment is `n`
//! one-byte codes plus one f32 absolute maximum per block of 256 values; smaller parameters
//! keep f32 moments. Allocated at the first step.
//!
//! Update, per block of 256 values, in f32: dequantize `m = map₁[code]·absmax`, `v =
//! map₂[code]·absmax` (map₁ the signed dynamic map, map₂ the unsigned one); AdamW's update
//! (`m ← β1·m + (1 − β1)·g`, `v ← β2·v + (1 − β2)·g²`, `p ← p·(1 − lr·λ) − (lr / bc1)·m /
//! (√v / √bc2 + ε)`) from those unquantized values; then each moment's new absmax is its
//! block's largest magnitude and each value is stored as the nearest map entry of
//! `clamp(x / absmax, −1, 1)` (bitsandbytes' `bucketize` over the midpoints). The parameter
//! is stepped from the unrounded moments, as bitsandbytes does.
//!
//! On the CPU it updates in place (no temporary beyond two 256-value blocks); other devices run
//! the same arithmetic with candle operations over chunks of 64 blocks (checked against the
//! CPU loop on the CPU; not yet run on a GPU).

use candle_core::{CpuStorage, DType, Tensor, Var};

use super::host::{eligible, update_from, with_mut, Floats, FloatsMut};
use crate::error::Result;
use crate::spec::AdamWConfig;

/// Values per quantization block.
pub const BLOCK: usize = 256;
/// Parameters with fewer elements keep f32 moments (`min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// torch's float32 `linspace(start, end, steps)` as its CPU kernel computes it (from the start
/// below half-way, from the end above, each value one fused multiply-add: aten
/// `RangeFactoriesKernel.cpp`, `linspace_kernel`; checked value for value against torch 2.15).
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// bitsandbytes' dynamic quantization map (`create_dynamic_map(signed, 7, 8)`): 256 sorted
/// f32 values in `[-1, 1]` (signed) or `[0, 1]`, dense near zero.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    // bitsandbytes multiplies the f32 tensor of means by a Python float: f32 arithmetic.
    let mut out: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = if signed {
            (1 << i) + 1
        } else {
            (1 << (i + 1)) + 1
        };
        let b = linspace(0.1, 1.0, items);
        let scale = 10f64.powi(-6 + i) as f32;
        for w in b.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            out.push(scale * mean);
            if signed {
                out.push(-scale * mean);
            }
        }
    }
    out.push(0.0);
    out.push(1.0);
    out.resize(256, 0.0);
    out.sort_by(f32::total_cmp);
    out.try_into().expect("256 values")
}

/// A quantization map and the midpoints between its neighbours.
struct Map {
    values: [f32; 256],
    bounds: [f32; 255],
}

impl Map {
    fn new(signed: bool) -> Self {
        let values = dynamic_map(signed);
        let mut bounds = [0f32; 255];
        for (k, b) in bounds.iter_mut().enumerate() {
            *b = (values[k] + values[k + 1]) / 2.0;
        }
        Map { values, bounds }
    }

    /// The code of `x` ∈ [−1, 1]: the number of midpoints below it (`torch.bucketize`).
    #[inline]
    fn code(&self, x: f32) -> u8 {
        self.bounds.partition_point(|&b| b < x) as u8
    }
}

/// The moments of one parameter.
enum State {
    /// One-byte codes `(n)` and f32 absmax `(⌈n / 256⌉)` for each moment.
    Quantized {
        m: Tensor,
        m_absmax: Tensor,
        v: Tensor,
        v_absmax: Tensor,
    },
    /// f32 moments `(n)` (parameters under [`MIN_8BIT_SIZE`] elements).
    Full { m: Tensor, v: Tensor },
}

/// 8-bit blockwise AdamW over a list of parameters.
pub struct AdamW8bit {
    cfg: AdamWConfig,
    vars: Vec<Var>,
    states: Vec<Option<State>>,
    maps: [Map; 2],
    t: usize,
    /// Update contiguous f32/bf16/f16 CPU tensors in place (default `true`); `false` sends them
    /// through the candle-operations path other devices take.
    pub in_place: bool,
}

impl AdamW8bit {
    /// Creates the optimizer; allocates nothing (states appear at the first step).
    ///
    /// # Errors
    /// [`crate::error::Error::InvalidValue`] for out-of-range hyper-parameters.
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let n = vars.len();
        Ok(AdamW8bit {
            cfg,
            vars,
            states: (0..n).map(|_| None).collect(),
            maps: [Map::new(true), Map::new(false)],
            t: 0,
            in_place: true,
        })
    }
}

/// The step's scalars in f32.
struct K {
    b1: f32,
    b2: f32,
    decay: f32,
    step_size: f32,
    sqrt_bc2: f32,
    eps: f32,
}

/// AdamW on one element from unquantized moments: returns the new `(m, v)` and sets `p`.
#[inline(always)]
fn adam(p: &mut FloatsMut<'_>, j: usize, g: f32, m: f32, v: f32, k: &K) -> (f32, f32) {
    let m = m * k.b1 + (1.0 - k.b1) * g;
    let v = v * k.b2 + (1.0 - k.b2) * g * g;
    let denom = v.sqrt() / k.sqrt_bc2 + k.eps;
    let x = p.get(j);
    p.set(j, x * k.decay - k.step_size * (m / denom));
    (m, v)
}

/// The elements of a storage as `T`, mutably.
fn typed<'a>(s: &'a mut CpuStorage, l: &candle_core::Layout) -> candle_core::Result<Slots<'a>> {
    let r = super::host::extent(l)?;
    Ok(match s {
        CpuStorage::U8(v) => Slots::U8(&mut v[r]),
        CpuStorage::F32(v) => Slots::F32(&mut v[r]),
        _ => candle_core::bail!("adamw-8bit: state is neither u8 nor f32"),
    })
}

/// A state storage's elements.
enum Slots<'a> {
    U8(&'a mut [u8]),
    F32(&'a mut [f32]),
}

/// Runs `f` with the four quantized state storages mutably.
fn with_states<R>(
    m: &Tensor,
    ma: &Tensor,
    v: &Tensor,
    va: &Tensor,
    f: impl FnOnce(&mut [u8], &mut [f32], &mut [u8], &mut [f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    with_mut(m, |ms, ml| {
        let Slots::U8(m) = typed(ms, ml)? else {
            candle_core::bail!("adamw-8bit: codes are not u8")
        };
        with_mut(ma, |mas, mal| {
            let Slots::F32(ma) = typed(mas, mal)? else {
                candle_core::bail!("adamw-8bit: absmax is not f32")
            };
            with_mut(v, |vs, vl| {
                let Slots::U8(v) = typed(vs, vl)? else {
                    candle_core::bail!("adamw-8bit: codes are not u8")
                };
                with_mut(va, |vas, val| {
                    let Slots::F32(va) = typed(vas, val)? else {
                        candle_core::bail!("adamw-8bit: absmax is not f32")
                    };
                    f(m, ma, v, va)
                })
            })
        })
    })
}

impl AdamW8bit {
    /// One quantized parameter's update.
    #[allow(clippy::too_many_arguments)]
    fn quantized(
        &self,
        p: &mut FloatsMut<'_>,
        g: Floats<'_>,
        mc: &mut [u8],
        ma: &mut [f32],
        vc: &mut [u8],
        va: &mut [f32],
        k: &K,
    ) {
        let [m1, m2] = &self.maps;
        let n = g.len();
        let mut mb = [0f32; BLOCK];
        let mut vb = [0f32; BLOCK];
        for (blk, (a1, a2)) in ma.iter_mut().zip(va.iter_mut()).enumerate() {
            let start = blk * BLOCK;
            let len = BLOCK.min(n - start);
            let (mut x1, mut x2) = (0f32, 0f32);
            for o in 0..len {
                let j = start + o;
                let m = m1.values[mc[j] as usize] * *a1;
                let v = m2.values[vc[j] as usize] * *a2;
                let (m, v) = adam(p, j, g.get(j), m, v, k);
                mb[o] = m;
                vb[o] = v;
                x1 = x1.max(m.abs());
                x2 = x2.max(v.abs());
            }
            *a1 = x1;
            *a2 = x2;
            let (r1, r2) = (1.0 / x1.max(1e-38), 1.0 / x2.max(1e-38));
            for o in 0..len {
                mc[start + o] = m1.code((mb[o] * r1).clamp(-1.0, 1.0));
                vc[start + o] = m2.code((vb[o] * r2).clamp(-1.0, 1.0));
            }
        }
    }
}

/// Values per chunk of the candle-operations path (64 blocks): its transients are a few f32
/// and `255`-wide u8 buffers of this many values.
const CHUNK: usize = 64 * BLOCK;

impl AdamW8bit {
    /// The update of parameter `i` with candle operations on whole blocks (any device), chunk by
    /// chunk: the same arithmetic as the CPU loop, with each value's code found as the number
    /// of map midpoints below it (`broadcast_gt` and a sum).
    fn generic(&self, i: usize, g: &Tensor, k: &K) -> Result<()> {
        let var = &self.vars[i];
        let dev = var.device();
        let pd = var.dtype();
        let n = var.elem_count();
        let p_flat = var.as_tensor().flatten_all()?;
        let g_flat = g.flatten_all()?.to_dtype(DType::F32)?;
        let p32 = |start: usize, len: usize| p_flat.narrow(0, start, len)?.to_dtype(DType::F32);
        let adam = |p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor| -> candle_core::Result<_> {
            // The constants rounded to f32 as the CPU loop rounds them.
            let m = ((m * k.b1 as f64)? + (g * (1.0 - k.b1) as f64)?)?;
            let v = ((v * k.b2 as f64)? + (g.sqr()? * (1.0 - k.b2) as f64)?)?;
            let denom = ((v.sqrt()? / k.sqrt_bc2 as f64)? + k.eps as f64)?;
            let p = ((p * k.decay as f64)? - ((&m / denom)? * k.step_size as f64)?)?;
            Ok((p, m, v))
        };
        match self.states[i].as_ref().expect("set") {
            State::Full { m, v } => {
                let (p, m_new, v_new) = adam(&p32(0, n)?, &g_flat, m, v)?;
                m.slice_set(&m_new, 0, 0)?;
                v.slice_set(&v_new, 0, 0)?;
                p_flat.slice_set(&p.to_dtype(pd)?, 0, 0)?;
            }
            State::Quantized {
                m,
                m_absmax,
                v,
                v_absmax,
            } => {
                let tables: Vec<(Tensor, Tensor)> = self
                    .maps
                    .iter()
                    .map(|map| {
                        Ok((
                            Tensor::from_slice(&map.values, 256, dev)?,
                            Tensor::from_slice(&map.bounds, (1, 255), dev)?,
                        ))
                    })
                    .collect::<candle_core::Result<_>>()?;
                // Values of `len` codes from `start`, and the per-value absmax expanded.
                let expand = |absmax: &Tensor, b0: usize, nb: usize, len: usize| {
                    absmax
                        .narrow(0, b0, nb)?
                        .unsqueeze(1)?
                        .broadcast_as((nb, BLOCK))?
                        .flatten_all()?
                        .narrow(0, 0, len)
                };
                let dequant = |codes: &Tensor, map: &Tensor, scale: &Tensor, start, len| {
                    map.index_select(&codes.narrow(0, start, len)?.to_dtype(DType::U32)?, 0)?
                        .mul(scale)
                };
                // New absmax per block and codes of `x` (`len` values of `nb` blocks).
                let quant = |x: &Tensor, bounds: &Tensor, nb: usize, len: usize| {
                    let pad = nb * BLOCK - len;
                    let padded = if pad > 0 {
                        Tensor::cat(&[x, &Tensor::zeros(pad, DType::F32, dev)?], 0)?
                    } else {
                        x.clone()
                    };
                    let absmax = padded.reshape((nb, BLOCK))?.abs()?.max(1)?;
                    let scale = absmax
                        .clamp(1e-38f32, f32::MAX)?
                        .recip()?
                        .unsqueeze(1)?
                        .broadcast_as((nb, BLOCK))?
                        .flatten_all()?
                        .narrow(0, 0, len)?;
                    let scaled = x.mul(&scale)?.clamp(-1f32, 1f32)?;
                    let codes = scaled
                        .unsqueeze(1)?
                        .broadcast_gt(bounds)?
                        .to_dtype(DType::U32)?
                        .sum(1)?
                        .to_dtype(DType::U8)?;
                    Ok::<_, candle_core::Error>((absmax, codes))
                };
                let mut start = 0;
                while start < n {
                    let len = CHUNK.min(n - start);
                    let (b0, nb) = (start / BLOCK, len.div_ceil(BLOCK));
                    let m_old =
                        dequant(m, &tables[0].0, &expand(m_absmax, b0, nb, len)?, start, len)?;
                    let v_old =
                        dequant(v, &tables[1].0, &expand(v_absmax, b0, nb, len)?, start, len)?;
                    let g_c = g_flat.narrow(0, start, len)?;
                    let (p_new, m_new, v_new) = adam(&p32(start, len)?, &g_c, &m_old, &v_old)?;
                    let (ma, mc) = quant(&m_new, &tables[0].1, nb, len)?;
                    let (va, vc) = quant(&v_new, &tables[1].1, nb, len)?;
                    m.slice_set(&mc, 0, start)?;
                    v.slice_set(&vc, 0, start)?;
                    m_absmax.slice_set(&ma, 0, b0)?;
                    v_absmax.slice_set(&va, 0, b0)?;
                    p_flat.slice_set(&p_new.to_dtype(pd)?, 0, start)?;
                    start += len;
                }
            }
        }
        Ok(())
    }
}

impl super::Optim for AdamW8bit {
    fn step(&mut self, grads: &[Tensor]) -> Result<()> {
        super::check_grads(grads, self.vars.len())?;
        self.t += 1;
        let c = self.cfg;
        let k = K {
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            decay: (1.0 - c.lr * c.weight_decay) as f32,
            step_size: (c.lr / (1.0 - c.beta1.powi(self.t as i32))) as f32,
            sqrt_bc2: (1.0 - c.beta2.powi(self.t as i32)).sqrt() as f32,
            eps: c.eps as f32,
        };
        for (i, g) in grads.iter().enumerate() {
            let p = self.vars[i].as_tensor().clone();
            let n = p.elem_count();
            if self.states[i].is_none() {
                let dev = p.device();
                self.states[i] = Some(if n >= MIN_8BIT_SIZE {
                    let blocks = n.div_ceil(BLOCK);
                    State::Quantized {
                        m: Tensor::zeros(n, DType::U8, dev)?,
                        m_absmax: Tensor::zeros(blocks, DType::F32, dev)?,
                        v: Tensor::zeros(n, DType::U8, dev)?,
                        v_absmax: Tensor::zeros(blocks, DType::F32, dev)?,
                    }
                } else {
                    State::Full {
                        m: Tensor::zeros(n, DType::F32, dev)?,
                        v: Tensor::zeros(n, DType::F32, dev)?,
                    }
                });
            }
            if !(self.in_place && eligible(&[&p, g])) {
                self.generic(i, g, &k)?;
                continue;
            }
            match self.states[i].as_ref().expect("set") {
                State::Quantized {
                    m,
                    m_absmax,
                    v,
                    v_absmax,
                } => update_from(&p, g, |pv, gv| {
                    with_states(m, m_absmax, v, v_absmax, |mc, ma, vc, va| {
                        self.quantized(pv, gv, mc, ma, vc, va, &k);
                        Ok(())
                    })
                })?,
                State::Full { m, v } => update_from(&p, g, |pv, gv| {
                    with_mut(m, |ms, ml| {
                        let Slots::F32(m) = typed(ms, ml)? else {
                            candle_core::bail!("adamw-8bit: moment is not f32")
                        };
                        with_mut(v, |vs, vl| {
                            let Slots::F32(v) = typed(vs, vl)? else {
                                candle_core::bail!("adamw-8bit: moment is not f32")
                            };
                            for j in 0..gv.len() {
                                (m[j], v[j]) = adam(pv, j, gv.get(j), m[j], v[j], &k);
                            }
                            Ok(())
                        })
                    })
                })?,
            }
        }
        Ok(())
    }

    fn state_bytes(&self) -> u64 {
        let bytes = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        self.states
            .iter()
            .flatten()
            .map(|s| match s {
                State::Quantized {
                    m,
                    m_absmax,
                    v,
                    v_absmax,
                } => bytes(m) + bytes(m_absmax) + bytes(v) + bytes(v_absmax),
                State::Full { m, v } => bytes(m) + bytes(v),
            })
            .sum()
    }

    fn steps(&self) -> usize {
        self.t
    }
}
