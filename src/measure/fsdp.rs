//! One rank of N-way FSDP (PyTorch FSDP2's `fully_shard` on each decoder layer, then on the
//! root), simulated in one process on the CPU (`vramcal measure --shard fsdp --world-size N
//! --rank R --checkpointing layers`): the rank holds its shard of every parameter and the
//! unsharded parameters only while FSDP2 holds them gathered, and each collective is a local
//! operation on buffers of the collective's size and lifetime. Every rank is given the same
//! micro-batch, so the reduced gradient is this rank's own.
//!
//! What the rank holds, as FSDP2 does it (torch `distributed/fsdp/_fully_shard/`):
//!
//! | moment | held beyond the shards and the states |
//! |--------|----------------------------------------|
//! | `fully_shard` (the `optimizer_init` phase) | each parameter's shard: `⌈rows/N⌉` rows of it (dim-0 sharding, padded: every rank allocates the same, `_fsdp_param.py`), the unsharded parameter freed |
//! | forward | the root (embedding, final norm, head and their adapters) all-gathered at its pre-forward and kept to the end of backward (the root is not resharded after forward); each layer gathered for its forward and freed after it (`reshard_after_forward=True`) |
//! | backward, layer `l` | layer `l` gathered, and layer `l − 1` prefetched (FSDP2's default backward prefetch of one module), while `l` is recomputed (activation checkpointing) and backpropagated; then its unsharded gradients copied into the reduce-scatter input (`_fsdp_collectives.py` `foreach_reduce`: one flat buffer, each gradient padded to `⌈rows/N⌉·N` rows) and freed, the rank's part of each added into its sharded gradient, the layer freed; the reduce-scatter input kept until the next reduce-scatter begins (`reduce_scatter_state`) |
//! | end of backward | the root's gradients reduce-scattered the same way, the root freed |
//! | optimizer step | the optimizer steps the shards themselves (FSDP2's sharded `DTensor` parameters) from the sharded gradients |
//!
//! The unsharded parameters' storage is freed and refilled under the tensors the model and its
//! graph hold (FSDP2's `resize_(0)` of the all-gather output): the contents come from the
//! other ranks' memory, kept here outside the counting allocator (an anonymous memory map),
//! with this rank's shard copied in. The other ranks' shards are not updated (their ranks
//! would update them): step 2's loss is that of a partly updated model.
//!
//! Only with activation checkpointing of every layer: candle's autograd graph holds every
//! weight it used until backward, so a layer's unsharded weights can be freed after its
//! forward only when its graph is not kept (the forward's segments detach; backward recomputes
//! each layer with its weights gathered again, as FSDP with checkpointing does).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor, Var};

use crate::error::{Error, Result};
use crate::model::{Decoder, SegmentHooks, StoredTensor};
use crate::spec::Sharding;

/// Memory outside the counting allocator: an anonymous private map (the other ranks' memory).
struct World {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the map is owned by this value and only read or written through `&self`/`&mut self`.
unsafe impl Send for World {}

impl World {
    #[cfg(unix)]
    fn new(len: usize, shard: crate::spec::Shard) -> Result<Self> {
        let len = len.max(1);
        // SAFETY: a fresh anonymous mapping; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::invalid(
                "--shard",
                shard,
                format!(
                    "could not map {len} bytes for the other ranks' parameters: {}",
                    std::io::Error::last_os_error()
                ),
            ));
        }
        Ok(World {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Without a Unix memory map (the browser build, which measures nothing): refused.
    #[cfg(not(unix))]
    fn new(_len: usize, shard: crate::spec::Shard) -> Result<Self> {
        Err(Error::invalid(
            "--shard",
            shard,
            "a simulated rank that shards parameters keeps the other ranks' in an anonymous memory map, which needs a Unix system",
        ))
    }

    fn bytes(&self, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.len, "inside the map");
        // SAFETY: in bounds (asserted), mapped read/write for the map's life.
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }
    }

    fn bytes_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.len, "inside the map");
        // SAFETY: as `bytes`, borrowed mutably through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        #[cfg(unix)]
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// The bytes of a CPU storage.
fn storage_bytes(s: &CpuStorage) -> Result<&[u8]> {
    fn raw<T>(v: &[T]) -> &[u8] {
        // SAFETY: plain numeric elements, read as bytes within the slice.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
    }
    Ok(match s {
        CpuStorage::F32(v) => raw(v),
        CpuStorage::BF16(v) => raw(v),
        CpuStorage::F16(v) => raw(v),
        CpuStorage::F64(v) => raw(v),
        _ => {
            return Err(Error::invalid(
                "dtype",
                format!("{:?}", s.dtype()),
                "a simulated FSDP rank shards f32, bf16, f16 and f64 tensors",
            ))
        }
    })
}

