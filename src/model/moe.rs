//! Mixtral's sparse mixture-of-experts MLP in vramcal's own step (transformers 5.24
//! `models/mixtral/modeling_mixtral.py`, `MixtralSparseMoeBlock`, and `integrations/moe.py`,
//! `grouped_mm_experts_forward`): a router `mlp.gate` `(E, h)` scores every token; the softmax
//! of its logits (in f32) picks the top `k` of `E` experts per token, whose probabilities,
//! renormalised to sum to 1, weight the experts' outputs; each expert is a SwiGLU MLP
//! (`silu(x·Wgᵀ) ⊙ (x·Wuᵀ) · Wdᵀ`).
//!
//! As transformers does, the `S = N·k` (token, expert) pairs are sorted by expert and the
//! tokens gathered once (`(S, h)`, the per-expert token buffers); each expert runs on its
//! contiguous rows of that buffer, in the weights' dtype (`grouped_mm` is outside autocast and
//! casts its input to the weights' dtype); the outputs, concatenated in the same order, are
//! scaled by their f32 routing weights and summed back per token in f32 (transformers: an
//! inverse permutation and a sum over the `k` slots; here one `index_add`), cast once to the
//! residual stream's dtype. The routing choice itself (`topk`) has no gradient; the weights
//! do, through the softmax, as in PyTorch.
//!
//! The checkpoint's 3-D expert tensors (`mlp.experts.gate_up_proj` `(E, 2i, h)`, gate rows
//! first, and `mlp.experts.down_proj` `(E, h, i)`) are split into one `(i, h)`/`(i, h)`/`(h, i)`
//! triple per expert on loading, so each expert's gradient is its own tensor (a gradient of a
//! slice of one 3-D parameter would be materialised at the whole stack's size per expert), and
//! stacked back on saving.

use candle_core::{DType, Device, Tensor, Var};

use super::linear::{cast, linear, Linear};
use super::ForwardCtx;
use crate::error::{Error, Result};
use crate::ops;

/// One expert: a SwiGLU MLP with HF's `gate_proj`/`up_proj`/`down_proj` roles.
#[derive(Debug)]
pub struct Expert {
    /// Gate `(i, h)`: rows `0..i` of `gate_up_proj[e]`.
    pub gate: Linear,
    /// Up `(i, h)`: rows `i..2i` of `gate_up_proj[e]`.
    pub up: Linear,
    /// Down `(h, i)`: `down_proj[e]`; under PEFT's `all-linear` its LoRA adapter is this
    /// expert's share of PEFT's `down_proj` `ParamWrapper` ([`Linear::lora`], rank `r`).
    pub down: Linear,
    /// This expert's share of PEFT's `gate_up_proj` adapter under `all-linear`, `None`
    /// otherwise.
    pub gate_up_lora: Option<GateUpLora>,
}

/// One expert's share of PEFT's LoRA on the fused 3-D `gate_up_proj` `(E, 2i, h)` (PEFT 0.21.2
/// `tuners/lora/layer.py` `ParamWrapper`, its in/out features swapped for the `(E, out, in)`
/// layout; `utils/transformers_weight_conversion.py` doubles rank and alpha because `w1` and
/// `w3` are fused): PEFT's `lora_A` `(2r·E, h)` holds expert `e`'s `A` in rows `e·2r..(e+1)·2r`,
/// its `lora_B` `(2i, 2r·E)` expert `e`'s `B` in columns `ρ·E + e` (`ρ < 2r`), and the expert's
/// weight is `W_e + (2α/2r)·B_e·A_e` (`get_delta_weight`: `einsum("o r e, e r i -> e o i")`).
/// One shared `A`; `B`'s gate rows and up rows are kept apart, as the weights are.
#[derive(Debug, Clone)]
pub struct GateUpLora {
    /// `A_e` `(2r, h)`.
    pub a: Var,
    /// Rows `0..i` of `B_e`, `(i, 2r)`: the gate's.
    pub b_gate: Var,
    /// Rows `i..2i` of `B_e`, `(i, 2r)`: the up projection's.
    pub b_up: Var,
    /// `2α / 2r` = `α / r`.
    pub scale: f64,
}

