//! One rank of N-way DeepSpeed ZeRO-3, simulated in one process on the CPU (`vramcal measure
//! --shard zero3 --world-size N --rank R --checkpointing layers`): the rank holds its
//! partition of every parameter, the whole parameters only while ZeRO-3's schedule holds them
//! gathered, and ZeRO-3's flat gradient buffers; each collective is a local operation on
//! buffers of the collective's size and lifetime. Every rank is given the same micro-batch,
//! so the averaged gradient is this rank's own.
//!
//! What the rank holds, as DeepSpeed 0.19.6 does it (`deepspeed/runtime/zero/`):
//!
//! | moment | held beyond the partitions and the states |
//! |--------|--------------------------------------------|
//! | initialization (the `optimizer_init` phase) | each parameter's partition, `⌈numel/N⌉` elements of the flattened tensor (`partition_parameters.py` `_partition_param`: padded to a multiple of N), the whole parameter freed; the flat gradient partition of the trainable parameters (`stage3.py` `grad_partitions_flat_buffer`, zeroed, in their dtype) and the gradient bucket of `reduce_bucket_size` elements (`ipg_buckets[..].buffer`, 5e8 by default), both kept from here on |
//! | a module's forward or backward | its parameters all-gathered before it runs and released after it, unless the schedule keeps them ([`crate::spec::zero3`]: on the first step every one is released; once the trace is complete, those used again within `stage3_max_reuse_distance` elements and the persistent ones, of at most 1e5 elements, stay) |
//! | a module's backward | each trainable parameter's gradient copied into the bucket (the bucket reduced first when it would overflow) and freed (`reduce_independent_p_g_buckets_and_remove_grads`, `__add_grad_to_ipg_bucket`) |
//! | a bucket's reduction, and the end of backward | the reduce-scatter's flat input, every rank's chunk of every gradient in the bucket padded (`coalesced_collectives.py` `reduce_scatter_coalesced`: N·Σ⌈nᵢ/N⌉ elements, none for one tensor divisible by N), this rank's chunks copied into (first micro-batch) or added to the flat gradient partition (`partition_grads`), then freed |
//! | optimizer step | every parameter released (`_partition_all_parameters`); the gradient partition flattened into one new tensor (`_prepare_fp32_grad_for_sub_group`: `flatten(averaged_gradients)`, one sub-group of at most 1e9 elements) and the partitions stepped with it; the persistent parameters gathered again after it (`_post_step`) |
//!
//! The partitions of fp32 weights are the optimizer's parameters themselves, as DeepSpeed
//! shares an fp32 sub-group with its fp32 master (`_create_fp32_partitions`). 16-bit weights
//! are stepped in their dtype here, as the ZeRO-1/2 ranks do ([`super::sharded`]); DeepSpeed
//! steps an fp32 copy of them.
//!
//! vramcal gathers whole decoder layers and the head (final norm and LM head together), where
//! DeepSpeed gathers each `nn.Module`'s direct parameters (each linear layer and norm): a
//! layer's parameters are all gathered while its backward runs here. Prefetching
//! (`stage3_prefetch_bucket_size`) is not simulated, nor the all-gather's flat output buffer
//! beside the parameters it fills (`AllGatherCoalescedHandle.wait`).
//!
//! Only with activation checkpointing of every layer, for the reason the FSDP rank gives
//! ([`super::fsdp`]).

use candle_core::{Tensor, Var};

use super::fsdp::{Sharded, Shards};
use crate::error::{Error, Result};
use crate::model::{Decoder, RootPart, SegmentHooks};
use crate::spec::zero3::{self as schedule, Module};
use crate::spec::Sharding;

/// Where a gradient waits for the bucket's reduction.
enum Slot {
    /// In the bucket, from this element on.
    Bucket(usize),
    /// Larger than the bucket: its own tensor.
    Own(Tensor),
}

