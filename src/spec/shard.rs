//! Data-parallel training: PyTorch DDP, DeepSpeed ZeRO stages 1–3 and PyTorch FSDP (full
//! sharding, as FSDP2's `fully_shard` does it), and CPU offload.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Result};

/// How training state is spread across data-parallel GPUs: replicated (DDP), or sharded by
/// ZeRO stage (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
/// Parameter Models", §5) or by FSDP, which shards what ZeRO-3 does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shard {
    /// PyTorch DistributedDataParallel: nothing sharded; every rank keeps everything, plus
    /// DDP's gradient buckets.
    Ddp,
    /// Optimizer states sharded.
    Zero1,
    /// Optimizer states and gradients sharded.
    Zero2,
    /// Optimizer states, gradients and parameters sharded (DeepSpeed).
    Zero3,
    /// PyTorch FSDP (FSDP2's `fully_shard`, full sharding): what ZeRO-3 shards, without
    /// DeepSpeed's buffers, with FSDP2's own (the unsharded root, reduce-scatter buffers, a
    /// prefetched layer; [`crate::estimate::multi::Sharded::fsdp_root`]).
    Fsdp,
}

impl Shard {
    /// Name as on the command line: `ddp`, `zero1`, `zero2`, `zero3` or `fsdp`.
    pub fn label(self) -> &'static str {
        match self {
            Shard::Ddp => "ddp",
            Shard::Zero1 => "zero1",
            Shard::Zero2 => "zero2",
            Shard::Zero3 => "zero3",
            Shard::Fsdp => "fsdp",
        }
    }

    /// Whether parameters are sharded (ZeRO-3, FSDP).
    pub fn shards_parameters(self) -> bool {
        matches!(self, Shard::Zero3 | Shard::Fsdp)
    }
}

impl FromStr for Shard {
    type Err = Error;

    /// Parses `ddp`, `zero1`, `zero2`, `zero3` or `fsdp`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`].
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ddp" => Ok(Shard::Ddp),
            "zero1" => Ok(Shard::Zero1),
            "zero2" => Ok(Shard::Zero2),
            "zero3" => Ok(Shard::Zero3),
            "fsdp" => Ok(Shard::Fsdp),
            _ => Err(Error::invalid(
                "--shard",
                s,
                "expected ddp, zero1, zero2, zero3 or fsdp",
            )),
        }
    }
}

impl fmt::Display for Shard {
    /// The label [`FromStr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Where ZeRO-Offload / FSDP CPU offload puts training state (the reference-row `offload`
/// column of `../shared/cases/README.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum Offload {
    /// Everything on the GPU.
    #[default]
    #[serde(rename = "none")]
    None,
    /// The optimizer on the host: fp32 master partition, moments and the fp32 gradient
    /// partition in host RAM, the step run by the CPU (DeepSpeed `offload_optimizer`).
    #[serde(rename = "optimizer")]
    Optimizer,
    /// The optimizer and the parameter partitions on the host (DeepSpeed ZeRO-3
    /// `offload_param` + `offload_optimizer`; FSDP `CPUOffload(offload_params=True)`).
    #[serde(rename = "optimizer+params")]
    OptimizerParams,
}

impl Offload {
    /// Name as on the command line and in reference rows.
    pub fn label(self) -> &'static str {
        match self {
            Offload::None => "none",
            Offload::Optimizer => "optimizer",
            Offload::OptimizerParams => "optimizer+params",
        }
    }
}

impl FromStr for Offload {
    type Err = Error;

    /// Parses `none`, `optimizer` or `optimizer+params`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`].
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Offload::None),
            "optimizer" => Ok(Offload::Optimizer),
            "optimizer+params" => Ok(Offload::OptimizerParams),
            _ => Err(Error::invalid(
                "--offload",
                s,
                "expected none, optimizer or optimizer+params",
            )),
        }
    }
}

impl fmt::Display for Offload {
    /// The label [`FromStr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// DeepSpeed's default `reduce_bucket_size` (elements): `deepspeed/runtime/zero/config.py`,
/// `ZERO_OPTIMIZATION_REDUCE_BUCKET_SIZE_DEFAULT = 500_000_000`.
pub const DEEPSPEED_REDUCE_BUCKET_SIZE: u64 = 500_000_000;

/// Data-parallel training across GPUs: the scheme, the GPUs, what is offloaded to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sharding {
    /// ZeRO stage or FSDP.
    pub shard: Shard,
    /// Data-parallel GPUs (ranks), at least 1.
    pub gpus: usize,
    /// What lives in host RAM.
    pub offload: Offload,
    /// DeepSpeed's gradient reduce bucket (`reduce_bucket_size`, elements): ZeRO-2/3 keep one
    /// buffer of this many gradient elements through backward.
    pub reduce_bucket_elements: u64,
    /// GPUs per node, for host RAM per node under offload (at most `gpus`).
    pub gpus_per_node: usize,
    /// The rank whose share is counted (0-based, below `gpus`). Partitions are
    /// [`partition_len`] long: rank 0 holds the largest, the last ranks fewer elements (or
    /// none). 0 unless a simulated rank (`vramcal measure --rank`) says otherwise.
    pub rank: usize,
}

