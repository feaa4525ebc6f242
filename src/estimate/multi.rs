//! More than one GPU, on paper: per-GPU memory under ZeRO/FSDP sharding and host RAM under
//! CPU offload, and a device map that places whole decoder layers on devices for loading or
//! inference.

use serde::Serialize;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::spec::{Offload, Optimizer, Shard, Sharding, TrainSpec};

/// Per-GPU bytes of the sharded parts, and the host RAM of one rank under offload. Only
/// trainable parameters have gradients and optimizer states, so only they are counted there
/// (DeepSpeed's own estimators also count frozen parameters there, a known complaint); with
/// ZeRO-3 and FSDP every parameter is sharded and gathered around its use (FSDP: one layer at
/// a time and the next prefetched; ZeRO-3: what DeepSpeed's schedule holds at each moment).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sharded {
    /// Weights held per GPU at every moment (bytes): under ZeRO-3/FSDP the shards, with one
    /// gathered layer (the torch profiles' FSDP, offloaded ZeRO-3); DeepSpeed ZeRO-3's
    /// gathered and persistent parameters count at their moments instead
    /// ([`Sharded::head_extra`], [`Sharded::layer_extra`], [`Sharded::end_extra`]).
    pub weights: u64,
    /// Gradients per GPU through backward (bytes): 0 where ZeRO-Offload moves each reduced
    /// partition to the host; for vramcal's ZeRO-3 rank only a tied embedding's whole
    /// gradient, waiting from the head's backward to the embedding's (the rest pass through
    /// the bucket into [`Sharded::grad_partition`]).
    pub gradients: u64,
    /// Optimizer states per GPU (bytes; 0 when offloaded).
    pub optimizer_states: u64,
    /// DDP's gradient buckets (a copy of every trainable gradient, alive from wrapping on) or
    /// DeepSpeed's gradient reduce bucket (bytes), alive through backward (`stage_1_and_2.py`
    /// `backward`: `ipg_buffer` of `reduce_bucket_size` elements, one without `overlap_comm`;
    /// stage 3's `__ipg_bucket_flat_buffer`, kept to the step); 0 for FSDP.
    pub reduce_bucket: u64,
    /// Gradient bytes on the GPU at the optimizer step: under DeepSpeed ZeRO-1/2 the flat fp32
    /// gradient partition its step builds (`stage_1_and_2.py` `step`: `flatten(averaged_gradients)`
    /// `.to(fp32)`, the other ranks' gradients and the 16-bit partition dropped), under ZeRO-3
    /// the 16-bit partition, the bucket and one fp32 sub-group (vramcal's rank: the partition,
    /// the bucket and the partition's flat copy); under FSDP the gradient shards; 0 when the
    /// step runs on the host.
    pub step_gradients: u64,
    /// FSDP's root module (the embedding, final norm and head) unsharded from the forward to
    /// the end of backward, with its unsharded gradients, and one layer's unsharded gradients
    /// with its reduce-scatter input and the previous layer's, and the next layer's parameters
    /// all-gathered ahead (bytes): FSDP2 does not reshard the root after forward
    /// (`_fsdp_state.py` `_lazy_init`: the root's `post_forward_mesh_info` is `None`) and
    /// reduces its gradients last; 0 otherwise.
    pub fsdp_root: u64,
    /// Bytes alive at the head's backward only, beyond the rest (counted at that moment): the
    /// parameters DeepSpeed ZeRO-3's schedule holds gathered there (vramcal's simulated rank,
    /// `crate::measure::zero3`, and the torch profiles' ZeRO-3 with dense weights); 0
    /// otherwise.
    pub head_extra: u64,
    /// vramcal's simulated ZeRO-3 rank's flat gradient partition, held from initialization
    /// through the step (bytes, beside [`Sharded::reduce_bucket`]); 0 otherwise.
    pub grad_partition: u64,
    /// Bytes alive at a layer's backward only, beyond the rest (counted at that moment): the
    /// parameters ZeRO-3's schedule holds gathered there (both profiles; vramcal's rank adds
    /// the layer's whole gradients); vramcal's simulated FSDP rank's gathered layer and the
    /// next one prefetched, the layer's unsharded gradients and the previous layer's
    /// reduce-scatter input (`crate::measure::fsdp`); 0 otherwise.
    pub layer_extra: u64,
    /// Bytes alive at the end of backward only, beyond the rest (counted at that moment):
    /// vramcal's simulated FSDP rank's last layer's reduce-scatter input, kept until the
    /// root's reduce-scatter begins; the parameters ZeRO-3's schedule holds gathered at the
    /// embedding's backward; 0 otherwise.
    pub end_extra: u64,
    /// What is alive, beyond the weights and states held, once backward has returned and the
    /// rank reduce-scatters (vramcal's simulated ranks): ZeRO-2's full gradients and its
    /// partition of them; FSDP's root, its unsharded gradients and their reduce-scatter input,
    /// beside the layers' sharded gradients; ZeRO-3's bucket, gradient partition, persistent
    /// parameters and its largest reduction's input (with what a reduction inside backward
    /// holds beside it). Empty otherwise.
    pub scatter: Vec<(String, u64, String)>,
    /// Gradient bytes alive in backward with gradient accumulation (the earlier micro-batches'
    /// sum beside the one being built), where the rank keeps them otherwise than the one-device
    /// step's two full sets: vramcal's ZeRO-2 rank (its partition beside the full gradients),
    /// its FSDP rank (the sharded gradients beside the root's unsharded ones), its ZeRO-3 rank
    /// (a tied embedding's gradient; the rest sum into the gradient partition). `None`: as one
    /// device.
    pub accumulated_gradients: Option<u64>,
    /// Gradient bytes allocated at the very end of backward (counted at that moment only):
    /// vramcal's simulated ZeRO-2 rank allocates its gradient partition there and fills it
    /// from the full gradients (`crate::measure::sharded`); 0 otherwise.
    pub end_gradients: u64,
    /// Whether the gradients are one buffer held from the start (DeepSpeed ZeRO-3's
    /// `grad_partitions_flat_buffer`, `stage3.py`), not built up in backward.
    pub gradients_persistent: bool,
    /// Whether the optimizer step runs on the host (no GPU step transient).
    pub host_step: bool,
    /// The optimizer step's transient on the GPU (bytes) where the sharding sets it: 0 when
    /// the step runs on the host, torch's foreach AdamW's one buffer of the fp32 partition
    /// under DeepSpeed (for-loop's two: `--torch-adamw for-loop`, or the CPU's default);
    /// `None`: the unsharded transient scaled by the share of states.
    pub step_transient: Option<u64>,
    /// Host RAM one rank needs for what is offloaded (bytes): fp32 master partition, moments
    /// and fp32 gradient partition (DeepSpeedCPUAdam), plus the parameter partitions with
    /// `optimizer+params`; 0 without offload.
    pub host_bytes: u64,
}