/// Calls `f` with the bytes of CPU tensor `t`'s storage (read-locked meanwhile).
///
/// # Errors
/// [`Error::InvalidValue`] for a tensor off the CPU or of a dtype [`storage_bytes`] refuses.
fn with_cpu_bytes<R>(t: &Tensor, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
    let (st, _) = t.storage_and_layout();
    let Storage::Cpu(c) = &*st else {
        return Err(Error::invalid(
            "--device",
            "cuda",
            "FSDP is simulated on the CPU",
        ));
    };
    Ok(f(storage_bytes(c)?))
}

/// A vector of `T` holding `bytes`.
fn vec_from<T: Copy + Default>(bytes: &[u8]) -> Vec<T> {
    let n = bytes.len() / std::mem::size_of::<T>();
    let mut v = vec![T::default(); n];
    // SAFETY: `v` has room for `n` elements, `bytes` at least `n·size_of::<T>()` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            v.as_mut_ptr().cast::<u8>(),
            n * std::mem::size_of::<T>(),
        );
    }
    v
}

/// Frees a tensor's storage (FSDP2's `resize_(0)` of an unsharded parameter).
struct Release;

impl InplaceOp1 for Release {
    fn name(&self) -> &'static str {
        "fsdp-release"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        *s = match s {
            CpuStorage::F32(_) => CpuStorage::F32(Vec::new()),
            CpuStorage::BF16(_) => CpuStorage::BF16(Vec::new()),
            CpuStorage::F16(_) => CpuStorage::F16(Vec::new()),
            CpuStorage::F64(_) => CpuStorage::F64(Vec::new()),
            _ => candle_core::bail!("fsdp-release: unsupported dtype"),
        };
        Ok(())
    }
}

/// Refills a released tensor's storage (the all-gather's output): the world's copy, with
/// `own` written at byte `at`.
struct Fill<'a> {
    world: &'a [u8],
    own: &'a [u8],
    at: usize,
}

impl InplaceOp1 for Fill<'_> {
    fn name(&self) -> &'static str {
        "fsdp-gather"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        if self.at + self.own.len() > self.world.len() {
            candle_core::bail!("fsdp-gather: the shard lies outside the tensor")
        }
        let (w, o, at) = (self.world, self.own, self.at);
        *s = match s {
            CpuStorage::F32(_) => CpuStorage::F32(filled(w, o, at)),
            CpuStorage::BF16(_) => CpuStorage::BF16(filled(w, o, at)),
            CpuStorage::F16(_) => CpuStorage::F16(filled(w, o, at)),
            CpuStorage::F64(_) => CpuStorage::F64(filled(w, o, at)),
            _ => candle_core::bail!("fsdp-gather: unsupported dtype"),
        };
        Ok(())
    }
}

/// `world` as a vector of `T` (one allocation), with `own` written at byte `at` (in bounds:
/// checked by the caller).
fn filled<T: Copy + Default>(world: &[u8], own: &[u8], at: usize) -> Vec<T> {
    let mut v = vec_from::<T>(world);
    // SAFETY: `at + own.len() <= world.len()`, which is `v`'s size in bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(own.as_ptr(), v.as_mut_ptr().cast::<u8>().add(at), own.len());
    }
    v
}