/// A simulated ZeRO-3 rank over a [`Decoder`].
pub struct Zero3Rank {
    shards: Shards,
    /// Each sharded tensor as the schedule sees it, in [`Shards::params`] order.
    schedule: schedule::Schedule,
    layers: usize,
    /// Forward passes begun (the trace is complete from the second on).
    forwards: usize,
    /// The flat gradient partition: every trainable tensor's `⌈numel/N⌉` elements.
    grad_buffer: Tensor,
    /// Element offset of each trainable tensor's partition in `grad_buffer`, by
    /// [`Decoder::trainable_vars`] index.
    grad_at: Vec<usize>,
    /// Index into [`Shards::params`] of each trainable tensor, by the same index.
    var_param: Vec<usize>,
    /// The gradient bucket (`reduce_bucket_size` elements).
    bucket: Tensor,
    /// Elements in the bucket, and the gradients waiting there (trainable index, slot).
    bucket_elems: usize,
    waiting: Vec<(usize, Slot)>,
    /// Whether the current step's gradients have been written into the partition yet (the
    /// first reduction of a step copies, later ones add).
    written: Vec<bool>,
}

/// Checks what a simulated ZeRO-3 rank needs: as the FSDP rank ([`super::fsdp::check`]).
///
/// # Errors
/// As [`super::fsdp::check`].
pub fn check(
    cfg: &crate::config::ModelConfig,
    spec: &crate::spec::TrainSpec,
    device: crate::spec::DeviceChoice,
) -> Result<()> {
    super::fsdp::check_gathering(cfg, spec, device, crate::spec::Shard::Zero3)
}

/// The modules that use stored tensor `name` (of decoder layer `layer`), `tied` when the head
/// uses the embedding's weight.
fn modules_of(name: &str, layer: Option<usize>, tied: bool) -> Result<Vec<Module>> {
    Ok(match layer {
        Some(l) => vec![Module::Layer(l)],
        None if name == "model.embed_tokens.weight" && tied => vec![Module::Embed, Module::Head],
        None if name.contains("embed_tokens") => vec![Module::Embed],
        None if name.contains("lm_head") || name == "model.norm.weight" => vec![Module::Head],
        None => {
            return Err(Error::invalid(
                "tensor",
                name,
                "a simulated ZeRO-3 rank places root tensors in the embedding or the head",
            ))
        }
    })
}

