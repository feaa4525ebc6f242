//! One rank of N-way data-parallel training, simulated in one process
//! (`vramcal measure --shard ddp|zero1|zero2 --world-size N --rank R`): the rank holds what
//! that rank holds, and each collective is a local operation on buffers of the collective's
//! size and lifetime. Every rank is given the same micro-batch, so the all-reduced gradient
//! is this rank's own (the average of N equal gradients).
//!
//! What the rank holds, beyond vramcal's one-device step ([`super::step`]):
//!
//! | shard   | from the wrapping / optimizer init         | end of backward                        | optimizer step |
//! |---------|--------------------------------------------|----------------------------------------|----------------|
//! | `ddp`   | gradient buckets: every trainable gradient, in DDP's buckets (first 1 MiB, then 25 MiB; torch `distributed.py` `_DEFAULT_FIRST_BUCKET_BYTES`, `bucket_cap_mb`) | gradients copied into the buckets, all-reduced there, copied back (`gradient_as_bucket_view=False`, torch's default) | every state |
//! | `zero1` | the optimizer's partition of the trainable weights, in their dtype (DeepSpeed's `single_partition_of_fp32_groups`, fp32 there) | full gradients | the gradient partition filled from the full gradients (reduce-scatter), which are then freed; the partition stepped; its weights copied back into the parameters (all-gather) |
//! | `zero2` | as `zero1`                                 | the gradient partition allocated and filled (reduce-scatter), the full gradients freed | the partition stepped, copied back |
//!
//! The partition is DeepSpeed ZeRO-1/2's: the trainable tensors in order as one flat buffer of
//! `T` elements, rank `R` holding elements `[R·⌈T/N⌉, (R+1)·⌈T/N⌉)` ([`partition_len`]; no
//! alignment padding), one piece per tensor it meets. Optimizer states exist for those
//! elements only, so the optimizer must be element-wise (AdamW, SGD).
//!
//! ZeRO-2 on vramcal's step reduces once, at the end of backward: candle's backward returns
//! every gradient at its end, so no bucket can be reduced earlier. DeepSpeed's own ZeRO-2 does
//! the same for any model whose gradients fit its reduce bucket (500M elements by default,
//! `reduce_bucket_size`). Parameters stay whole here: the ranks that gather them are
//! [`super::fsdp`] and [`super::zero3`].
//!
//! The other ranks' parts of the weights are not updated here (their ranks would update
//! them): the step-2 loss is that of a partly updated model.

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::spec::{partition_len, Optimizer, Shard, Sharding, TrainSpec};

/// The most ranks a simulated world takes (as `estimate --gpus`: the largest published
/// training runs use tens of thousands).
pub const MAX_WORLD_SIZE: usize = 1 << 20;

/// DDP's first bucket (bytes): torch `nn/parallel/distributed.py`, `_DEFAULT_FIRST_BUCKET_BYTES`
/// = 1 MiB (`dist._DEFAULT_FIRST_BUCKET_BYTES`).
pub const DDP_FIRST_BUCKET_BYTES: u64 = 1 << 20;

/// DDP's other buckets (bytes): `bucket_cap_mb` = 25 (MiB), torch's default.
pub const DDP_BUCKET_BYTES: u64 = 25 << 20;