/// Applies `s` to whole-model `weights`, `gradients`, `states` (bytes) of `spec` on `cfg`.
/// `torch_stack` (the torch profiles) adds DDP's gradient buckets and DeepSpeed's reduce
/// bucket, fp32 partitions of the weights and the moments (DeepSpeed steps fp32 partitions
/// whatever the recipe) and flat fp32 gradient partition; without it the counts are of
/// vramcal's simulated ranks (`crate::measure::sharded`, `fsdp`, `zero3`).
///
/// # Errors
/// [`Error::InvalidValue`] from [`Sharding::validate`]; offload with an optimizer DeepSpeed's
/// and FSDP's CPU step do not run (anything but AdamW); a bucket whose bytes overflow.
pub fn shard(
    cfg: &ModelConfig,
    spec: &TrainSpec,
    s: &Sharding,
    torch_stack: bool,
    weights: u64,
    gradients: u64,
    states: u64,
) -> Result<Sharded> {
    s.validate()?;
    let offload = s.offload != Offload::None;
    if offload
        && !matches!(
            spec.optimizer,
            Optimizer::AdamwTorch | Optimizer::AdamwTorchFused
        )
    {
        return Err(Error::invalid(
            "--offload",
            s.offload,
            format!(
                "the host step runs DeepSpeedCPUAdam (or torch's AdamW under FSDP), not {}: give --optimizer adamw_torch",
                spec.optimizer
            ),
        ));
    }
    let g = s.gpus as u64;
    let layer_params: u64 = cfg
        .param_shapes()
        .iter()
        .filter(|p| p.name.starts_with("model.layers.0."))
        .map(|p| p.numel())
        .sum();
    let gathered = if s.gpus > 1 || s.offload == Offload::OptimizerParams {
        layer_params * spec.dtype.size_in_bytes() as u64
    } else {
        0
    };
    let trainable = spec.trainable_params(cfg);
    // This rank's elements of the flat partition (rank 0's: ⌈trainable / GPUs⌉).
    let part = s.part(trainable);
    // Bytes per trainable element of the gradients, states and trainable weights.
    let per =
        |bytes: u64| -> u64 { ((bytes as u128 * part as u128) / trainable.max(1) as u128) as u64 };
    let own_step = !torch_stack;
    let deepspeed = torch_stack && s.deepspeed();
    let master = spec.precision.is_some_and(|p| p.master_weights());
    let adamw = matches!(
        spec.optimizer,
        Optimizer::AdamwTorch | Optimizer::AdamwTorchFused
    );
    let ddp = s.shard == Shard::Ddp;
    let grad_part = match s.shard {
        Shard::Zero1 | Shard::Ddp => gradients,
        // vramcal's ZeRO-2 rank reduce-scatters at the end of backward: the full gradients
        // are built up first (`crate::measure::sharded`).
        Shard::Zero2 if own_step => gradients,
        _ => gradients.div_ceil(g),
    };
    // vramcal's ZeRO-1/2 rank: its partition of the gradients (reduce-scatter's output) and
    // the optimizer's own copy of its partition of the trainable weights, made at init.
    let zero12_own = own_step && matches!(s.shard, Shard::Zero1 | Shard::Zero2);
    let part_grads = if zero12_own { per(gradients) } else { 0 };
    let part_weights = if zero12_own {
        part * spec.trainable_dtype().size_in_bytes() as u64
    } else {
        0
    };
    // Stages 1–3 keep the bucket whenever `contiguous_gradients` is on (DeepSpeed's default):
    // `stage_1_and_2.py` `backward` allocates `ipg_buffer`, `stage3.py` keeps
    // `__ipg_bucket_flat_buffer` from `__init__` on.
    let reduce_bucket = if deepspeed {
        s.reduce_bucket_elements
            .checked_mul(gradients.checked_div(trainable).unwrap_or(0))
            .ok_or_else(|| {
                Error::invalid(
                    "--reduce-bucket-size",
                    s.reduce_bucket_elements,
                    "its bytes overflow",
                )
            })?
    } else if ddp {
        // DDP's reducer copies every trainable gradient into its flat buckets (25 MiB each) and
        // keeps them from wrapping on (`gradient_as_bucket_view=False`, torch's default;
        // measured: `results/torch-cpu/smollm2-135m-ddp.csv`; vramcal's simulated rank
        // allocates the same, `results/cpu/smollm2-135m-sharded.csv`).
        gradients
    } else {
        0
    };
    // Stage 3 converts one `sub_group_size` group to fp32 at a time (DeepSpeed's default 1e9
    // elements, `stage3.py` `_prepare_fp32_grad_for_sub_group`).
    let fp32_grads = match s.shard {
        Shard::Zero3 => 4 * part.min(DEEPSPEED_SUB_GROUP_SIZE),
        _ => 4 * part,
    };
    let w = match (s.shard.shards_parameters(), s.offload) {
        (true, Offload::OptimizerParams) => gathered,
        (true, _) => weights.div_ceil(g) + gathered,
        (false, _) => weights,
    };
    // DeepSpeed ZeRO-3 under PyTorch (dense weights, nothing offloaded): the persistent
    // parameters whole beside the partitions, and what its schedule holds gathered at each
    // moment of backward instead of one layer. With activation checkpointing PEFT makes the
    // embedding's output require a gradient (`enable_input_require_grads`), so the
    // embedding's backward hook fetches it at the end even when it is frozen.
    let z3_torch = deepspeed
        && s.shard == Shard::Zero3
        && !offload
        && spec.adaptation.quant == crate::spec::Quant::None;
    let (w, z3_extra) = if z3_torch {
        let (all, _) = zero3_tensors(cfg, spec);
        let persistent: u64 = all
            .iter()
            .filter(|t| t.1 <= crate::spec::zero3::PERSISTENCE_THRESHOLD)
            .map(|t| t.1 * t.2)
            .sum();
        let recompute = spec.checkpointing != crate::spec::Checkpointing::None;
        let embed_backward = spec.adaptation.lora.as_ref().is_none_or(|l| l.embed_tokens)
            || (recompute && spec.adaptation.lora.is_some());
        let (head, layer, end) = zero3_gathered(cfg, &all, embed_backward, recompute);
        // The persistent parameters whole through backward, released for the step.
        (
            weights.div_ceil(g),
            (head + persistent, layer + persistent, end + persistent),
        )
    } else {
        (w, (0, 0, 0))
    };
    let host = if offload && s.shard == Shard::Fsdp {
        // FSDP's CPUOffload: parameter and gradient shards and the optimizer's states on the
        // host, the step run there by torch's AdamW.
        weights.div_ceil(g) + gradients.div_ceil(g) + states.div_ceil(g)
    } else if offload {
        // fp32 master (or fp32 copy) partition, the fp32 moments, the fp32 gradient partition: DeepSpeedCPUAdam's `single_partition_of_fp32_groups` and its
        // pinned gradient buffer (`stage_1_and_2.py`, `cpu_offload`).
        let opt = part * (4 + 2 * 4 + 4);
        let params = if s.offload == Offload::OptimizerParams {
            weights.div_ceil(g)
        } else {
            0
        };
        opt + params
    } else {
        0
    };
    let prefetched = if s.offload == Offload::OptimizerParams || s.gpus > 1 {
        layer_params * spec.dtype.size_in_bytes() as u64
    } else {
        0
    };
    let fsdp_root = if torch_stack && s.shard == Shard::Fsdp {
        let d = spec.dtype.size_in_bytes() as u64;
        let root: Vec<u64> = cfg
            .param_shapes()
            .iter()
            .filter(|p| !p.name.starts_with("model.layers."))
            .map(|p| p.numel())
            .collect();
        // PEFT's `modules_to_save` copies are root parameters too, and train.
        let saved = spec
            .adaptation
            .lora
            .as_ref()
            .map_or(0, |l| l.saved_param_count(cfg));
        let params: u64 = root.iter().sum::<u64>() * d + saved * d;
        // Their gradients when they train (full fine-tuning; the saved copies), in the
        // gradients' dtype.
        let per_param = gradients.checked_div(trainable).unwrap_or(0);
        let grads = if spec.adaptation.lora.is_none() {
            root.iter().sum::<u64>() * per_param
        } else {
            saved * per_param
        };
        // One layer's unsharded gradients and its reduce-scatter input while that layer's
        // gradients are reduced (`_fsdp_collectives.py` `foreach_reduce`), and the previous
        // layer's reduce-scatter input, which FSDP2 keeps until the next reduce-scatter begins
        // (`_fsdp_param_group.py` `post_backward`: `comm_ctx.reduce_scatter_state`).
        let root_trainable = if spec.adaptation.lora.is_none() {
            root.iter().sum::<u64>()
        } else {
            saved
        };
        let per_layer =
            trainable.saturating_sub(root_trainable) / cfg.num_hidden_layers.max(1) as u64;
        let reduce = 3 * per_layer * gradients.checked_div(trainable).unwrap_or(0);
        // The next layer's parameters, all-gathered ahead (FSDP2's default backward prefetch
        // of one module), beside the gathered layer counted with the weights.
        params + grads + reduce + prefetched
    } else {
        0
    };
    if own_step && s.shard == Shard::Fsdp && s.offload == Offload::None {
        return Ok(own_fsdp(cfg, spec, s, gradients, states));
    }
    if own_step && s.shard == Shard::Zero3 && s.offload == Offload::None {
        return Ok(own_zero3(cfg, spec, s, gradients, states));
    }
    let scatter = if own_step && s.shard == Shard::Zero2 {
        vec![
            (
                "gradients".to_string(),
                gradients,
                "trainable params × dtype, built up by backward".to_string(),
            ),
            (
                "gradient partition (reduce-scatter)".to_string(),
                part_grads,
                "this rank's partition of the gradients, allocated and filled from the full gradients at the end of backward: trainable params × dtype / GPUs".to_string(),
            ),
        ]
    } else {
        Vec::new()
    };
    Ok(Sharded {
        weights: w,
        head_extra: z3_extra.0,
        grad_partition: 0,
        layer_extra: z3_extra.1,
        end_extra: z3_extra.2,
        scatter,
        fsdp_root,
        end_gradients: if own_step && s.shard == Shard::Zero2 {
            part_grads
        } else {
            0
        },
        accumulated_gradients: (own_step && s.shard == Shard::Zero2)
            .then_some(gradients + part_grads),
        gradients: match (offload, s.shard) {
            // Stage 1 reduces after backward: the full gradients are on the GPU first.
            (true, Shard::Zero1) => gradients,
            (true, _) => 0,
            (false, _) => grad_part,
        },
        optimizer_states: match (offload, deepspeed) {
            (true, _) => 0,
            // DeepSpeed steps fp32 partitions whatever the recipe: an fp32 copy of the rank's
            // partition (`single_partition_of_fp32_groups`, a clone even of fp32 weights) and
            // AdamW's moments made from it, fp32.
            (false, true) if adamw => part * (4 + 2 * 4),
            (false, true) if !master => states.div_ceil(g) + 4 * part,
            (false, _) if ddp => states,
            (false, _) if zero12_own => per(states) + part_weights,
            (false, _) => states.div_ceil(g),
        },
        reduce_bucket,
        step_gradients: match (offload, deepspeed, s.shard) {
            (true, _, _) => 0,
            // Stage 3's flat 16-bit gradient partition and bucket stay; one sub-group in fp32.
            (false, true, Shard::Zero3) => reduce_bucket + grad_part + fp32_grads,
            // Stages 1–2 free the other ranks' gradients and the bucket before the flat copy,
            // and the 16-bit partition after it (`step`: `free_grad_in_param_list`,
            // `flatten(...).to(fp32)`, `averaged_gradients[i] = None`).
            (false, true, _) => fp32_grads,
            // DDP's buckets stay beside the gradients.
            (false, false, Shard::Ddp) => grad_part + reduce_bucket,
            // vramcal's ZeRO-1 rank fills its partition from the full gradients at the step;
            // its ZeRO-2 rank holds the partition only.
            (false, false, Shard::Zero1) if own_step => gradients + part_grads,
            (false, false, Shard::Zero2) if own_step => part_grads,
            (false, false, _) => grad_part,
        },
        step_transient: match (offload, deepspeed, spec.optimizer) {
            (true, _, _) => Some(0),
            // torch's AdamW over the flat fp32 partition (or stage 3's sub-group), one tensor:
            // foreach one buffer of it (`_foreach_sqrt`), for-loop two (`sqrt`, then its
            // division by the bias correction, out of place: pub-11's failing line).
            (false, true, Optimizer::AdamwTorch) if spec.torch_adamw_for_loop() => {
                Some(2 * fp32_grads)
            }
            (false, true, Optimizer::AdamwTorch) => Some(fp32_grads),
            (false, true, Optimizer::AdamwTorchFused) => Some(0),
            _ => None,
        },
        gradients_persistent: deepspeed && s.shard == Shard::Zero3 && !offload,
        host_step: offload,
        host_bytes: host,
    })
}

