//! CPU kernels of the fused RMSNorm, SwiGLU and RoPE ops and of the LM head's cross-entropy:
//! each computes what the op's composed candle operations compute, rounding to the tensor dtype
//! where they round (sums may add in another order and means divide where candle multiplies by
//! `1/h`, so the last bit may differ; SwiGLU's `silu` is computed in f32 and rounded once, where
//! candle's bf16/f16 `silu` rounds after each of its operations), in one pass over rows split
//! across candle's thread pool, without the composed form's intermediate tensors or candle
//! 0.11's single-threaded unary operations.
//! The CPU counterpart of [`super::kernels`] (CUDA).
//!
//! Each function returns `Ok(None)` when its inputs cannot go to a kernel (another device,
//! mixed or non-float dtypes, unexpected shapes): the op then runs its composed form. Inputs
//! are made contiguous first; outputs are new contiguous tensors. Every buffer is allocated on
//! the calling thread before the threads start, so peaks do not depend on their interleaving.

use candle_core::{DType, Storage, Tensor};
use half::{bf16, f16};
use rayon::iter::Either;
use rayon::prelude::*;

/// Rows per parallel task.
const TASK_ROWS: usize = 32;

/// The CPU kernels, for counting their calls ([`calls`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// RMSNorm, forward or backward.
    RmsNorm,
    /// SwiGLU, forward or backward.
    Swiglu,
    /// RoPE, forward or backward.
    Rope,
    /// Attention (`src/ops/cpu_attention.rs`), forward or backward.
    Attention,
    /// The LM head's cross-entropy, loss or gradient.
    CrossEntropy,
}

thread_local! {
    static CALLS: std::cell::Cell<[usize; 5]> = const { std::cell::Cell::new([0; 5]) };
}

/// Counts one call of `k` made from this thread.
pub(super) fn count(k: Kernel) {
    CALLS.with(|c| {
        let mut v = c.get();
        v[k as usize] += 1;
        c.set(v);
    });
}

/// How many forward and backward passes of `k` this thread has run on the CPU kernel rather
/// than the composed form: lets a test tell which path ran.
pub fn calls(k: Kernel) -> usize {
    CALLS.with(|c| c.get()[k as usize])
}

/// The arithmetic type a kernel computes in: f32, or f64 for f64 tensors.
pub(super) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + candle_core::WithDType
{
    fn of(x: f64) -> Self;
    fn sqrt(self) -> Self;
    fn exp(self) -> Self;
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
}

impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

/// A tensor element: widened to its compute type and rounded back.
pub(super) trait Elem: Copy + Send + Sync + candle_core::WithDType {
    type C: Real;
    fn up(self) -> Self::C;
    fn down(x: Self::C) -> Self;
}

macro_rules! elem {
    ($t:ty, $c:ty, $up:expr, $down:expr) => {
        impl Elem for $t {
            type C = $c;
            #[inline(always)]
            fn up(self) -> $c {
                $up(self)
            }
            #[inline(always)]
            fn down(x: $c) -> Self {
                $down(x)
            }
        }
    };
}
elem!(f32, f32, |x| x, |x| x);
elem!(f64, f64, |x| x, |x| x);
elem!(bf16, f32, bf16::to_f32, bf16::from_f32);
elem!(f16, f32, f16::to_f32, f16::from_f32);

/// `d(d(a)·b)`: a product rounded to the element type, as a candle binary op in that type.
#[inline(always)]
fn mul<E: Elem>(a: E::C, b: E::C) -> E::C {
    E::down(a * b).up()
}

/// Whether all tensors are on the CPU in one float dtype.
fn eligible(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| {
        t.device().is_cpu()
            && t.dtype() == ts[0].dtype()
            && matches!(
                t.dtype(),
                DType::F32 | DType::BF16 | DType::F16 | DType::F64
            )
    })
}

/// Calls the generic `$f::<E>(args…)` with `E` the element type of `$dt` (f32, bf16, f16,
/// f64); `Ok(None)` from the enclosing function for other dtypes.
macro_rules! dispatch {
    ($dt:expr, $f:ident($($arg:expr),*)) => {
        match $dt {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            _ => return Ok(None),
        }
    };
}

