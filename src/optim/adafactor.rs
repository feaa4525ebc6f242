//! Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory
//! Cost", Algorithm 4 without first moment) as transformers' `Adafactor` updates when the HF
//! Trainer builds it for `optim=adafactor` (`scale_parameter=False, relative_step=False`, so the
//! step size is the learning rate; `eps=(1e-30, 1e-3)`, `clip_threshold=1.0`,
//! `decay_rate=-0.8`, `beta1=None`; transformers `src/transformers/optimization.py`,
//! `Adafactor.step`), in f32:
//!
//! * `β2ₜ = 1 − t^(−0.8)`, `u = g² + 1e-30`
//! * a matrix `(r, c)`: `R ← β2ₜ·R + (1 − β2ₜ)·mean_cols(u)` `(r)`, `C ← β2ₜ·C + (1 − β2ₜ)·
//!   mean_rows(u)` `(c)`; `U = g / √(R/mean(R) ⊗ C)`
//! * a vector: `V ← β2ₜ·V + (1 − β2ₜ)·u`; `U = g / √V`
//! * `U ← U / max(1, rms(U) / 1.0)`; `p ← p − lr·λ·p − lr·U`
//!
//! Memory: fp32 states, a row and a column vector per matrix and a full vector per vector
//! parameter, allocated at the first step. The CPU path updates in place; its only temporary
//! is one f32 vector of column sums. Other devices run candle operations on whole tensors
//! (a few f32 tensors of one parameter alive at once).

use candle_core::{DType, Tensor, Var, D};

use super::host::{eligible, update_from, with_mut, Floats, FloatsMut};
use crate::error::{Error, Result};

/// `eps[0]` of transformers' Adafactor, added to the squared gradient.
const EPS1: f32 = 1e-30;
/// `clip_threshold`.
const CLIP: f32 = 1.0;
/// `decay_rate`.
const DECAY: f64 = -0.8;

/// The second-moment state of one parameter.
enum State {
    /// Row and column means of a matrix, f32 `(rows)` and `(cols)`.
    Factored(Tensor, Tensor),
    /// A vector's own, f32 `(n)`.
    Full(Tensor),
}

/// Adafactor over a list of parameters.
pub struct Adafactor {
    lr: f64,
    weight_decay: f64,
    vars: Vec<Var>,
    states: Vec<Option<State>>,
    t: usize,
    /// Update contiguous f32/bf16/f16 CPU tensors in place (default `true`); `false` sends
    /// them through the candle-operations path other devices take.
    pub in_place: bool,
}

impl Adafactor {
    /// Creates the optimizer; allocates nothing.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for a negative or non-finite learning rate or weight decay, or
    /// a parameter of more than two dimensions.
    pub fn new(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<Self> {
        for (name, x) in [("--lr", lr), ("--weight-decay", weight_decay)] {
            if !(x.is_finite() && x >= 0.0) {
                return Err(Error::invalid(name, x, "must be finite and non-negative"));
            }
        }
        if let Some(v) = vars.iter().find(|v| v.rank() > 2 || v.rank() == 0) {
            return Err(Error::invalid(
                "parameter",
                format!("{:?}", v.shape()),
                "Adafactor here takes vectors and matrices",
            ));
        }
        let n = vars.len();
        Ok(Adafactor {
            lr,
            weight_decay,
            vars,
            states: (0..n).map(|_| None).collect(),
            t: 0,
            in_place: true,
        })
    }
}

/// One matrix update on the CPU: `p`, `g` `(rows, cols)` row-major, states `row` `(rows)`,
/// `col` `(cols)`.
fn cpu_matrix(
    p: &mut FloatsMut<'_>,
    g: Floats<'_>,
    row: &mut [f32],
    col: &mut [f32],
    beta: f32,
    lr: f32,
    decay: f32,
) {
    let (rows, cols) = (row.len(), col.len());
    let mut col_sum = vec![0f32; cols];
    for (i, r) in row.iter_mut().enumerate() {
        let mut s = 0f32;
        for (j, c) in col_sum.iter_mut().enumerate() {
            let x = g.get(i * cols + j);
            let u = x * x + EPS1;
            s += u;
            *c += u;
        }
        *r = beta * *r + (1.0 - beta) * (s / cols as f32);
    }
    for (c, s) in col.iter_mut().zip(&col_sum) {
        *c = beta * *c + (1.0 - beta) * (s / rows as f32);
    }
    let row_mean = row.iter().sum::<f32>() / rows as f32;
    let u = |i: usize, j: usize| {
        let r = (row[i] / row_mean).sqrt().recip();
        let c = col[j].sqrt().recip();
        r * c * g.get(i * cols + j)
    };
    let mut sq = 0f64;
    for i in 0..rows {
        for j in 0..cols {
            sq += (u(i, j) as f64).powi(2);
        }
    }
    let scale = clip_scale(sq, rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            let k = i * cols + j;
            let x = p.get(k);
            p.set(k, x * decay - lr * (u(i, j) / scale));
        }
    }
}