/// vramcal's simulated FSDP rank (`crate::measure::fsdp`): every tensor sharded on dim 0,
/// `⌈rows/N⌉` rows of it held per rank (padded, as FSDP2 allocates); the root (embedding,
/// final norm, head, their adapters) unsharded from forward to the end of backward with its
/// unsharded gradients; at a layer's backward that layer and the next one prefetched, the
/// layer's unsharded gradients and the previous layer's reduce-scatter input; at the root's
/// reduce-scatter its input beside the root's gradients. `gradients` and `states` are the
/// one-device step's (bytes), scaled per trainable element.
fn own_fsdp(
    cfg: &ModelConfig,
    spec: &TrainSpec,
    s: &Sharding,
    gradients: u64,
    states: u64,
) -> Sharded {
    let n = s.gpus as u64;
    let d = spec.dtype.size_in_bytes() as u64;
    let ad = spec.adapter_dtype().size_in_bytes() as u64;
    let trainable = spec.trainable_params(cfg).max(1);
    let dg = gradients / trainable;
    // (in a layer, rows, cols, bytes per element, trainable)
    let mut tensors: Vec<(bool, u64, u64, u64, bool)> = Vec::new();
    let lora = spec.adaptation.lora.as_ref();
    for p in cfg.param_shapes() {
        let layer = p.name.starts_with("model.layers.0.");
        if p.name.starts_with("model.layers.") && !layer {
            continue;
        }
        let rows = p.shape.first().copied().unwrap_or(1) as u64;
        let cols = p.numel() / rows.max(1);
        tensors.push((layer, rows, cols, d, lora.is_none()));
    }
    if let Some(l) = lora {
        let r = l.r as u64;
        for t in l.layer_targets(cfg) {
            let (o, i) = crate::spec::target_shape(cfg, t);
            tensors.push((true, r, i as u64, ad, true));
            tensors.push((true, o as u64, r, ad, true));
        }
        let (v, h) = (cfg.vocab_size as u64, cfg.hidden_size as u64);
        if l.lm_head {
            tensors.push((false, r, h, ad, true));
            tensors.push((false, v, r, ad, true));
        }
        if l.embed_tokens {
            tensors.push((false, r, v, ad, true));
            tensors.push((false, h, r, ad, true));
        }
    }
    let layers = cfg.num_hidden_layers as u64;
    let count = |t: &(bool, u64, u64, u64, bool)| if t.0 { layers } else { 1 };
    let pad = |t: &(bool, u64, u64, u64, bool)| t.1.div_ceil(n) * t.2;
    let weights: u64 = tensors.iter().map(|t| count(t) * pad(t) * t.3).sum();
    let trainable_pad: u64 = tensors
        .iter()
        .filter(|t| t.4)
        .map(|t| count(t) * pad(t))
        .sum();
    let root: u64 = tensors
        .iter()
        .filter(|t| !t.0)
        .map(|t| t.1 * t.2 * t.3)
        .sum();
    let root_grads: u64 = tensors
        .iter()
        .filter(|t| !t.0 && t.4)
        .map(|t| t.1 * t.2 * dg)
        .sum();
    let shard_grads_layers: u64 = tensors
        .iter()
        .filter(|t| t.0 && t.4)
        .map(|t| layers * pad(t) * dg)
        .sum();
    let shard_grads_root: u64 = tensors
        .iter()
        .filter(|t| !t.0 && t.4)
        .map(|t| pad(t) * dg)
        .sum();
    let layer_bytes: u64 = tensors
        .iter()
        .filter(|t| t.0)
        .map(|t| t.1 * t.2 * t.3)
        .sum();
    let layer_grads: u64 = tensors
        .iter()
        .filter(|t| t.0 && t.4)
        .map(|t| t.1 * t.2 * dg)
        .sum();
    let rs_layer: u64 = tensors
        .iter()
        .filter(|t| t.0 && t.4)
        .map(|t| pad(t) * n * dg)
        .sum();
    let rs_root: u64 = tensors
        .iter()
        .filter(|t| !t.0 && t.4)
        .map(|t| pad(t) * n * dg)
        .sum();
    let per_state = states / trainable;
    Sharded {
        weights,
        head_extra: 0,
        grad_partition: 0,
        // The layers' sharded gradients and the root's unsharded ones, built up by backward.
        gradients: shard_grads_layers + root_grads,
        optimizer_states: per_state * trainable_pad,
        reduce_bucket: 0,
        step_gradients: shard_grads_layers + shard_grads_root,
        fsdp_root: root,
        layer_extra: 2 * layer_bytes + layer_grads + rs_layer,
        end_extra: rs_layer,
        scatter: vec![
            (
                "FSDP root, unsharded".to_string(),
                root,
                "embedding, final norm and head (and their adapters) gathered from forward to the end of backward".to_string(),
            ),
            (
                "gradients".to_string(),
                shard_grads_layers + root_grads,
                "the layers' sharded gradients (⌈rows / GPUs⌉ rows of each), the root's unsharded".to_string(),
            ),
            (
                "reduce-scatter input (root)".to_string(),
                rs_root,
                "the root's gradients copied into one flat buffer, each padded to ⌈rows / GPUs⌉ · GPUs rows".to_string(),
            ),
        ],
        end_gradients: 0,
        accumulated_gradients: Some(shard_grads_layers + shard_grads_root + root_grads),
        gradients_persistent: false,
        host_step: false,
        step_transient: None,
        host_bytes: 0,
    }
}