impl Zero3Rank {
    /// ZeRO-3's initialization of `model` for rank `s.rank` of `s.gpus`: every stored tensor
    /// partitioned (flat, `⌈numel/N⌉` elements each), the flat gradient partition and the bucket of
    /// `s.reduce_bucket_elements` allocated.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for trainable tensors of two dtypes, an NF4 weight, a root tensor
    /// outside the embedding and the head, nothing trainable, a bucket too large to address;
    /// [`Error::Candle`].
    pub fn new(s: &Sharding, model: &Decoder) -> Result<Self> {
        let (shards, names) = Shards::new(s, model, true)?;
        let tied = !names.iter().any(|n| n == "lm_head.weight");
        let params = shards
            .params
            .iter()
            .zip(&names)
            .map(|(p, name)| {
                Ok(schedule::Param::new(
                    p.numel as u64,
                    modules_of(name, p.layer, tied)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        drop(names);
        let n_vars = model.trainable_vars().len();
        let mut var_param = vec![usize::MAX; n_vars];
        for (i, p) in shards.params.iter().enumerate() {
            if let Some(vi) = p.var_index {
                var_param[vi] = i;
            }
        }
        if var_param.contains(&usize::MAX) {
            return Err(Error::invalid(
                "--shard",
                "zero3",
                "a trainable tensor is not among the stored ones",
            ));
        }
        let mut grad_at = Vec::with_capacity(n_vars);
        let mut total = 0;
        let mut dtype = None;
        for &i in &var_param {
            let p = &shards.params[i];
            grad_at.push(total);
            total += p.shard.elem_count();
            dtype = Some(p.shard.dtype());
        }
        let dtype = dtype.ok_or_else(|| Error::invalid("--shard", "zero3", "nothing trains"))?;
        let device = model.device().clone();
        let bucket_len = usize::try_from(s.reduce_bucket_elements).map_err(|_| {
            Error::invalid(
                "--reduce-bucket-size",
                s.reduce_bucket_elements,
                "too large for this machine",
            )
        })?;
        let grad_buffer = Tensor::zeros(total, dtype, &device)?;
        let bucket = Tensor::zeros(bucket_len, dtype, &device)?;
        let layers = model.config().num_hidden_layers;
        Ok(Zero3Rank {
            schedule: schedule::Schedule::new(
                schedule::trace(layers, model.embedding_trains()),
                params,
                schedule::MAX_REUSE_DISTANCE,
            ),
            layers,
            shards,
            forwards: 0,
            grad_buffer,
            grad_at,
            var_param,
            bucket,
            bucket_elems: 0,
            waiting: Vec::new(),
            written: vec![false; n_vars],
        })
    }

    /// The optimizer's parameters: the trainable partitions, in [`Decoder::trainable_vars`]
    /// order.
    pub fn optimizer_vars(&self) -> Vec<Var> {
        self.shards.optimizer_vars()
    }

    /// Gathers the parameters the module at trace position `at` uses.
    fn fetch(&mut self, at: usize) -> Result<()> {
        let m = self.schedule.trace[at];
        let params = &self.schedule.params;
        self.shards.gather(|i, _| params[i].modules.contains(&m))
    }

    /// Releases the parameters the module at trace position `at` used, but those the schedule
    /// keeps once the trace is complete.
    fn release_after(&mut self, at: usize) -> Result<()> {
        let m = self.schedule.trace[at];
        let complete = self.forwards >= 2;
        let free: Vec<bool> = (0..self.schedule.params.len())
            .map(|i| {
                self.schedule.params[i].modules.contains(&m)
                    && !(complete && self.schedule.kept_after(at, i))
            })
            .collect();
        self.shards.release(|i, _| free[i])
    }

    /// Takes from `grads` the gradients of the trainable tensors `which` selects (by index
    /// into [`Shards::params`]) into the bucket, each freed after its copy; the bucket
    /// reduced first whenever the next would overflow it.
    fn bucket_grads(
        &mut self,
        grads: &mut [Option<Tensor>],
        which: impl Fn(usize) -> bool,
    ) -> Result<()> {
        let mine: Vec<usize> = (0..self.shards.params.len())
            .filter(|&i| self.shards.params[i].var_index.is_some() && which(i))
            .collect();
        let cap = self.bucket.elem_count();
        for i in mine {
            let vi = self.shards.params[i].var_index.expect("trainable");
            let g = grads[vi].take().ok_or_else(|| {
                Error::invalid("gradient", vi, "a trainable tensor received no gradient")
            })?;
            let n = g.elem_count();
            if self.bucket_elems + n > cap && self.bucket_elems > 0 {
                self.reduce_bucket()?;
            }
            let slot = if n <= cap {
                self.bucket
                    .slice_set(&g.flatten_all()?.contiguous()?, 0, self.bucket_elems)?;
                Slot::Bucket(self.bucket_elems)
            } else {
                Slot::Own(g)
            };
            self.waiting.push((vi, slot));
            self.bucket_elems += n;
        }
        Ok(())
    }

    /// The bucket's reduce-scatter: its flat input allocated (every rank's chunk of each
    /// gradient, padded), this rank's chunk of each copied into or added to the gradient
    /// partition, the input freed, the bucket emptied.
    fn reduce_bucket(&mut self) -> Result<()> {
        if self.waiting.is_empty() {
            return Ok(());
        }
        let n = self.shards.n;
        let by_var: Vec<&Sharded> = self
            .var_param
            .iter()
            .map(|&i| &self.shards.params[i])
            .collect();
        let one_divisible =
            self.waiting.len() == 1 && by_var[self.waiting[0].0].numel.is_multiple_of(n);
        let input = if one_divisible {
            None
        } else {
            let total: usize = self
                .waiting
                .iter()
                .map(|(vi, _)| by_var[*vi].shard.elem_count() * n)
                .sum();
            Some(Tensor::zeros(
                total,
                self.bucket.dtype(),
                self.bucket.device(),
            )?)
        };
        for (vi, slot) in std::mem::take(&mut self.waiting) {
            let p = by_var[vi];
            if p.len == 0 {
                continue;
            }
            let src = match &slot {
                Slot::Bucket(at) => self.bucket.narrow(0, at + p.start, p.len)?,
                Slot::Own(g) => g.flatten_all()?.narrow(0, p.start, p.len)?,
            };
            let at = self.grad_at[vi];
            if self.written[vi] {
                let sum = (self.grad_buffer.narrow(0, at, p.len)? + &src)?;
                self.grad_buffer.slice_set(&sum, 0, at)?;
            } else {
                self.grad_buffer.slice_set(&src.contiguous()?, 0, at)?;
                self.written[vi] = true;
            }
        }
        drop(input);
        self.bucket_elems = 0;
        Ok(())
    }

    /// The end of backward: the gradients left in `grads` put in the bucket and the last
    /// bucket reduced (`independent_gradient_partition_epilogue`).
    ///
    /// # Errors
    /// [`Error::InvalidValue`] if a gradient is left; [`Error::Candle`].
    pub fn finish_backward(&mut self, mut grads: Vec<Option<Tensor>>) -> Result<()> {
        // Those the modules' hooks left (none in a dense decoder).
        let left: Vec<bool> = self
            .shards
            .params
            .iter()
            .map(|p| p.var_index.is_some_and(|vi| grads[vi].is_some()))
            .collect();
        self.bucket_grads(&mut grads, |i| left[i])?;
        self.reduce_bucket()?;
        if let Some(i) = grads.iter().position(Option::is_some) {
            return Err(Error::invalid("gradient", i, "left unreduced"));
        }
        Ok(())
    }

    /// The optimizer step's start: every parameter released, the gradient partition
    /// flattened into one new tensor, returned as one view per trainable tensor (in
    /// [`Zero3Rank::optimizer_vars`] order).
    ///
    /// # Errors
    /// [`Error::Candle`].
    pub fn begin_step(&mut self) -> Result<Vec<Tensor>> {
        self.shards.release(|_, _| true)?;
        let flat = self.grad_buffer.copy()?;
        let grads = self
            .var_param
            .iter()
            .zip(&self.grad_at)
            .map(|(&i, &at)| flat.narrow(0, at, self.shards.params[i].shard.elem_count()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(grads)
    }

    /// The optimizer step's end: the persistent parameters gathered again, the next step's
    /// first reduction to copy.
    ///
    /// # Errors
    /// [`Error::Candle`].
    pub fn end_step(&mut self) -> Result<()> {
        self.written.iter_mut().for_each(|w| *w = false);
        let params = &self.schedule.params;
        self.shards.gather(|i, _| params[i].persistent)
    }
}

/// The schedule's module for a root part.
fn module_of(part: RootPart) -> Module {
    match part {
        RootPart::Embedding => Module::Embed,
        RootPart::Head => Module::Head,
    }
}

impl Zero3Rank {
    /// Trace position of module `m`'s forward, or of its backward.
    fn position(&self, m: Module, backward: bool) -> usize {
        if backward {
            schedule::backward_position(m, self.layers)
        } else {
            schedule::forward_position(m, self.layers)
        }
    }

    /// Module `m` has run: in backward (`grads` given) its trainable tensors' gradients put
    /// in the bucket (a tied weight's at the embedding's backward, when its gradient is whole);
    /// then its parameters released as the schedule says.
    fn module_done(&mut self, m: Module, grads: Option<&mut [Option<Tensor>]>) -> Result<()> {
        let backward = grads.is_some();
        if let Some(g) = grads {
            let embed_later =
                m == Module::Head && self.schedule.trace.last() == Some(&Module::Embed);
            let only: Vec<bool> = self
                .schedule
                .params
                .iter()
                .map(|p| {
                    p.modules.contains(&m) && !(embed_later && p.modules.contains(&Module::Embed))
                })
                .collect();
            self.bucket_grads(g, |i| only[i])?;
        }
        self.release_after(self.position(m, backward))
    }
}

impl SegmentHooks for Zero3Rank {
    fn before_root(&mut self, part: RootPart, backward: bool) -> Result<()> {
        let m = module_of(part);
        if m == Module::Embed && !backward {
            self.forwards += 1;
        }
        self.fetch(self.position(m, backward))
    }

    fn after_root(&mut self, part: RootPart, grads: Option<&mut [Option<Tensor>]>) -> Result<()> {
        self.module_done(module_of(part), grads)
    }

    fn before(&mut self, first: usize, _n: usize, backward: bool) -> Result<()> {
        self.fetch(self.position(Module::Layer(first), backward))
    }

    fn after(
        &mut self,
        first: usize,
        _n: usize,
        grads: Option<&mut [Option<Tensor>]>,
    ) -> Result<()> {
        self.module_done(Module::Layer(first), grads)
    }
}
