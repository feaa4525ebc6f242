//! DeepSpeed ZeRO-3's parameter schedule at vramcal's granularity: which parameters are
//! gathered (whole) at each use of a module, and which stay gathered after it. Shared by
//! vramcal's simulated ZeRO-3 rank (`crate::measure::zero3`) and its estimate
//! (`crate::estimate::multi`).
//!
//! Sources (DeepSpeed 0.19.6, `deepspeed/runtime/zero/`):
//! - `partitioned_param_coordinator.py` `fetch_sub_module` / `release_sub_module`: a module's
//!   direct parameters are all-gathered before its forward and its backward and released
//!   after each; until the trace is complete (`reset_step`: the trace recorded by the first
//!   forward and backward is complete when the second forward begins) every module's
//!   parameters are released after use;
//! - `__params_to_release` (trace complete): a parameter is kept gathered when it is used
//!   again by one of the next modules of the trace, walked until `max_reuse_distance`
//!   elements have been traversed (`stage3_max_reuse_distance`, default 1e9); parameters
//!   marked persistent are never released there;
//! - `parameter_offload.py` `mark_persistent_parameters`: parameters of at most
//!   `stage3_param_persistence_threshold` elements (default 1e5) are persistent;
//! - `stage3.py` `step`: `_partition_all_parameters` releases every parameter for the step,
//!   `_post_step` gathers the persistent ones again.
//!
//! vramcal's modules are coarser than DeepSpeed's (which hooks every `nn.Module` with direct
//! parameters): the embedding (with its adapter), each decoder layer (recomputed under
//! activation checkpointing: one use for its recomputation and one for its backward), and the
//! head (final norm, LM head and its adapter; a tied head uses the embedding's weight).
//! Prefetching (`stage3_prefetch_bucket_size`, trace complete) is not modelled: it changes
//! when a parameter arrives ahead of its use, not which stay.

/// `stage3_param_persistence_threshold`'s default (elements): parameters this small or smaller
/// stay gathered (`deepspeed/runtime/zero/config.py`, `pp_int(1e5)`).
pub const PERSISTENCE_THRESHOLD: u64 = 100_000;

/// `stage3_max_reuse_distance`'s default (elements; `config.py`, `pp_int(1e9)`).
pub const MAX_REUSE_DISTANCE: u64 = 1_000_000_000;

/// A module of the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    /// `model.embed_tokens` and its adapter.
    Embed,
    /// `model.layers.{l}`.
    Layer(usize),
    /// `model.norm`, `lm_head` (or the tied embedding) and the head's adapter.
    Head,
}

/// The modules in the order a checkpointed training step uses them (each layer recomputed
/// just before its backward): the embedding, the layers and the head forward; the head's
/// backward; each layer's recomputation and backward, last first; the embedding's backward
/// when `embed_backward` (a trained embedding or adapter).
pub fn trace(layers: usize, embed_backward: bool) -> Vec<Module> {
    trace_with(layers, embed_backward, true)
}

/// [`trace`], with each layer recomputed before its backward only when `recompute`
/// (activation checkpointing).
pub fn trace_with(layers: usize, embed_backward: bool, recompute: bool) -> Vec<Module> {
    let mut t = vec![Module::Embed];
    t.extend((0..layers).map(Module::Layer));
    t.push(Module::Head);
    t.push(Module::Head);
    for l in (0..layers).rev() {
        if recompute {
            t.push(Module::Layer(l));
        }
        t.push(Module::Layer(l));
    }
    if embed_backward {
        t.push(Module::Embed);
    }
    t
}

/// Trace positions of the forward uses: the embedding, layer `l`, the head.
pub fn forward_position(m: Module, layers: usize) -> usize {
    match m {
        Module::Embed => 0,
        Module::Layer(l) => 1 + l,
        Module::Head => layers + 1,
    }
}

/// Trace positions of the backward uses in [`trace`]: the head's backward, layer `l`'s
/// backward (after its recomputation, one position earlier), the embedding's backward.
pub fn backward_position(m: Module, layers: usize) -> usize {
    backward_position_with(m, layers, true)
}

/// [`backward_position`] in [`trace_with`]`(.., recompute)`.
pub fn backward_position_with(m: Module, layers: usize, recompute: bool) -> usize {
    let per = if recompute { 2 } else { 1 };
    match m {
        Module::Head => layers + 2,
        Module::Layer(l) => layers + 2 + per * (layers - l),
        Module::Embed => layers + 3 + per * layers,
    }
}

/// One parameter of the schedule (or several that share their modules and persistence): its
/// elements and the modules that use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// Elements of the whole parameter.
    pub numel: u64,
    /// The modules that use it (two for a tied embedding: [`Module::Embed`] and
    /// [`Module::Head`]).
    pub modules: Vec<Module>,
    /// Whether DeepSpeed marks it persistent.
    pub persistent: bool,
}