/// One tensor of a model as DeepSpeed ZeRO-3's schedule sees it: the modules that use it, its
/// elements, bytes per element, whether it trains.
type Z3Tensor = (Vec<crate::spec::zero3::Module>, u64, u64, bool);

/// Every stored tensor of `spec` on `cfg` for ZeRO-3's schedule, each once (a tied embedding
/// used by the embedding and the head), and one layer's (those of `Layer(0)`) apart: the
/// weights in `spec`'s dtype, LoRA's adapters (on the layers' targets, `lm_head`,
/// `embed_tokens`) in the adapters' dtype.
fn zero3_tensors(cfg: &ModelConfig, spec: &TrainSpec) -> (Vec<Z3Tensor>, Vec<Z3Tensor>) {
    use crate::spec::zero3::Module;
    let d = spec.dtype.size_in_bytes() as u64;
    let ad = spec.adapter_dtype().size_in_bytes() as u64;
    let lora = spec.adaptation.lora.as_ref();
    let tied = cfg.tie_word_embeddings;
    let mut tensors: Vec<Z3Tensor> = Vec::new();
    for p in cfg.param_shapes() {
        let modules = if p.name.starts_with("model.layers.0.") {
            vec![Module::Layer(0)]
        } else if p.name.starts_with("model.layers.") {
            continue;
        } else if p.name == "model.embed_tokens.weight" && tied {
            vec![Module::Embed, Module::Head]
        } else if p.name.starts_with("model.embed_tokens.") {
            vec![Module::Embed]
        } else {
            vec![Module::Head]
        };
        tensors.push((modules, p.numel(), d, lora.is_none()));
    }
    if let Some(l) = lora {
        let r = l.r as u64;
        for t in l.layer_targets(cfg) {
            let (o, i) = crate::spec::target_shape(cfg, t);
            tensors.push((vec![Module::Layer(0)], r * i as u64, ad, true));
            tensors.push((vec![Module::Layer(0)], o as u64 * r, ad, true));
        }
        let (v, h) = (cfg.vocab_size as u64, cfg.hidden_size as u64);
        if l.lm_head {
            tensors.push((vec![Module::Head], r * h, ad, true));
            tensors.push((vec![Module::Head], v * r, ad, true));
        }
        if l.embed_tokens {
            tensors.push((vec![Module::Embed], r * v, ad, true));
            tensors.push((vec![Module::Embed], h * r, ad, true));
        }
    }
    let mut all: Vec<Z3Tensor> = Vec::new();
    for t in &tensors {
        if t.0 == [Module::Layer(0)] {
            for l in 0..cfg.num_hidden_layers {
                all.push((vec![Module::Layer(l)], t.1, t.2, t.3));
            }
        } else {
            all.push(t.clone());
        }
    }
    let layer = tensors
        .into_iter()
        .filter(|t| t.0 == [Module::Layer(0)])
        .collect();
    (all, layer)
}