/// One sharded parameter.
pub(super) struct Sharded {
    /// The unsharded tensor the model uses (its storage freed while not gathered).
    pub(super) full: Tensor,
    /// This rank's shard, `⌈rows/N⌉·cols` elements (1-D; flat: `⌈numel/N⌉`).
    pub(super) shard: Tensor,
    /// The shard as the optimizer's parameter, for a trainable tensor.
    pub(super) var: Option<Var>,
    /// Index into [`Decoder::trainable_vars`], for a trainable tensor.
    pub(super) var_index: Option<usize>,
    /// Decoder layer; `None` for the root.
    pub(super) layer: Option<usize>,
    /// Byte offset of its contents in the world.
    pub(super) world_at: usize,
    /// Elements of the unsharded tensor.
    pub(super) numel: usize,
    /// First element of this rank's rows, and how many of its shard's elements are real (the
    /// rest padding).
    pub(super) start: usize,
    pub(super) len: usize,
    pub(super) gathered: bool,
}

/// Every stored tensor of a [`Decoder`] sharded over a simulated world: this rank's shards,
/// the other ranks' contents in the world's memory map, each unsharded tensor's storage freed
/// until gathered.
pub(super) struct Shards {
    world: World,
    pub(super) params: Vec<Sharded>,
    pub(super) n: usize,
}

/// A simulated FSDP rank over a [`Decoder`].
pub struct FsdpRank {
    shards: Shards,
    /// The sharded gradients of the step so far, per trainable tensor.
    grads: Vec<Option<Tensor>>,
    /// The last reduce-scatter's input, kept until the next begins.
    rs_input: Option<Tensor>,
}

/// Checks what a simulated FSDP rank needs: the CPU, checkpointing of every layer, dense
/// (not NF4) weights, no mixture of experts, no save, one trainable dtype.
///
/// # Errors
/// [`Error::InvalidValue`] naming the option.
pub fn check(
    cfg: &crate::config::ModelConfig,
    spec: &crate::spec::TrainSpec,
    device: crate::spec::DeviceChoice,
) -> Result<()> {
    check_gathering(cfg, spec, device, crate::spec::Shard::Fsdp)
}

/// How errors name a rank that gathers its parameters: `FSDP` or `ZeRO-3`.
pub(super) fn scheme_name(shard: crate::spec::Shard) -> &'static str {
    match shard {
        crate::spec::Shard::Fsdp => "FSDP",
        _ => "ZeRO-3",
    }
}

/// [`check`] for a rank that gathers its parameters (`shard`: FSDP or ZeRO-3, named in
/// errors by [`scheme_name`]).
///
/// # Errors
/// As [`check`].
pub(super) fn check_gathering(
    cfg: &crate::config::ModelConfig,
    spec: &crate::spec::TrainSpec,
    device: crate::spec::DeviceChoice,
    shard: crate::spec::Shard,
) -> Result<()> {
    let what = scheme_name(shard);
    let why = |flag: &str, value: String, reason: String| Err(Error::invalid(flag, value, reason));
    if device != crate::spec::DeviceChoice::Cpu {
        return why(
            "--device",
            "cuda".into(),
            format!("a simulated {what} rank frees and refills its unsharded parameters' storage, which vramcal does on the CPU only"),
        );
    }
    if spec.checkpointing != crate::spec::Checkpointing::Every(1) {
        return why(
            "--checkpointing",
            spec.checkpointing.label(),
            format!("a simulated {what} rank needs --checkpointing layers: candle's autograd graph holds every weight it used until backward, so a layer's unsharded weights can be freed after its forward only when its graph is not kept"),
        );
    }
    if spec.adaptation.quant != crate::spec::Quant::None {
        return why(
            "--method",
            "qlora".into(),
            format!("a simulated {what} rank shards dense tensors; NF4 weights are stored packed"),
        );
    }
    if cfg.moe().is_some() {
        return why(
            "--model",
            cfg.architectures
                .first()
                .cloned()
                .unwrap_or_else(|| "a mixture of experts".into()),
            format!(
                "a simulated {what} rank shards dense decoder layers, not a mixture of experts"
            ),
        );
    }
    if spec
        .adaptation
        .lora
        .as_ref()
        .is_some_and(|l| !l.saved_names().is_empty())
    {
        return why(
            "--lora",
            "modules_to_save".into(),
            format!(
                "a simulated {what} rank does not shard PEFT's full copies of saved modules yet"
            ),
        );
    }
    if spec.save != crate::spec::SaveMode::None {
        return why(
            "--save",
            spec.save.label().into(),
            format!("a simulated {what} rank holds only its shards after the step"),
        );
    }
    Ok(())
}