impl GateUpLora {
    /// A fresh share: `A_e ~ U(−1/√h, 1/√h)` (PEFT's `kaiming_uniform_(a=√5)` on `lora_A`, whose
    /// fan-in is `h`), `B_e = 0`; `r` is the user's rank (doubled here).
    ///
    /// # Errors
    /// [`Error::Candle`].
    pub fn new(
        h: usize,
        i: usize,
        cfg: &crate::spec::LoraConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        Ok(GateUpLora {
            a: super::linear::kaiming_a(2 * cfg.r, h, dtype, device, seed)?,
            b_gate: Var::zeros((i, 2 * cfg.r), dtype, device)?,
            b_up: Var::zeros((i, 2 * cfg.r), dtype, device)?,
            scale: cfg.scale(),
        })
    }

    /// Elements of `A_e`, `B_e`.
    pub fn elem_count(&self) -> usize {
        self.a.elem_count() + self.b_gate.elem_count() + self.b_up.elem_count()
    }
}

/// A Mixtral sparse mixture-of-experts block.
#[derive(Debug)]
pub struct MoeBlock {
    /// The router `mlp.gate` `(E, h)` (no bias).
    pub gate: Linear,
    /// The `E` experts.
    pub experts: Vec<Expert>,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
}

/// The routing of one forward: `(token, slot)` pairs sorted by expert.
struct Routing {
    /// Token index of each sorted pair, `(S,)` u32.
    tokens: Tensor,
    /// `token·k + slot` of each sorted pair (its routing weight's index), `(S,)` u32.
    slots: Tensor,
    /// Pairs per expert, in expert order (they sum to `S`).
    counts: Vec<usize>,
    /// The chosen experts `(N, k)` u32.
    chosen: Tensor,
}

/// The top `k` of each row of `probs` `(N, E)` (largest first; equal values by lower index,
/// as a stable sort gives) and the pairs sorted by expert (by token within an expert).
fn route(probs: &[Vec<f32>], k: usize, experts: usize, device: &Device) -> Result<Routing> {
    let n = probs.len();
    let mut chosen = Vec::with_capacity(n * k);
    let mut per_expert: Vec<Vec<(u32, u32)>> = vec![Vec::new(); experts];
    for (tok, row) in probs.iter().enumerate() {
        if row.iter().any(|p| !p.is_finite()) {
            return Err(Error::invalid(
                "router",
                format!("token {tok}"),
                "routing probabilities are not finite (the activations diverged)",
            ));
        }
        let mut order: Vec<usize> = (0..experts).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        for (slot, &e) in order.iter().take(k).enumerate() {
            chosen.push(e as u32);
            per_expert[e].push((tok as u32, (tok * k + slot) as u32));
        }
    }
    let counts = per_expert.iter().map(Vec::len).collect();
    let (tokens, slots): (Vec<u32>, Vec<u32>) = per_expert.into_iter().flatten().unzip();
    let s = tokens.len();
    Ok(Routing {
        tokens: Tensor::from_vec(tokens, s, device)?,
        slots: Tensor::from_vec(slots, s, device)?,
        counts,
        chosen: Tensor::from_vec(chosen, (n, k), device)?,
    })
}

/// `softmax` over the last dimension composed of differentiable ops (candle 0.11's fused
/// `softmax_last_dim` has no backward).
fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(1)?;
    Ok(e.broadcast_div(&sum)?)
}