/// Bytes of the non-persistent tensors of `all` that DeepSpeed ZeRO-3's schedule holds whole
/// (trace complete: step 2) at the head's backward, at a layer's (the most over the layers) and
/// at the embedding's (0 when `embed_backward` is false: no backward reaches it), on a step
/// that recomputes each layer before its backward when `recompute` ([`crate::spec::zero3`],
/// DeepSpeed's default reuse distance).
fn zero3_gathered(
    cfg: &ModelConfig,
    all: &[Z3Tensor],
    embed_backward: bool,
    recompute: bool,
) -> (u64, u64, u64) {
    use crate::spec::zero3::{self as z3, Module};
    let layers = cfg.num_hidden_layers;
    let embed_trains = embed_backward;
    let schedule = z3::Schedule::new(
        z3::trace_with(layers, embed_trains, recompute),
        all.iter()
            .map(|t| z3::Param::new(t.1, t.0.clone()))
            .collect(),
        z3::MAX_REUSE_DISTANCE,
    );
    let gathered = |m: Module| -> u64 {
        schedule
            .gathered_at(z3::backward_position_with(m, layers, recompute))
            .iter()
            .zip(all)
            .filter(|(g, t)| **g && t.1 > z3::PERSISTENCE_THRESHOLD)
            .map(|(_, t)| t.1 * t.2)
            .sum()
    };
    let layer = (0..layers)
        .map(|l| gathered(Module::Layer(l)))
        .max()
        .unwrap_or(0);
    let end = if embed_trains {
        gathered(Module::Embed)
    } else {
        0
    };
    (gathered(Module::Head), layer, end)
}