impl Shards {
    /// Shards every stored tensor of `model` for rank `s.rank` of `s.gpus`: its contents
    /// copied into the world, this rank's shard allocated (`⌈rows/N⌉` rows of it, FSDP2's
    /// dim-0 sharding; with `flat`, `⌈numel/N⌉` elements of the flattened tensor, DeepSpeed
    /// ZeRO-3's `ds_tensor`; padded either way), the unsharded storage freed. With `flat`, also
    /// returns each tensor's name ([`StoredTensor::name`]) in [`Shards::params`] order (empty
    /// otherwise; not kept here: the rank's bookkeeping is counted memory too).
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for trainable tensors of two dtypes, an NF4 weight;
    /// [`Error::Candle`].
    pub(super) fn new(s: &Sharding, model: &Decoder, flat: bool) -> Result<(Self, Vec<String>)> {
        let what = scheme_name(s.shard);
        let stored = model.stored_tensors()?;
        let vars = model.trainable_vars();
        let dtypes: std::collections::BTreeSet<String> = vars
            .iter()
            .map(|(_, v)| format!("{:?}", v.dtype()))
            .collect();
        if dtypes.len() > 1 {
            return Err(Error::invalid(
                "--precision",
                dtypes.into_iter().collect::<Vec<_>>().join(" and "),
                format!("a simulated {what} rank reduces its gradients through flat buffers of one dtype: train tensors of one dtype"),
            ));
        }
        let total: usize = stored
            .iter()
            .map(|t| t.tensor.elem_count() * t.tensor.dtype().size_in_bytes())
            .sum();
        let mut world = World::new(total, s.shard)?;
        let mut params = Vec::with_capacity(stored.len());
        let mut names = Vec::with_capacity(if flat { stored.len() } else { 0 });
        let mut at = 0;
        for StoredTensor {
            layer,
            name,
            tensor,
            trainable,
        } in stored
        {
            let numel = tensor.elem_count();
            let bytes = numel * tensor.dtype().size_in_bytes();
            with_cpu_bytes(&tensor, |b| {
                world.bytes_mut(at, bytes).copy_from_slice(&b[..bytes]);
            })?;
            let (rows, cols) = if flat { (numel, 1) } else { rows_cols(&tensor) };
            let chunk = rows.div_ceil(s.gpus);
            let own_rows = rows.saturating_sub(chunk * s.rank).min(chunk);
            let (start, len) = (chunk * s.rank * cols, own_rows * cols);
            let (shard, var) = if trainable {
                let v = Var::zeros(chunk * cols, tensor.dtype(), tensor.device())?;
                (v.as_tensor().clone(), Some(v))
            } else {
                (
                    Tensor::zeros(chunk * cols, tensor.dtype(), tensor.device())?,
                    None,
                )
            };
            if len > 0 {
                shard.slice_set(&tensor.flatten_all()?.narrow(0, start, len)?, 0, 0)?;
            }
            let var_index = if trainable {
                vars.iter()
                    .position(|(_, v)| v.as_tensor().id() == tensor.id())
            } else {
                None
            };
            tensor.inplace_op1(&Release)?;
            if flat {
                names.push(name);
            }
            params.push(Sharded {
                full: tensor,
                shard,
                var,
                var_index,
                layer,
                world_at: at,
                numel,
                start,
                len,
                gathered: false,
            });
            at += bytes;
        }
        if params
            .iter()
            .filter(|p| p.var.is_some())
            .any(|p| p.var_index.is_none())
        {
            return Err(Error::invalid(
                "--shard",
                s.shard,
                "a trainable tensor is not among the optimizer's",
            ));
        }
        Ok((
            Shards {
                world,
                params,
                n: s.gpus,
            },
            names,
        ))
    }