/// Checks that vramcal's step can simulate rank `s.rank` of `s` on `device`: `ddp`, `zero1`,
/// `zero2`, `zero3` or `fsdp` (what [`super::fsdp::check`] asks of the last two), at least two ranks, an
/// element-wise optimizer for the sharded states, no offload.
///
/// # Errors
/// [`Error::InvalidValue`] naming the flag (`--shard`, `--world-size`, `--rank`,
/// `--optimizer`, and for `zero3` and `fsdp` `--checkpointing`, `--device`, `--method`,
/// `--save`).
pub fn check(
    s: &Sharding,
    cfg: &crate::config::ModelConfig,
    spec: &TrainSpec,
    device: crate::spec::DeviceChoice,
) -> Result<()> {
    match s.shard {
        Shard::Ddp | Shard::Zero1 | Shard::Zero2 => {}
        Shard::Fsdp => super::fsdp::check(cfg, spec, device)?,
        Shard::Zero3 => super::zero3::check(cfg, spec, device)?,
    }
    if s.gpus < 2 {
        return Err(Error::invalid(
            "--world-size",
            s.gpus,
            "a data-parallel rank needs a world of 2 ranks or more",
        ));
    }
    if s.gpus > MAX_WORLD_SIZE {
        return Err(Error::invalid(
            "--world-size",
            s.gpus,
            format!("at most {MAX_WORLD_SIZE} ranks"),
        ));
    }
    // The rank below the world size (and what else a sharding must be).
    s.validate()?;
    if s.shard != Shard::Ddp
        && !matches!(
            spec.optimizer,
            Optimizer::AdamwTorch | Optimizer::AdamwTorchFused | Optimizer::Sgd
        )
    {
        return Err(Error::invalid(
            "--optimizer",
            spec.optimizer,
            if s.shard == Shard::Fsdp {
                "an FSDP rank steps its rows of each tensor, which needs an element-wise optimizer: adamw_torch, adamw_torch_fused or sgd".to_string()
            } else if s.shard == Shard::Zero3 {
                "a zero3 rank steps its flat partition of each tensor, which needs an element-wise optimizer: adamw_torch, adamw_torch_fused or sgd".to_string()
            } else {
                format!(
                    "a {} rank steps a flat partition cutting across tensors, which needs an element-wise optimizer: adamw_torch, adamw_torch_fused or sgd",
                    s.shard
                )
            },
        ));
    }
    if s.offload != crate::spec::Offload::None {
        return Err(Error::invalid(
            "--offload",
            s.offload,
            "vramcal's step keeps everything on its device",
        ));
    }
    Ok(())
}

/// The piece of trainable tensor `tensor` in this rank's partition: elements
/// `start..start + len` of the flattened tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Index into the trainable tensors.
    pub tensor: usize,
    /// First element (flattened).
    pub start: usize,
    /// Elements.
    pub len: usize,
}

/// The pieces of rank `rank` of `world_size` over tensors of `numels` elements, in order.
pub fn pieces(numels: &[usize], world_size: usize, rank: usize) -> Vec<Piece> {
    let total: u64 = numels.iter().map(|&n| n as u64).sum();
    let p = total.div_ceil(world_size.max(1) as u64);
    let lo = p.saturating_mul(rank as u64).min(total);
    let hi = lo + partition_len(total, world_size, rank);
    let mut out = Vec::new();
    let mut off = 0u64;
    for (i, &n) in numels.iter().enumerate() {
        let (a, b) = (off.max(lo), (off + n as u64).min(hi));
        if a < b {
            out.push(Piece {
                tensor: i,
                start: (a - off) as usize,
                len: (b - a) as usize,
            });
        }
        off += n as u64;
    }
    out
}

/// A DDP bucket being planned: its dtype, its tensors with their offsets (elements), its
/// length (elements).
struct Bucket {
    dtype: DType,
    members: Vec<(usize, usize)>,
    elems: usize,
}

/// A tensor's place in DDP's buckets.
#[derive(Debug, Clone, Copy)]
struct Slot {
    bucket: usize,
    offset: usize,
}

/// One simulated rank: its partition, DDP's buckets.
pub struct Rank {
    sharding: Sharding,
    pieces: Vec<Piece>,
    buckets: Vec<Tensor>,
    slots: Vec<Option<Slot>>,
}

impl Rank {
    /// The rank `s` describes over the trainable tensors `vars` (allocates nothing).
    ///
    /// # Errors
    /// As [`check`] for what it refuses (without the optimizer, checked there).
    pub fn new(s: Sharding, vars: &[Var]) -> Result<Self> {
        let numels: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
        Ok(Rank {
            sharding: s,
            pieces: pieces(&numels, s.gpus, s.rank),
            buckets: Vec::new(),
            slots: vec![None; vars.len()],
        })
    }

    /// Whether the gradients are reduce-scattered at the end of backward (ZeRO-2).
    pub fn scatters_in_backward(&self) -> bool {
        self.sharding.shard == Shard::Zero2
    }