impl Param {
    /// One parameter of `numel` elements used by `modules`: persistent when it has at most
    /// [`PERSISTENCE_THRESHOLD`] elements (`mark_persistent_parameters`: `ds_numel <=
    /// param_threshold`).
    pub fn new(numel: u64, modules: Vec<Module>) -> Self {
        Param {
            numel,
            modules,
            persistent: numel <= PERSISTENCE_THRESHOLD,
        }
    }
}

/// The schedule of `params` over a trace ([`trace`]), with the elements each module uses.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The trace.
    pub trace: Vec<Module>,
    /// The parameters.
    pub params: Vec<Param>,
    numel: std::collections::HashMap<Module, u64>,
    max_reuse: u64,
}

impl Schedule {
    /// `params` over `trace`, kept within `max_reuse` elements ([`MAX_REUSE_DISTANCE`] by
    /// default in DeepSpeed).
    pub fn new(trace: Vec<Module>, params: Vec<Param>, max_reuse: u64) -> Self {
        let mut numel = std::collections::HashMap::new();
        for p in &params {
            for m in &p.modules {
                *numel.entry(*m).or_insert(0) += p.numel;
            }
        }
        Schedule {
            trace,
            params,
            numel,
            max_reuse,
        }
    }

    /// Whether parameter `i`, used at trace position `at`, stays gathered after that use once
    /// the trace is complete: persistent, or used again by a module reached before
    /// `max_reuse` elements of the following modules have been traversed (each module's
    /// parameters counted, the one crossing the distance included, as `__params_to_release`
    /// walks them).
    pub fn kept_after(&self, at: usize, i: usize) -> bool {
        let p = &self.params[i];
        if p.persistent {
            return true;
        }
        let mut traversed = 0u64;
        for m in self.trace.iter().skip(at + 1) {
            if traversed >= self.max_reuse {
                break;
            }
            if p.modules.contains(m) {
                return true;
            }
            traversed += self.numel.get(m).copied().unwrap_or(0);
        }
        false
    }

    /// Which parameters are gathered while the module at trace position `at` runs, on a step
    /// whose trace is complete (the second forward on): those it uses, the persistent ones,
    /// and those an earlier use kept ([`Schedule::kept_after`]) with no release since.
    pub fn gathered_at(&self, at: usize) -> Vec<bool> {
        let mut on: Vec<bool> = self.params.iter().map(|p| p.persistent).collect();
        for (k, m) in self.trace.iter().enumerate().take(at + 1) {
            for (i, p) in self.params.iter().enumerate() {
                if p.modules.contains(m) {
                    on[i] = k == at || self.kept_after(k, i);
                }
            }
        }
        on
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(layer: u64, embed: u64) -> Vec<Param> {
        let mut v = vec![Param::new(embed, vec![Module::Embed, Module::Head])];
        for l in 0..4 {
            v.push(Param::new(layer, vec![Module::Layer(l)]));
            v.push(Param::new(10, vec![Module::Layer(l)]));
        }
        v
    }

    #[test]
    fn positions_match_the_trace() {
        let t = trace(4, true);
        assert_eq!(t.len(), 3 * 4 + 4);
        for m in [
            Module::Embed,
            Module::Layer(0),
            Module::Layer(3),
            Module::Head,
        ] {
            assert_eq!(t[forward_position(m, 4)], m);
            assert_eq!(t[backward_position(m, 4)], m);
        }
        assert_eq!(
            t[backward_position(Module::Layer(2), 4) - 1],
            Module::Layer(2)
        );
        let plain = trace_with(4, true, false);
        assert_eq!(plain.len(), 2 * 4 + 4);
        for m in [
            Module::Embed,
            Module::Layer(0),
            Module::Layer(3),
            Module::Head,
        ] {
            assert_eq!(plain[backward_position_with(m, 4, false)], m);
        }
    }

    #[test]
    fn a_small_model_stays_gathered_and_a_large_one_does_not() {
        let t = trace(4, true);
        let head = backward_position(Module::Head, 4);
        // Four layers of 1e6 elements: every later use is within 1e9 elements.
        let small = Schedule::new(t.clone(), model(1_000_000, 1_000_000), MAX_REUSE_DISTANCE);
        assert!(small.gathered_at(head).iter().all(|&g| g));
        // Layers of 4e8 elements: layer 0's next use (its recomputation) lies past 1e9.
        let large = Schedule::new(t, model(400_000_000, 1_000_000), MAX_REUSE_DISTANCE);
        let g = large.gathered_at(head);
        assert!(!g[1], "layer 0 released after its forward");
        assert!(g[7], "layer 3 kept: its recomputation follows the head");
        assert!(g[2] && g[0], "persistent and in use");
        // Released after its backward: nothing uses a layer again in the step.
        let l3 = backward_position(Module::Layer(3), 4);
        assert!(!small.gathered_at(l3 + 1)[7]);
        // Within a smaller distance the same small model releases its first layers.
        let near = Schedule::new(trace(4, true), model(1_000_000, 1_000_000), 3_000_000);
        assert!(!near.gathered_at(head)[1]);
    }
}