/// Borrows a contiguous CPU tensor's elements as `$E` for the rest of the enclosing block.
macro_rules! slice {
    ($t:expr, $E:ty => $name:ident) => {
        let guard = $t.storage_and_layout();
        let $name: &[$E] = match &*guard.0 {
            Storage::Cpu(c) => {
                let (a, b) = guard
                    .1
                    .contiguous_offsets()
                    .ok_or_else(|| candle_core::Error::Msg("cpu kernel: strided".into()))?;
                &c.as_slice::<$E>()?[a..b]
            }
            _ => candle_core::bail!("cpu kernel: not on the CPU"),
        };
    };
}

/// A new CPU tensor of `shape` from `v`.
fn tensor<T: candle_core::WithDType>(v: Vec<T>, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, like.shape(), like.device())
}

/// `1/√(mean(x²) + ε)` of one row, in the compute type (candle's `sqr`, `mean_keepdim`,
/// `+ ε`, `sqrt`, `recip`).
#[inline]
fn inv_rms<E: Elem>(x: &[E], eps: f64) -> E::C {
    let mut ss = E::C::of(0.0);
    for v in x {
        let v = v.up();
        ss += v * v;
    }
    let mean = ss / E::C::of(x.len() as f64);
    E::C::of(1.0) / (mean + E::C::of(eps)).sqrt()
}

/// RMSNorm forward: `x·inv_rms(x)` rounded to the dtype, times `w` (in the dtype).
///
/// # Errors
/// [`candle_core::Error`] from candle.
pub(super) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Option<Tensor>> {
    let h = x.dim(candle_core::D::Minus1)?;
    if !eligible(&[x, w]) || w.dims() != [h] || h == 0 {
        return Ok(None);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    count(Kernel::RmsNorm);
    dispatch!(x.dtype(), rms_norm_impl(&x, &w, h, eps))
}

/// RMSNorm backward: `dx` (the dtype) and, with `want_w`, `dw` `(h,)` in the compute type:
/// `n = x·inv`, `dn = g·w`, `dx = (dn − n·mean(dn·n))·inv`, `dw = Σ_rows g·round(n)`, as the
/// composed form in `norm.rs`. `dw` sums per-task partials in task order: the same bits on
/// every run.
///
/// # Errors
/// [`candle_core::Error`] from candle.
#[allow(clippy::type_complexity)]
pub(super) fn rms_norm_bwd(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
    want_w: bool,
) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
    let h = x.dim(candle_core::D::Minus1)?;
    if !eligible(&[x, w, g]) || w.dims() != [h] || g.shape() != x.shape() || h == 0 {
        return Ok(None);
    }
    let (x, w, g) = (x.contiguous()?, w.contiguous()?, g.contiguous()?);
    count(Kernel::RmsNorm);
    dispatch!(x.dtype(), rms_norm_bwd_impl(&x, &w, &g, h, eps, want_w))
}

/// `silu(v) = v / (1 + e^{−v})` (candle's `silu`).
#[inline(always)]
fn silu<C: Real>(v: C) -> C {
    v / ((-v).exp() + C::of(1.0))
}

/// SwiGLU forward: `silu(gate)·up`, each rounded to the dtype.
///
/// # Errors
/// [`candle_core::Error`] from candle.
pub(super) fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !eligible(&[gate, up]) || gate.shape() != up.shape() {
        return Ok(None);
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let chunk = TASK_ROWS * gate.dim(candle_core::D::Minus1)?.max(1);
    count(Kernel::Swiglu);
    dispatch!(gate.dtype(), swiglu_impl(&gate, &up, chunk))
}

/// SwiGLU backward in the compute type, as `swiglu.rs`'s composed form: `σ = 1/(e^{−gate}+1)`,
/// `d_up = g·gate·σ`, `d_gate = g·up·σ·(gate·(1 − σ) + 1)`, rounded to the dtype.
///
/// # Errors
/// [`candle_core::Error`] from candle.
#[allow(clippy::type_complexity)]
pub(super) fn swiglu_bwd(
    gate: &Tensor,
    up: &Tensor,
    g: &Tensor,
    want_up: bool,
) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
    if !eligible(&[gate, up, g]) || gate.shape() != up.shape() || gate.shape() != g.shape() {
        return Ok(None);
    }
    let (gate, up, g) = (gate.contiguous()?, up.contiguous()?, g.contiguous()?);
    let chunk = TASK_ROWS * gate.dim(candle_core::D::Minus1)?.max(1);
    count(Kernel::Swiglu);
    dispatch!(
        gate.dtype(),
        swiglu_bwd_impl(&gate, &up, &g, chunk, want_up)
    )
}