    /// Whether the gradients are reduce-scattered at the optimizer step (ZeRO-1).
    pub fn scatters_at_step(&self) -> bool {
        self.sharding.shard == Shard::Zero1
    }

    /// Elements of this rank's partition.
    pub fn partition_elems(&self) -> u64 {
        self.pieces.iter().map(|p| p.len as u64).sum()
    }

    /// What the wrapping allocates: DDP's gradient buckets, one zeroed buffer per bucket. As
    /// torch's `_compute_bucket_assignment_by_size` does, tensors are taken in reverse order
    /// (the order backward produces their gradients), one dtype per bucket, and a bucket
    /// closes once it reaches its cap (the first 1 MiB, the others 25 MiB).
    ///
    /// # Errors
    /// [`Error::Candle`] from the allocation.
    pub fn wrap(&mut self, vars: &[Var]) -> Result<()> {
        if self.sharding.shard != Shard::Ddp {
            return Ok(());
        }
        // Buckets being filled, one per dtype, and those closed.
        let mut open: Vec<Bucket> = Vec::new();
        let mut closed: Vec<Bucket> = Vec::new();
        for (i, v) in vars.iter().enumerate().rev() {
            let dt = v.dtype();
            let k = match open.iter().position(|b| b.dtype == dt) {
                Some(k) => k,
                None => {
                    open.push(Bucket {
                        dtype: dt,
                        members: Vec::new(),
                        elems: 0,
                    });
                    open.len() - 1
                }
            };
            let b = &mut open[k];
            b.members.push((i, b.elems));
            b.elems += v.elem_count();
            let cap = if closed.iter().all(|c| c.dtype != dt) {
                DDP_FIRST_BUCKET_BYTES
            } else {
                DDP_BUCKET_BYTES
            };
            if (b.elems * dt.size_in_bytes()) as u64 >= cap {
                closed.push(open.remove(k));
            }
        }
        closed.extend(open);
        let device = match vars.first() {
            Some(v) => v.device().clone(),
            None => return Ok(()),
        };
        for b in closed {
            let k = self.buckets.len();
            self.buckets.push(Tensor::zeros(b.elems, b.dtype, &device)?);
            for (i, offset) in b.members {
                self.slots[i] = Some(Slot { bucket: k, offset });
            }
        }
        Ok(())
    }

    /// DDP's construction broadcast of rank 0's parameters (`_sync_module_states` →
    /// `broadcast_coalesced`): flat copies of `buckets` (bytes, in order; 0 for a bucket of one
    /// tensor, broadcast in place), two alive at a time, freed as the next but one begins and
    /// all freed at the end. Every rank holds the same parameters here, so the broadcast's
    /// contents are left out: the buffers are allocated zeroed. Nothing for ZeRO.
    ///
    /// # Errors
    /// [`Error::Candle`] from the allocation.
    pub fn broadcast(&self, buckets: &[u64], device: &candle_core::Device) -> Result<()> {
        if self.sharding.shard != Shard::Ddp {
            return Ok(());
        }
        let mut previous: Option<Tensor> = None;
        for &b in buckets {
            // Issued while the previous one is still in flight; then the previous is done.
            let current = if b > 0 {
                Some(Tensor::zeros(b as usize, DType::U8, device)?)
            } else {
                None
            };
            drop(previous);
            previous = current;
        }
        Ok(())
    }

    /// Bytes of DDP's buckets (0 for ZeRO).
    pub fn bucket_bytes(&self) -> u64 {
        self.buckets
            .iter()
            .map(|b| (b.elem_count() * b.dtype().size_in_bytes()) as u64)
            .sum()
    }

    /// The tensors the optimizer steps: `vars` themselves under DDP; under ZeRO copies of this
    /// rank's pieces (1-D), allocated here.
    ///
    /// # Errors
    /// [`Error::Candle`].
    pub fn optimizer_vars(&self, vars: &[Var]) -> Result<Vec<Var>> {
        if self.sharding.shard == Shard::Ddp {
            return Ok(vars.to_vec());
        }
        self.pieces
            .iter()
            .map(|p| {
                // A new storage always: a piece covering a whole 1-D tensor would otherwise be
                // that tensor (candle's `narrow` and `reshape` of the whole return it).
                let v = vars[p.tensor].as_tensor();
                let part = Var::zeros(p.len, v.dtype(), v.device())?;
                part.slice_set(&v.flatten_all()?.narrow(0, p.start, p.len)?, 0, 0)?;
                Ok(part)
            })
            .collect()
    }