    /// The trainable shards, in [`Decoder::trainable_vars`] order.
    pub(super) fn optimizer_vars(&self) -> Vec<Var> {
        let mut v: Vec<(usize, Var)> = self
            .params
            .iter()
            .filter_map(|p| Some((p.var_index?, p.var.clone()?)))
            .collect();
        v.sort_by_key(|(i, _)| *i);
        v.into_iter().map(|(_, v)| v).collect()
    }

    /// All-gathers the tensors `which` selects (by index into [`Shards::params`] and the
    /// tensor) that are not gathered: each unsharded storage
    /// refilled from the world, with this rank's shard written in.
    ///
    /// # Errors
    /// [`Error::Candle`]; [`Error::InvalidValue`] off the CPU.
    pub(super) fn gather(&mut self, which: impl Fn(usize, &Sharded) -> bool) -> Result<()> {
        for (_, p) in self
            .params
            .iter_mut()
            .enumerate()
            .filter(|(i, p)| !p.gathered && which(*i, p))
        {
            let d = p.full.dtype().size_in_bytes();
            let world = self.world.bytes(p.world_at, p.numel * d);
            with_cpu_bytes(&p.shard, |b| {
                p.full.inplace_op1(&Fill {
                    world,
                    own: &b[..p.len * d],
                    // A rank past the tensor's last row holds padding only.
                    at: if p.len > 0 { p.start * d } else { 0 },
                })
            })??;
            p.gathered = true;
        }
        Ok(())
    }

    /// Frees the unsharded storage of the gathered tensors `which` selects (as in
    /// [`Shards::gather`]).
    ///
    /// # Errors
    /// [`Error::Candle`].
    pub(super) fn release(&mut self, which: impl Fn(usize, &Sharded) -> bool) -> Result<()> {
        for (_, p) in self
            .params
            .iter_mut()
            .enumerate()
            .filter(|(i, p)| p.gathered && which(*i, p))
        {
            p.full.inplace_op1(&Release)?;
            p.gathered = false;
        }
        Ok(())
    }
}

impl FsdpRank {
    /// `fully_shard` of `model` for rank `s.rank` of `s.gpus`: every stored tensor's contents
    /// copied into the world, this rank's shard allocated, the unsharded storage freed.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for what [`check`] refuses, trainable tensors of two dtypes, an
    /// NF4 weight; [`Error::Candle`].
    pub fn new(s: &Sharding, model: &Decoder) -> Result<Self> {
        let (shards, _) = Shards::new(s, model, false)?;
        let n = model.trainable_vars().len();
        Ok(FsdpRank {
            shards,
            grads: vec![None; n],
            rs_input: None,
        })
    }

    /// The optimizer's parameters: the trainable shards, in [`Decoder::trainable_vars`] order.
    pub fn optimizer_vars(&self) -> Vec<Var> {
        self.shards.optimizer_vars()
    }

    fn gather(&mut self, which: impl Fn(Option<usize>) -> bool) -> Result<()> {
        self.shards.gather(|_, p| which(p.layer))
    }

    fn release(&mut self, which: impl Fn(Option<usize>) -> bool) -> Result<()> {
        self.shards.release(|_, p| which(p.layer))
    }

    /// The root's pre-forward all-gather: the embedding, final norm, head and their adapters,
    /// kept to the end of backward.
    ///
    /// # Errors
    /// [`Error::Candle`].
    pub fn gather_root(&mut self) -> Result<()> {
        self.gather(|l| l.is_none())
    }