/// vramcal's simulated ZeRO-3 rank (`crate::measure::zero3`): every tensor partitioned flat,
/// `⌈numel/N⌉` elements per rank; the parameters DeepSpeed's schedule holds gathered at the
/// head's backward, at a layer's (the most over the layers) and at the embedding's
/// ([`zero3_gathered`]), with the persistent ones (at most 1e5 elements) always; the flat
/// gradient partition and the bucket of `reduce_bucket_size` elements from initialization on;
/// a layer's whole gradients at its backward; at the last reduction the reduce-scatter's input
/// (every rank's chunk of each gradient in the last bucket, padded); at the step a flat copy of
/// the gradient partition. `gradients` and `states` are the one-device step's (bytes), scaled
/// per trainable element.
fn own_zero3(
    cfg: &ModelConfig,
    spec: &TrainSpec,
    s: &Sharding,
    gradients: u64,
    states: u64,
) -> Sharded {
    use crate::spec::zero3::{self as z3, Module};
    let n = s.gpus as u64;
    let trainable = spec.trainable_params(cfg).max(1);
    let dg = gradients / trainable;
    let layers = cfg.num_hidden_layers;
    let embed_trains = spec.adaptation.lora.as_ref().is_none_or(|l| l.embed_tokens);
    let (all, layer_tensors) = zero3_tensors(cfg, spec);
    let part = |numel: u64| numel.div_ceil(n);
    // The partitions at every moment; the persistent tensors whole through backward (released
    // for the step).
    let weights: u64 = all.iter().map(|t| part(t.1) * t.2).sum();
    let persistent: u64 = all
        .iter()
        .filter(|t| t.1 <= z3::PERSISTENCE_THRESHOLD)
        .map(|t| t.1 * t.2)
        .sum();
    let trainable_part: u64 = all.iter().filter(|t| t.3).map(|t| part(t.1)).sum();
    let grad_partition = trainable_part * dg;
    let bucket = s.reduce_bucket_elements.saturating_mul(dg);
    let (head, layer_gathered, end) = zero3_gathered(cfg, &all, embed_trains, true);
    let layer_grads: u64 = layer_tensors.iter().filter(|t| t.3).map(|t| t.1 * dg).sum();
    // A tied embedding's gradient waits from the head's backward to the embedding's.
    let tied_grad: u64 = all
        .iter()
        .filter(|t| t.3 && t.0.len() == 2 && embed_trains)
        .map(|t| t.1 * dg)
        .sum();
    // The last bucket's contents: gradients arrive in backward order (the head's, the layers'
    // last first, the embedding's), the bucket reduced whenever the next would overflow it.
    let mut arrivals: Vec<u64> = Vec::new();
    let trained = |m: Module| -> Vec<u64> {
        all.iter()
            .filter(|t| {
                t.3 && t.0.contains(&m) && !(m == Module::Head && t.0.len() == 2 && embed_trains)
            })
            .map(|t| t.1)
            .collect()
    };
    arrivals.extend(trained(Module::Head));
    for l in (0..layers).rev() {
        arrivals.extend(trained(Module::Layer(l)));
    }
    if embed_trains {
        arrivals.extend(trained(Module::Embed));
    }
    // Each reduction's input: every rank's chunk of each gradient in the bucket, padded (none
    // for one tensor that divides evenly).
    let input = |b: &[u64]| -> u64 {
        if b.len() == 1 && b[0].is_multiple_of(n) {
            0
        } else {
            b.iter().map(|&a| part(a) * n * dg).sum()
        }
    };
    let mut bucketed: Vec<u64> = Vec::new();
    let mut filled = 0u64;
    // The largest reduction made while backward runs (inside a layer's hook), and the last.
    let mut during = 0u64;
    for a in arrivals {
        if filled + a > s.reduce_bucket_elements && filled > 0 {
            during = during.max(input(&bucketed));
            bucketed.clear();
            filled = 0;
        }
        bucketed.push(a);
        filled += a;
    }
    let last = input(&bucketed);
    let per_state = states / trainable;
    let mut scatter = vec![
        (
            "gradient bucket (ZeRO-3)".to_string(),
            bucket,
            format!(
                "reduce_bucket_size ({}) × gradient dtype, from initialization on",
                s.reduce_bucket_elements
            ),
        ),
        (
            "gradient partition (ZeRO-3)".to_string(),
            grad_partition,
            "the flat gradient partition: ⌈numel / GPUs⌉ elements of each trainable tensor × dtype"
                .to_string(),
        ),
        (
            "persistent parameters (ZeRO-3)".to_string(),
            persistent,
            "tensors of at most 1e5 elements, whole (params × dtype)".to_string(),
        ),
    ];
    if during > last {
        // A reduction inside a layer's backward hook: that layer's parameters and whole
        // gradients, and a tied embedding's gradient, are alive beside it.
        scatter.push((
            "reduce-scatter input (largest bucket, in backward)".to_string(),
            during,
            "every rank's chunk of each gradient in the bucket, padded: GPUs × Σ ⌈numel / GPUs⌉ × dtype".to_string(),
        ));
        scatter.push((
            "gathered parameters and gradients at that reduction".to_string(),
            layer_gathered + layer_grads + tied_grad,
            "the layer's parameters held whole, its whole gradients, a tied embedding's"
                .to_string(),
        ));
    } else {
        scatter.push((
            "reduce-scatter input (last bucket)".to_string(),
            last,
            "every rank's chunk of each gradient in the last bucket, padded: GPUs × Σ ⌈numel / GPUs⌉ × dtype".to_string(),
        ));
    }
    Sharded {
        weights,
        head_extra: head + persistent,
        grad_partition,
        gradients: tied_grad,
        optimizer_states: per_state * trainable_part,
        reduce_bucket: bucket,
        step_gradients: grad_partition + bucket + grad_partition,
        fsdp_root: 0,
        layer_extra: layer_gathered + layer_grads + persistent,
        end_extra: end + persistent,
        scatter,
        end_gradients: 0,
        accumulated_gradients: Some(tied_grad),
        gradients_persistent: false,
        host_step: false,
        step_transient: None,
        host_bytes: 0,
    }
}