/// One vector update on the CPU: `p`, `g`, state `v` all `(n)`.
fn cpu_vector(p: &mut FloatsMut<'_>, g: Floats<'_>, v: &mut [f32], beta: f32, lr: f32, decay: f32) {
    for (j, s) in v.iter_mut().enumerate() {
        let x = g.get(j);
        *s = beta * *s + (1.0 - beta) * (x * x + EPS1);
    }
    let u = |j: usize| v[j].sqrt().recip() * g.get(j);
    let sq: f64 = (0..v.len()).map(|j| (u(j) as f64).powi(2)).sum();
    let scale = clip_scale(sq, v.len());
    for j in 0..v.len() {
        let x = p.get(j);
        p.set(j, x * decay - lr * (u(j) / scale));
    }
}

/// `max(1, rms(U) / clip_threshold)` from the sum of squares of `n` update values.
fn clip_scale(sum_sq: f64, n: usize) -> f32 {
    (((sum_sq / n.max(1) as f64).sqrt() as f32) / CLIP).max(1.0)
}

/// The f32 elements of a state tensor, mutably.
fn f32_mut<'a>(
    s: &'a mut candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a mut [f32]> {
    let r = super::host::extent(l)?;
    match s {
        candle_core::CpuStorage::F32(v) => Ok(&mut v[r]),
        _ => candle_core::bail!("adafactor: state is not f32"),
    }
}

impl super::Optim for Adafactor {
    fn step(&mut self, grads: &[Tensor]) -> Result<()> {
        super::check_grads(grads, self.vars.len())?;
        self.t += 1;
        let beta = 1.0 - (self.t as f64).powf(DECAY);
        let (lr, decay) = (self.lr as f32, (1.0 - self.lr * self.weight_decay) as f32);
        for (i, (var, g)) in self.vars.iter().zip(grads).enumerate() {
            let p = var.as_tensor();
            let dev = p.device();
            if self.states[i].is_none() {
                self.states[i] = Some(match p.dims() {
                    [r, c] => State::Factored(
                        Tensor::zeros(*r, DType::F32, dev)?,
                        Tensor::zeros(*c, DType::F32, dev)?,
                    ),
                    d => State::Full(Tensor::zeros(d.iter().product::<usize>(), DType::F32, dev)?),
                });
            }
            let state = self.states[i].as_ref().expect("set");
            if self.in_place && eligible(&[p, g]) {
                let b = beta as f32;
                match state {
                    State::Factored(row, col) => update_from(p, g, |pv, gv| {
                        with_mut(row, |rs, rl| {
                            let row = f32_mut(rs, rl)?;
                            with_mut(col, |cs, cl| {
                                let col = f32_mut(cs, cl)?;
                                cpu_matrix(pv, gv, row, col, b, lr, decay);
                                Ok(())
                            })
                        })
                    })?,
                    State::Full(v) => update_from(p, g, |pv, gv| {
                        with_mut(v, |vs, vl| {
                            cpu_vector(pv, gv, f32_mut(vs, vl)?, b, lr, decay);
                            Ok(())
                        })
                    })?,
                }
                continue;
            }
            let pd = p.dtype();
            let g32 = g.to_dtype(DType::F32)?;
            let u = (g32.sqr()? + EPS1 as f64)?;
            let update = match state {
                State::Factored(row, col) => {
                    let r_new = ((row * beta)? + (u.mean(D::Minus1)? * (1.0 - beta))?)?;
                    let c_new = ((col * beta)? + (u.mean(0)? * (1.0 - beta))?)?;
                    row.slice_set(&r_new, 0, 0)?;
                    col.slice_set(&c_new, 0, 0)?;
                    let r_fac = r_new
                        .broadcast_div(&r_new.mean_keepdim(0)?)?
                        .sqrt()?
                        .recip()?
                        .unsqueeze(1)?;
                    let c_fac = c_new.sqrt()?.recip()?.unsqueeze(0)?;
                    r_fac.broadcast_mul(&c_fac)?.mul(&g32)?
                }
                State::Full(v) => {
                    let v_new = ((v * beta)? + (u.flatten_all()? * (1.0 - beta))?)?;
                    v.slice_set(&v_new, 0, 0)?;
                    (v_new.sqrt()?.recip()?.reshape(p.shape())? * &g32)?
                }
            };
            let rms = update
                .sqr()?
                .mean_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                .sqrt();
            let scale = (rms / CLIP as f64).max(1.0);
            let p32 = p.to_dtype(DType::F32)?;
            let new =
                ((p32 * (1.0 - self.lr * self.weight_decay))? - (update * (self.lr / scale))?)?;
            var.set(&new.to_dtype(pd)?)?;
        }
        Ok(())
    }

    fn state_bytes(&self) -> u64 {
        self.states
            .iter()
            .flatten()
            .map(|s| match s {
                State::Factored(r, c) => 4 * (r.elem_count() + c.elem_count()) as u64,
                State::Full(v) => 4 * v.elem_count() as u64,
            })
            .sum()
    }

    fn steps(&self) -> usize {
        self.t
    }
}