    /// DDP's all-reduce of gradients `grads` (one per trainable tensor): each copied into its
    /// bucket, reduced there (the average of N equal gradients: unchanged), and copied back.
    ///
    /// # Errors
    /// [`Error::Candle`].
    pub fn all_reduce(&self, grads: &mut [Tensor]) -> Result<()> {
        for (i, g) in grads.iter_mut().enumerate() {
            let Some(slot) = self.slots[i] else { continue };
            let bucket = &self.buckets[slot.bucket];
            let n = g.elem_count();
            bucket.slice_set(&g.flatten_all()?.contiguous()?, 0, slot.offset)?;
            let reduced = bucket.narrow(0, slot.offset, n)?;
            if g.is_contiguous() {
                g.flatten_all()?.slice_set(&reduced, 0, 0)?;
            } else {
                *g = reduced.reshape(g.shape())?.copy()?;
            }
        }
        Ok(())
    }

    /// The reduce-scatter of full gradients `full` (one per trainable tensor) into this rank's
    /// gradient partition (one tensor per piece), the full gradients freed as they are read.
    /// Into `acc` when given (gradient accumulation: summed into it, one piece-sized sum at a
    /// time); otherwise the partition is allocated, whole, before the first copy.
    ///
    /// # Errors
    /// [`Error::Candle`].
    pub fn reduce_scatter(
        &self,
        full: Vec<Tensor>,
        acc: Option<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        let fresh = acc.is_none();
        let part = match acc {
            Some(a) => a,
            None => self
                .pieces
                .iter()
                .map(|p| Tensor::zeros(p.len, full[p.tensor].dtype(), full[p.tensor].device()))
                .collect::<candle_core::Result<Vec<_>>>()?,
        };
        let mut full: Vec<Option<Tensor>> = full.into_iter().map(Some).collect();
        for (k, p) in self.pieces.iter().enumerate() {
            let g = full[p.tensor]
                .as_ref()
                .ok_or_else(|| Error::invalid("gradient", p.tensor, "read twice"))?;
            let src = g.flatten_all()?.narrow(0, p.start, p.len)?.contiguous()?;
            if fresh {
                part[k].slice_set(&src, 0, 0)?;
            } else {
                let sum = (&part[k] + &src)?;
                part[k].slice_set(&sum, 0, 0)?;
            }
            // The last piece of a tensor: its full gradient is no longer needed.
            if self.pieces.get(k + 1).is_none_or(|q| q.tensor != p.tensor) {
                full[p.tensor] = None;
            }
        }
        Ok(part)
    }

    /// The all-gather after the step: each stepped piece `parts` (from
    /// [`Rank::optimizer_vars`]) copied back into its parameter in `vars`. Nothing under DDP.
    ///
    /// # Errors
    /// [`Error::Candle`].
    pub fn all_gather(&self, vars: &[Var], parts: &[Var]) -> Result<()> {
        if self.sharding.shard == Shard::Ddp {
            return Ok(());
        }
        for (p, part) in self.pieces.iter().zip(parts) {
            vars[p.tensor]
                .as_tensor()
                .flatten_all()?
                .slice_set(part.as_tensor(), 0, p.start)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_every_element_once() {
        let numels = [5usize, 0, 7, 3, 11];
        for n in 1..=8 {
            let mut seen = vec![0u8; numels.iter().sum()];
            for r in 0..n {
                let ps = pieces(&numels, n, r);
                let len: usize = ps.iter().map(|p| p.len).sum();
                assert_eq!(len as u64, partition_len(26, n, r), "n {n} r {r}");
                for p in ps {
                    let off: usize = numels[..p.tensor].iter().sum();
                    assert!(p.start + p.len <= numels[p.tensor]);
                    for c in &mut seen[off + p.start..off + p.start + p.len] {
                        *c += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "n {n}: {seen:?}");
        }
    }
}