/// RoPE on `x` `(b, heads, s, hd)` with tables `cos`, `sin` `(1, 1, s, hd)` in the dtype
/// (transformers' `rotate_half` layout), each product and sum rounded to the dtype as the
/// composed form in `rope.rs`: forward `x·cos + rotate_half(x)·sin`; with `backward`, the
/// transpose applied to an output gradient: `g·cos + rotate_half_t(g·sin)`.
///
/// # Errors
/// [`candle_core::Error`] from candle.
pub(super) fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    backward: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !eligible(&[x, cos, sin]) || x.rank() != 4 || x.dim(3)? % 2 != 0 {
        return Ok(None);
    }
    let (_, _, s, hd) = x.dims4()?;
    if cos.dims() != [1, 1, s, hd] || sin.dims() != [1, 1, s, hd] || hd == 0 {
        return Ok(None);
    }
    let (x, cos, sin) = (x.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let half = hd / 2;
    count(Kernel::Rope);
    dispatch!(x.dtype(), rope_impl(&x, &cos, &sin, s, hd, half, backward))
}

fn rms_norm_impl<E: Elem>(
    x: &Tensor,
    w: &Tensor,
    h: usize,
    eps: f64,
) -> candle_core::Result<Option<Tensor>> {
    slice!(x, E => xs);
    slice!(w, E => ws);
    let mut out = vec![E::down(E::C::of(0.0)); xs.len()];
    out.par_chunks_mut(TASK_ROWS * h)
        .zip(xs.par_chunks(TASK_ROWS * h))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
                let inv = inv_rms(x, eps);
                for ((o, x), w) in o.iter_mut().zip(x).zip(ws) {
                    *o = E::down(mul::<E>(x.up(), inv) * w.up());
                }
            }
        });
    Ok(Some(tensor(out, x)?))
}

fn rms_norm_bwd_impl<E: Elem>(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    h: usize,
    eps: f64,
    want_w: bool,
) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
    slice!(x, E => xs);
    slice!(w, E => ws);
    slice!(g, E => gs);
    let zero = E::C::of(0.0);
    let mut dx = vec![E::down(zero); xs.len()];
    let tasks = xs.len().div_ceil(TASK_ROWS * h);
    let mut partial = vec![zero; if want_w { tasks * h } else { 0 }];
    let hc = E::C::of(h as f64);
    let body = |dx: &mut [E], x: &[E], g: &[E], dw: Option<&mut [E::C]>| {
        let mut dw = dw;
        for ((dx, x), g) in dx
            .chunks_exact_mut(h)
            .zip(x.chunks_exact(h))
            .zip(g.chunks_exact(h))
        {
            let inv = inv_rms(x, eps);
            let mut proj = zero;
            for ((x, g), w) in x.iter().zip(g).zip(ws) {
                proj += (g.up() * w.up()) * (x.up() * inv);
            }
            let proj = proj / hc;
            for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(ws) {
                let n = x.up() * inv;
                *dx = E::down((g.up() * w.up() - n * proj) * inv);
            }
            if let Some(dw) = dw.as_deref_mut() {
                for ((dw, x), g) in dw.iter_mut().zip(x).zip(g) {
                    *dw += g.up() * E::down(x.up() * inv).up();
                }
            }
        }
    };
    // One partial weight gradient per task, or none: the same task split either way.
    let partials = if want_w {
        Either::Left(partial.par_chunks_mut(h).map(Some))
    } else {
        Either::Right((0..tasks).into_par_iter().map(|_| None))
    };
    dx.par_chunks_mut(TASK_ROWS * h)
        .zip(xs.par_chunks(TASK_ROWS * h))
        .zip(gs.par_chunks(TASK_ROWS * h))
        .zip(partials)
        .for_each(|(((dx, x), g), p)| body(dx, x, g, p));
    let dw = if want_w {
        let mut dw = vec![zero; h];
        for p in partial.chunks_exact(h) {
            for (d, p) in dw.iter_mut().zip(p) {
                *d += *p;
            }
        }
        drop(partial);
        Some(Tensor::from_vec(dw, h, x.device())?)
    } else {
        None
    };
    Ok(Some((tensor(dx, x)?, dw)))
}

fn swiglu_impl<E: Elem>(
    gate: &Tensor,
    up: &Tensor,
    chunk: usize,
) -> candle_core::Result<Option<Tensor>> {
    slice!(gate, E => gs);
    slice!(up, E => us);
    let mut out = vec![E::down(E::C::of(0.0)); gs.len()];
    out.par_chunks_mut(chunk)
        .zip(gs.par_chunks(chunk).zip(us.par_chunks(chunk)))
        .for_each(|(o, (g, u))| {
            for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                *o = E::down(E::down(silu(g.up())).up() * u.up());
            }
        });
    Ok(Some(tensor(out, gate)?))
}