/// DeepSpeed ZeRO-3's default `sub_group_size` (elements): `deepspeed/runtime/zero/config.py`,
/// `sub_group_size: int = 1e9`.
pub const DEEPSPEED_SUB_GROUP_SIZE: u64 = 1_000_000_000;

/// Where each module goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Placement {
    /// Module name (`model.embed_tokens`, `model.layers.3`, `model.norm+lm_head`).
    pub module: String,
    /// Device index.
    pub device: usize,
    /// Bytes of its parameters.
    pub bytes: u64,
}

/// Parses `--max-memory 0=24GiB,1=24GiB` into per-device budgets (bytes), in device order.
///
/// # Errors
/// [`Error::InvalidValue`] for malformed entries, sizes, or devices not numbered 0..n.
pub fn parse_max_memory(s: &str) -> Result<Vec<u64>> {
    let mut v: Vec<(usize, u64)> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (d, size) = item.split_once('=').ok_or_else(|| {
            Error::invalid("--max-memory", item, "expected DEVICE=SIZE, e.g. 0=24GiB")
        })?;
        let d: usize = d
            .trim()
            .parse()
            .map_err(|_| Error::invalid("--max-memory", item, "the device must be a number"))?;
        v.push((d, crate::size::parse_size("--max-memory", size)?));
    }
    v.sort();
    if v.is_empty() || v.iter().enumerate().any(|(i, (d, _))| *d != i) {
        return Err(Error::invalid(
            "--max-memory",
            s,
            "give every device from 0 up once, e.g. 0=24GiB,1=24GiB",
        ));
    }
    Ok(v.into_iter().map(|(_, b)| b).collect())
}