/// Elements of a flat buffer of `total` elements that rank `rank` of `world_size` holds:
/// `⌈total / world_size⌉`, fewer (or none) for the last ranks (DeepSpeed ZeRO-1/2's flat
/// partition, `stage_1_and_2.py` `get_data_parallel_partitions`, without its alignment padding).
/// `world_size` 0 counts as 1.
pub fn partition_len(total: u64, world_size: usize, rank: usize) -> u64 {
    let p = total.div_ceil(world_size.max(1) as u64);
    total.saturating_sub(p.saturating_mul(rank as u64)).min(p)
}

impl Sharding {
    /// `shard` over `gpus`, nothing offloaded, DeepSpeed's default bucket, one node.
    pub fn new(shard: Shard, gpus: usize) -> Self {
        Sharding {
            shard,
            gpus,
            offload: Offload::None,
            reduce_bucket_elements: DEEPSPEED_REDUCE_BUCKET_SIZE,
            gpus_per_node: gpus,
            rank: 0,
        }
    }

    /// Elements of `total` this rank holds ([`partition_len`]).
    pub fn part(&self, total: u64) -> u64 {
        partition_len(total, self.gpus, self.rank)
    }

    /// Refuses combinations no stack runs.
    ///
    /// # Errors
    /// [`Error::InvalidValue`]: zero GPUs; more than one GPU without offload being the same as
    /// none (`--gpus 1` needs `--offload`: ZeRO-Offload's one-GPU case); parameters offloaded
    /// below ZeRO-3; FSDP offloading the optimizer alone (its `CPUOffload` moves parameters,
    /// gradients and the step together); `gpus_per_node` of 0 or above `gpus`; a rank not
    /// below `gpus`.
    pub fn validate(&self) -> Result<()> {
        if self.gpus == 0 {
            return Err(Error::invalid("--gpus", 0, "must be at least 1"));
        }
        if self.rank >= self.gpus {
            return Err(Error::invalid(
                "--rank",
                self.rank,
                format!(
                    "ranks are numbered from 0 to the world size less one ({})",
                    self.gpus - 1
                ),
            ));
        }
        if self.gpus < 2 && self.shard == Shard::Ddp {
            return Err(Error::invalid(
                "--gpus",
                self.gpus,
                "--shard ddp replicates the model on data-parallel GPUs: give --gpus 2 or more",
            ));
        }
        if self.gpus < 2 && self.offload == Offload::None {
            return Err(Error::invalid(
                "--gpus",
                self.gpus,
                format!(
                    "--shard {} splits state across data-parallel GPUs: give --gpus 2 or more (one GPU shards nothing unless --offload moves state to the host)",
                    self.shard
                ),
            ));
        }
        match (self.shard, self.offload) {
            (Shard::Ddp, o) if o != Offload::None => {
                return Err(Error::invalid(
                    "--offload",
                    o,
                    "DDP keeps every rank's state on its GPU: offload needs --shard zero1, zero2, zero3 or fsdp",
                ))
            }
            (Shard::Zero1 | Shard::Zero2, Offload::OptimizerParams) => {
                return Err(Error::invalid(
                    "--offload",
                    "optimizer+params",
                    format!(
                        "parameters are offloaded with ZeRO-3 or FSDP only, not {}: give --offload optimizer or --shard zero3",
                        self.shard
                    ),
                ))
            }
            (Shard::Fsdp, Offload::Optimizer) => {
                return Err(Error::invalid(
                    "--offload",
                    "optimizer",
                    "FSDP's CPUOffload moves parameters, gradients and the optimizer step together: give --offload optimizer+params",
                ))
            }
            _ => {}
        }
        if self.gpus_per_node == 0 || self.gpus_per_node > self.gpus {
            return Err(Error::invalid(
                "--gpus-per-node",
                self.gpus_per_node,
                format!(
                    "must be between 1 and the data-parallel GPUs (--gpus or --world-size, {})",
                    self.gpus
                ),
            ));
        }
        Ok(())
    }

    /// Whether DeepSpeed's ZeRO runs it (not DDP or FSDP).
    pub fn deepspeed(&self) -> bool {
        matches!(self.shard, Shard::Zero1 | Shard::Zero2 | Shard::Zero3)
    }
}