fn swiglu_bwd_impl<E: Elem>(
    gate: &Tensor,
    up: &Tensor,
    g: &Tensor,
    chunk: usize,
    want_up: bool,
) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
    slice!(gate, E => xs);
    slice!(up, E => us);
    slice!(g, E => gs);
    let one = E::C::of(1.0);
    let mut d_gate = vec![E::down(E::C::of(0.0)); xs.len()];
    let mut d_up = vec![E::down(E::C::of(0.0)); if want_up { xs.len() } else { 0 }];
    let grad = |x: E, u: E, g: E| {
        let (x, u, g) = (x.up(), u.up(), g.up());
        let sig = one / ((-x).exp() + one);
        let dsilu = sig * (x * (one - sig) + one);
        (E::down(g * u * dsilu), E::down(g * (x * sig)))
    };
    // The gradient to `up` per task, or none: the same task split either way.
    let tasks = xs.len().div_ceil(chunk);
    let d_ups = if want_up {
        Either::Left(d_up.par_chunks_mut(chunk).map(Some))
    } else {
        Either::Right((0..tasks).into_par_iter().map(|_| None))
    };
    d_gate
        .par_chunks_mut(chunk)
        .zip(d_ups)
        .zip(
            xs.par_chunks(chunk)
                .zip(us.par_chunks(chunk))
                .zip(gs.par_chunks(chunk)),
        )
        .for_each(|((dg, du), ((x, u), g))| match du {
            Some(du) => {
                for ((((dg, du), x), u), g) in dg.iter_mut().zip(du).zip(x).zip(u).zip(g) {
                    (*dg, *du) = grad(*x, *u, *g);
                }
            }
            None => {
                for (((dg, x), u), g) in dg.iter_mut().zip(x).zip(u).zip(g) {
                    *dg = grad(*x, *u, *g).0;
                }
            }
        });
    let d_up = if want_up {
        Some(tensor(d_up, gate)?)
    } else {
        None
    };
    Ok(Some((tensor(d_gate, gate)?, d_up)))
}

fn rope_impl<E: Elem>(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    s: usize,
    hd: usize,
    half: usize,
    backward: bool,
) -> candle_core::Result<Option<Tensor>> {
    slice!(x, E => xs);
    slice!(cos, E => cs);
    slice!(sin, E => ss);
    let mut out = vec![E::down(E::C::of(0.0)); xs.len()];
    out.par_chunks_mut(s * hd)
        .zip(xs.par_chunks(s * hd))
        .for_each(|(o, x)| {
            for (p, (o, x)) in o.chunks_exact_mut(hd).zip(x.chunks_exact(hd)).enumerate() {
                let (c, sn) = (&cs[p * hd..(p + 1) * hd], &ss[p * hd..(p + 1) * hd]);
                for j in 0..hd {
                    let xc = mul::<E>(x[j].up(), c[j].up());
                    let r = if backward {
                        // rotate_half_t(g·sin): (b, −a) with a, b the halves of g·sin
                        if j < half {
                            mul::<E>(x[j + half].up(), sn[j + half].up())
                        } else {
                            -mul::<E>(x[j - half].up(), sn[j - half].up())
                        }
                    } else if j < half {
                        mul::<E>(-x[j + half].up(), sn[j].up())
                    } else {
                        mul::<E>(x[j - half].up(), sn[j].up())
                    };
                    o[j] = E::down(xc + r);
                }
            }
        });
    Ok(Some(tensor(out, x)?))
}

/// `(max, Σ e^{l − max})` of one row of logits.
#[inline]
fn max_sum<C: Real>(l: &[C]) -> (C, C) {
    let mut max = l[0];
    for &x in l {
        if x > max {
            max = x;
        }
    }
    let mut sum = C::of(0.0);
    for &x in l {
        sum += (x - max).exp();
    }
    (max, sum)
}