impl MoeBlock {
    /// `xn` `(N, h)` (the post-attention norm's output, in the weights' dtype) → `(N, h)` in
    /// f32 (f64 for f64 models): the caller casts it to the residual stream's dtype.
    /// `salt` is the layer's first dropout salt (PEFT refuses dropout on the router's and the
    /// experts' adapters: none is applied there).
    ///
    /// # Errors
    /// [`Error::Candle`]; [`Error::InvalidValue`] when the routing probabilities are not finite.
    pub fn forward(&self, xn: &Tensor, ctx: ForwardCtx, salt: u64) -> Result<Tensor> {
        let (n, h) = xn.dims2()?;
        let compute = self.gate.dtype;
        let f = ops::compute_dtype(compute);
        let k = self.top_k;
        // The router in the compute dtype (autocast's `F.linear`), its softmax in f32
        // (`router_logits.float()`; f64 models stay in f64).
        let logits = self
            .gate
            .forward(&cast(xn, compute)?, ctx, salt)?
            .to_dtype(f)?; // (N, E)
        let probs = softmax(&logits)?; // (N, E) f32
        let r = route(
            &probs.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?,
            k,
            self.experts.len(),
            xn.device(),
        )?;
        let top = probs.gather(&r.chosen, 1)?; // (N, k)
        let weights = top.broadcast_div(&top.sum_keepdim(1)?)?; // (N, k), rows sum to 1
        let sorted_weights = weights
            .flatten_all()?
            .index_select(&r.slots, 0)?
            .unsqueeze(1)?; // (S, 1) f32
        let gathered = xn.index_select(&r.tokens, 0)?; // (S, h): the experts' token buffers
        let mut outs = Vec::with_capacity(self.experts.len());
        let mut start = 0;
        for (e, (ex, &c)) in self.experts.iter().zip(&r.counts).enumerate() {
            if c == 0 {
                continue;
            }
            let xe = gathered.narrow(0, start, c)?;
            let salt = salt.wrapping_add(8 + e as u64);
            let mut g = ex.gate.forward(&xe, ctx, salt)?; // (c, i)
            let mut u = ex.up.forward(&xe, ctx, salt)?; // (c, i)
            if let Some(l) = &ex.gate_up_lora {
                // PEFT adds `s·B_e·A_e` to the expert's weight; the same product, factored.
                let dt = ex.gate.dtype;
                let t = linear(&cast(&xe, dt)?, &cast(&l.a, dt)?)?; // (c, 2r)
                g = (g + (linear(&t, &cast(&l.b_gate, dt)?)? * l.scale)?)?;
                u = (u + (linear(&t, &cast(&l.b_up, dt)?)? * l.scale)?)?;
            }
            outs.push(ex.down.forward(&ops::swiglu(&g, &u)?, ctx, salt)?); // (c, h)
            start += c;
        }
        let y = Tensor::cat(&outs, 0)?.to_dtype(f)?; // (S, h) f32
        let y = y.broadcast_mul(&sorted_weights)?;
        let zero = Tensor::zeros((n, h), f, xn.device())?;
        Ok(zero.index_add(&r.tokens, &y, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each token's top two, largest first, ties to the lower index; pairs grouped by expert.
    #[test]
    fn routes_the_top_k_sorted_by_expert() {
        let p = vec![
            vec![0.1, 0.5, 0.3, 0.1],
            vec![0.4, 0.1, 0.1, 0.4],
            vec![0.2, 0.2, 0.5, 0.1],
        ];
        let r = route(&p, 2, 4, &Device::Cpu).unwrap();
        assert_eq!(
            r.chosen.to_vec2::<u32>().unwrap(),
            vec![vec![1, 2], vec![0, 3], vec![2, 0]]
        );
        assert_eq!(r.counts, vec![2, 1, 2, 1]);
        assert_eq!(r.tokens.to_vec1::<u32>().unwrap(), vec![1, 2, 0, 0, 2, 1]);
        assert_eq!(r.slots.to_vec1::<u32>().unwrap(), vec![2, 5, 0, 1, 4, 3]);
        assert!(route(&[vec![f32::NAN, 0.0]], 1, 2, &Device::Cpu).is_err());
    }
}
