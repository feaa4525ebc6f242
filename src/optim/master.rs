//! fp32 master weights for 16-bit training (the `bf16-master`/`fp16-master` recipes of
//! `../shared/cases/README.md`: DeepSpeed's `bf16`/`fp16` with ZeRO, Megatron, apex O2): the
//! optimizer steps an fp32 copy of every trainable weight from the 16-bit gradients, and the
//! 16-bit weights the model computes with are then overwritten with the copy, rounded.
//!
//! Memory: the copies (4 bytes per trainable parameter) are made when the optimizer is built,
//! as DeepSpeed makes them at initialization. On the CPU the cast back writes in place; other
//! devices make one 16-bit copy of one parameter at a time.

use candle_core::{DType, Tensor, Var};

use super::host::{eligible, update_from};
use crate::error::Result;

/// An optimizer stepping fp32 master copies of 16-bit parameters.
pub struct Master {
    params: Vec<Var>,
    masters: Vec<Var>,
    inner: Box<dyn super::Optim>,
}

impl Master {
    /// Copies `params` to fp32 and builds the inner optimizer over the copies with `inner`.
    ///
    /// # Errors
    /// Those of `inner`; [`crate::error::Error::Candle`] if a copy cannot be made.
    pub fn new(
        params: Vec<Var>,
        inner: impl FnOnce(Vec<Var>) -> Result<Box<dyn super::Optim>>,
    ) -> Result<Self> {
        // Always a new storage: `to_dtype` of an f32 tensor is the same tensor, and a master
        // sharing its parameter's storage would be locked twice by the cast back.
        let masters = params
            .iter()
            .map(|p| {
                let t = p.as_tensor();
                let copy = if t.dtype() == DType::F32 {
                    t.copy()?
                } else {
                    t.to_dtype(DType::F32)?
                };
                Var::from_tensor(&copy)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let inner = inner(masters.clone())?;
        Ok(Master {
            params,
            masters,
            inner,
        })
    }
}

impl super::Optim for Master {
    fn step(&mut self, grads: &[Tensor]) -> Result<()> {
        self.inner.step(grads)?;
        for (p, m) in self.params.iter().zip(&self.masters) {
            let (pt, mt) = (p.as_tensor(), m.as_tensor());
            if eligible(&[pt, mt]) {
                // The master is the "gradient" read: each parameter element becomes its
                // master's value, rounded.
                update_from(pt, mt, |pv, mv| {
                    for j in 0..mv.len() {
                        pv.set(j, mv.get(j));
                    }
                    Ok(())
                })?;
            } else {
                p.set(&mt.to_dtype(pt.dtype())?)?;
            }
        }
        Ok(())
    }

    /// The inner optimizer's states plus the fp32 copies.
    fn state_bytes(&self) -> u64 {
        self.inner.state_bytes()
            + self
                .masters
                .iter()
                .map(|m| 4 * m.elem_count() as u64)
                .sum::<u64>()
    }

    fn steps(&self) -> usize {
        self.inner.steps()
    }
}
