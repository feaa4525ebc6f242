//! SGD with optional momentum, as `torch.optim.SGD` updates (torch 2.x `torch/optim/sgd.py`,
//! `_single_tensor_sgd`, dampening 0, not Nesterov), in f32 arithmetic:
//!
//! * `d = g + λ·p` (weight decay coupled, as torch's SGD adds it to the gradient)
//! * with momentum μ > 0: `buf ← d` at the first step, then `buf ← μ·buf + d`; `d = buf`
//! * `p ← p − lr·d`
//!
//! Memory: no state with momentum 0 (HF `optim=sgd`, the Trainer's default momentum); one
//! momentum buffer per parameter in the state dtype otherwise, allocated at the first step.
//! The CPU path updates in place with no temporary; other devices run candle operations on
//! whole tensors (a few f32 tensors of one parameter alive at once).

use candle_core::{DType, Tensor, Var};

use super::host::{eligible, update_from, with_mut, FloatsMut};
use crate::error::{Error, Result};

/// SGD over a list of parameters.
pub struct Sgd {
    lr: f64,
    weight_decay: f64,
    momentum: f64,
    state_dtype: DType,
    vars: Vec<Var>,
    bufs: Vec<Option<Tensor>>,
    t: usize,
    /// Update contiguous f32/bf16/f16 CPU tensors in place (default `true`); `false` sends
    /// them through the candle-operations path other devices take.
    pub in_place: bool,
}

impl Sgd {
    /// Creates the optimizer; allocates nothing.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for a negative or non-finite learning rate, weight decay or
    /// momentum, a momentum of 1 or more, or a non-float state dtype.
    pub fn new(
        vars: Vec<Var>,
        lr: f64,
        weight_decay: f64,
        momentum: f64,
        state_dtype: DType,
    ) -> Result<Self> {
        for (name, x) in [("--lr", lr), ("--weight-decay", weight_decay)] {
            if !(x.is_finite() && x >= 0.0) {
                return Err(Error::invalid(name, x, "must be finite and non-negative"));
            }
        }
        if !(0.0..1.0).contains(&momentum) {
            return Err(Error::invalid("--momentum", momentum, "must be in [0, 1)"));
        }
        if !state_dtype.is_float() {
            return Err(Error::invalid(
                "optimizer state dtype",
                format!("{state_dtype:?}"),
                "must be a float type",
            ));
        }
        let n = vars.len();
        Ok(Sgd {
            lr,
            weight_decay,
            momentum,
            state_dtype,
            vars,
            bufs: vec![None; n],
            t: 0,
            in_place: true,
        })
    }
}

impl super::Optim for Sgd {
    fn step(&mut self, grads: &[Tensor]) -> Result<()> {
        super::check_grads(grads, self.vars.len())?;
        self.t += 1;
        let first = self.t == 1;
        let (lr, wd, mu) = (
            self.lr as f32,
            self.weight_decay as f32,
            self.momentum as f32,
        );
        for (i, (var, g)) in self.vars.iter().zip(grads).enumerate() {
            let p = var.as_tensor();
            if mu > 0.0 && self.bufs[i].is_none() {
                self.bufs[i] = Some(Tensor::zeros(p.shape(), self.state_dtype, p.device())?);
            }
            let buf = self.bufs[i].as_ref();
            let cpu = self.in_place && eligible(&[p, g]) && buf.is_none_or(|b| eligible(&[b]));
            if cpu {
                update_from(p, g, |pv, gv| {
                    let n = gv.len();
                    match buf {
                        None => {
                            for j in 0..n {
                                let d = gv.get(j) + wd * pv.get(j);
                                pv.set(j, pv.get(j) - lr * d);
                            }
                            Ok(())
                        }
                        Some(b) => with_mut(b, |bs, bl| {
                            let mut bv = FloatsMut::of(bs, bl)?;
                            for j in 0..n {
                                let d = gv.get(j) + wd * pv.get(j);
                                let m = if first { d } else { mu * bv.get(j) + d };
                                bv.set(j, m);
                                // torch steps with the stored (rounded) buffer.
                                pv.set(j, pv.get(j) - lr * bv.get(j));
                            }
                            Ok(())
                        }),
                    }
                })?;
                continue;
            }
            let pd = p.dtype();
            let p32 = p.to_dtype(DType::F32)?;
            let d = (g.to_dtype(DType::F32)? + (&p32 * self.weight_decay)?)?;
            let d = match buf {
                None => d,
                Some(b) => {
                    let m = if first {
                        d
                    } else {
                        ((b.to_dtype(DType::F32)? * self.momentum)? + d)?
                    };
                    let stored = m.to_dtype(self.state_dtype)?;
                    b.slice_set(&stored, 0, 0)?;
                    stored.to_dtype(DType::F32)?
                }
            };
            let new = (p32 - (d * self.lr)?)?;
            var.set(&new.to_dtype(pd)?)?;
        }
        Ok(())
    }

    fn state_bytes(&self) -> u64 {
        self.bufs
            .iter()
            .flatten()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum()
    }

    fn steps(&self) -> usize {
        self.t
    }
}