/// Places the embedding, each decoder layer and the head (final norm + LM head) in order,
/// filling device 0 first, like accelerate's `infer_auto_device_map` for a sequential model.
/// Weights only, in the spec's dtype (NF4 layers at their packed size).
///
/// # Errors
/// [`Error::InvalidValue`] naming the module that does not fit and the bytes missing.
pub fn device_map(cfg: &ModelConfig, spec: &TrainSpec, budgets: &[u64]) -> Result<Vec<Placement>> {
    let shapes = cfg.param_shapes();
    let d = spec.dtype.size_in_bytes() as u64;
    let bytes_of = |prefix: &str| -> u64 {
        shapes
            .iter()
            .filter(|p| p.name.starts_with(prefix))
            .map(|p| {
                let n = p.numel();
                match spec.adaptation.quant {
                    crate::spec::Quant::Nf4 { .. } if p.name.ends_with("_proj.weight") => {
                        n.div_ceil(2) + n.div_ceil(64) * 4
                    }
                    _ => n * d,
                }
            })
            .sum()
    };
    let mut modules = vec![(
        "model.embed_tokens".to_string(),
        bytes_of("model.embed_tokens."),
    )];
    for l in 0..cfg.num_hidden_layers {
        modules.push((
            format!("model.layers.{l}"),
            bytes_of(&format!("model.layers.{l}.")),
        ));
    }
    // A tied head shares the embedding; only the final norm is new.
    modules.push((
        "model.norm+lm_head".to_string(),
        bytes_of("model.norm.") + bytes_of("lm_head."),
    ));
    let mut out = Vec::new();
    let (mut dev, mut used) = (0usize, 0u64);
    for (name, b) in modules {
        while dev < budgets.len() && used + b > budgets[dev] {
            dev += 1;
            used = 0;
        }
        if dev == budgets.len() {
            let total: u64 = budgets.iter().sum();
            return Err(Error::invalid(
                "--max-memory",
                format!("{} GiB in all", crate::size::gib(total)),
                format!("{name} ({b} bytes) does not fit on any remaining device; the weights need {} GiB", crate::size::gib(crate::estimate::weight_bytes(cfg, spec))),
            ));
        }
        used += b;
        out.push(Placement {
            module: name,
            device: dev,
            bytes: b,
        });
    }
    Ok(out)
}