/// Targets `(rows,)` or `(rows, 1)` as a u32 vector, when they fit the logits.
fn targets_of(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Option<Vec<u32>>> {
    let (rows, vocab) = logits.dims2()?;
    if targets.dtype() != DType::U32 || targets.elem_count() != rows {
        return Ok(None);
    }
    let t = targets.flatten_all()?.to_vec1::<u32>()?;
    // A target outside the vocabulary goes to the composed form, whose gather refuses it.
    Ok(t.iter().all(|&t| (t as usize) < vocab).then_some(t))
}

/// Cross-entropy per row of logits `(rows, vocab)` (f32, or f64) against u32 targets
/// `(rows,)` or `(rows, 1)` → `(rows,)` nats: `ln Σ e^{l − max} − (l_t − max)` (as the CUDA
/// kernel `ce_loss`). `Ok(None)` when a target is outside the vocabulary.
///
/// # Errors
/// [`candle_core::Error`] from candle.
pub(super) fn ce_loss(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !logits.device().is_cpu()
        || logits.rank() != 2
        || !matches!(logits.dtype(), DType::F32 | DType::F64)
        || logits.dim(1)? == 0
    {
        return Ok(None);
    }
    let Some(t) = targets_of(logits, targets)? else {
        return Ok(None);
    };
    let logits = logits.contiguous()?;
    count(Kernel::CrossEntropy);
    match logits.dtype() {
        DType::F32 => ce_loss_impl::<f32>(&logits, &t).map(Some),
        _ => ce_loss_impl::<f64>(&logits, &t).map(Some),
    }
}

fn ce_loss_impl<C: Real>(logits: &Tensor, t: &[u32]) -> candle_core::Result<Tensor> {
    let v = logits.dim(1)?;
    slice!(logits, C => ls);
    let mut loss = vec![C::of(0.0); t.len()];
    loss.par_iter_mut()
        .zip(ls.par_chunks(v))
        .zip(t.par_iter())
        .for_each(|((o, l), &t)| {
            let (max, sum) = max_sum(l);
            *o = match l.get(t as usize) {
                Some(&lt) => C::of(sum.to_f64().ln()) - (lt - max),
                None => C::of(f64::NAN),
            };
        });
    Tensor::from_vec(loss, t.len(), logits.device())
}

/// Cross-entropy gradient to logits `(rows, vocab)` (f32, or f64): `(softmax − onehot)·scale`
/// rounded to `dtype` (as the CUDA kernel `ce_grad`), `scale` a `()` tensor in the logits'
/// dtype.
///
/// # Errors
/// [`candle_core::Error`] from candle.
pub(super) fn ce_grad(
    logits: &Tensor,
    targets: &Tensor,
    scale: &Tensor,
    dtype: DType,
) -> candle_core::Result<Option<Tensor>> {
    if !logits.device().is_cpu()
        || logits.rank() != 2
        || !matches!(logits.dtype(), DType::F32 | DType::F64)
        || scale.dtype() != logits.dtype()
        || logits.dim(1)? == 0
    {
        return Ok(None);
    }
    let Some(t) = targets_of(logits, targets)? else {
        return Ok(None);
    };
    let logits = logits.contiguous()?;
    count(Kernel::CrossEntropy);
    macro_rules! go {
        ($C:ty) => {{
            let g = scale.to_scalar::<$C>()?;
            match dtype {
                DType::F32 => ce_grad_impl::<$C, f32>(&logits, &t, g),
                DType::BF16 => ce_grad_impl::<$C, bf16>(&logits, &t, g),
                DType::F16 => ce_grad_impl::<$C, f16>(&logits, &t, g),
                DType::F64 => ce_grad_impl::<$C, f64>(&logits, &t, g),
                _ => return Ok(None),
            }
        }};
    }
    match logits.dtype() {
        DType::F32 => go!(f32).map(Some),
        _ => go!(f64).map(Some),
    }
}

fn ce_grad_impl<C: Real, E: Elem>(logits: &Tensor, t: &[u32], g: C) -> candle_core::Result<Tensor> {
    let v = logits.dim(1)?;
    slice!(logits, C => ls);
    let mut d = vec![E::down(E::C::of(0.0)); ls.len()];
    d.par_chunks_mut(v)
        .zip(ls.par_chunks(v))
        .zip(t.par_iter())
        .for_each(|((d, l), &t)| {
            let (max, sum) = max_sum(l);
            for (j, (d, &x)) in d.iter_mut().zip(l).enumerate() {
                let one = if j == t as usize {
                    C::of(1.0)
                } else {
                    C::of(0.0)
                };
                let p = (x - max).exp() / sum - one;
                *d = E::down(E::C::of((p * g).to_f64()));
            }
        });
    Tensor::from_vec(d, logits.shape(), logits.device())
}