    /// The reduce-scatter of the unsharded gradients (taken from `grads`) of the trainable
    /// tensors that `which` selects: the previous reduce-scatter's input freed, one flat input
    /// allocated (each gradient padded to `⌈rows/N⌉·N` rows) and filled, the unsharded
    /// gradients freed, this rank's rows added into its sharded gradients.
    fn reduce_scatter(
        &mut self,
        grads: &mut [Option<Tensor>],
        which: impl Fn(Option<usize>) -> bool,
    ) -> Result<()> {
        let params = &self.shards.params;
        let mine: Vec<usize> = (0..params.len())
            .filter(|&i| params[i].var_index.is_some() && which(params[i].layer))
            .collect();
        if mine.is_empty() {
            return Ok(());
        }
        self.rs_input = None;
        let n = self.shards.n;
        let slot = |p: &Sharded| p.shard.elem_count() * n;
        let total: usize = mine.iter().map(|&i| slot(&params[i])).sum();
        let first = &params[mine[0]];
        let input = Tensor::zeros(total, first.shard.dtype(), first.shard.device())?;
        let mut off = 0;
        let mut offsets = Vec::with_capacity(mine.len());
        for &i in &mine {
            let p = &params[i];
            let vi = p.var_index.expect("trainable");
            let g = grads[vi].take().ok_or_else(|| {
                Error::invalid("gradient", vi, "a trainable tensor received no gradient")
            })?;
            input.slice_set(&g.flatten_all()?.contiguous()?, 0, off)?;
            drop(g);
            offsets.push(off);
            off += slot(p);
        }
        for (&i, off) in mine.iter().zip(offsets) {
            let p = &params[i];
            let vi = p.var_index.expect("trainable");
            let out = Tensor::zeros(p.shard.elem_count(), p.shard.dtype(), p.shard.device())?;
            if p.len > 0 {
                out.slice_set(&input.narrow(0, off + p.start, p.len)?, 0, 0)?;
            }
            self.grads[vi] = Some(match self.grads[vi].take() {
                Some(acc) => (acc + out)?,
                None => out,
            });
        }
        self.rs_input = Some(input);
        Ok(())
    }

    /// The end of backward: the root's gradients (left in `grads` by
    /// [`Decoder::backward_with`]) reduce-scattered, the root freed, the last reduce-scatter's
    /// input freed.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] if a gradient is missing or left over; [`Error::Candle`].
    pub fn finish_backward(&mut self, mut grads: Vec<Option<Tensor>>) -> Result<()> {
        self.reduce_scatter(&mut grads, |l| l.is_none())?;
        if let Some(i) = grads.iter().position(Option::is_some) {
            return Err(Error::invalid("gradient", i, "left unreduced"));
        }
        self.release(|l| l.is_none())?;
        self.rs_input = None;
        Ok(())
    }

    /// The step's sharded gradients, in [`FsdpRank::optimizer_vars`] order, taken (the step
    /// frees them).
    ///
    /// # Errors
    /// [`Error::InvalidValue`] if one is missing.
    pub fn take_grads(&mut self) -> Result<Vec<Tensor>> {
        self.grads
            .iter_mut()
            .enumerate()
            .map(|(i, g)| {
                g.take()
                    .ok_or_else(|| Error::invalid("gradient", i, "no sharded gradient"))
            })
            .collect()
    }
}

/// `(rows, columns)` of a tensor sharded on dim 0 (a 1-D tensor: its elements, one column).
fn rows_cols(t: &Tensor) -> (usize, usize) {
    let n = t.elem_count();
    match t.dims().first() {
        Some(&r) if r > 0 => (r, n / r),
        _ => (n, 1),
    }
}

impl SegmentHooks for FsdpRank {
    fn before(&mut self, first: usize, n: usize, backward: bool) -> Result<()> {
        let last = first + n;
        self.gather(|l| l.is_some_and(|l| l >= first && l < last))?;
        if backward && first > 0 {
            // FSDP2's default backward prefetch: the next layer to run, one module ahead.
            let prev = first.saturating_sub(n);
            self.gather(|l| l.is_some_and(|l| l >= prev && l < first))?;
        }
        Ok(())
    }

    fn after(
        &mut self,
        first: usize,
        n: usize,
        grads: Option<&mut [Option<Tensor>]>,
    ) -> Result<()> {
        let last = first + n;
        let inside = |l: Option<usize>| l.is_some_and(|l| l >= first && l < last);
        if let Some(g) = grads {
            self.reduce_scatter(g, inside)?;
        }
        self.release(inside)
    }
}
