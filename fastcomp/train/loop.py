"""The training loop: AdamW, linear warmup, gradient clipping, EMA, bf16 autocast, torch.compile, DDP,
checkpoints with exact resume.

Determinism: every step draws its data and its noise from fresh CPU generators seeded from
(seed, step), so a step's batch does not depend on what ran before it. That makes resume exact (train N
steps == train k, stop, resume, train N - k; bitwise on CPU in fp32) and lets every DDP rank draw the
same global batch without communicating.

DDP: each rank draws the whole global batch and calls the loss on it, but the model only runs on the
rank's slice of rows; the slices' outputs are all-gathered (without grad), and the rank's own rows are
put back with their graph. So the loss is computed on exactly the global batch with exactly the noise of
a one-process run, on every rank, whatever the loss function does with the model's output; each rank's
backward yields the gradient through its own rows, and DDP's average of those, times the world size,
is the gradient of the global loss.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import math
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from .checkpoint import (Checkpoint, CheckpointWarning, _jsonable, checkpoint_path, find_checkpoint,
                         list_checkpoints, load_checkpoint, remove_orphans, restore, save_checkpoint)

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`. batch_size is the GLOBAL batch (split across DDP ranks).

    warmup_steps: the learning rate rises linearly from lr/warmup_steps to lr over these steps, then stays.
    grad_clip: max global gradient norm (None: no clipping). ema_decay: decay of the weights' exponential
    moving average (None: no EMA). checkpoint_every: steps between checkpoints (0: only the final one);
    out_dir None writes no checkpoints. precision: "auto" = bf16 autocast on CUDA, fp32 on CPU.
    compile: "auto" = torch.compile on CUDA only (on CPU compile time dominates short runs).
    keep_checkpoints: how many of the newest periodic checkpoints to keep (0: all).
    ddp_find_unused_parameters: DDP's flag, for models whose forward leaves some parameters unused.
    """
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: Optional[float] = 1.0
    ema_decay: Optional[float] = 0.999
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    out_dir: Optional[str] = None
    precision: str = "auto"
    compile: Union[str, bool] = "auto"
    betas: tuple = (0.9, 0.999)
    keep_checkpoints: int = 3
    ddp_find_unused_parameters: bool = False

    def __post_init__(self):
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        def is_int(v) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        need(is_int(self.steps) and self.steps >= 1, "steps", "must be an int >= 1 (the total number of "
             "optimizer steps, counted from 0 even when resuming)")
        need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "must be an int >= 1 (the global "
             "batch; under DDP it must divide by the number of processes)")
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0, "lr",
             "must be a finite float > 0, e.g. 2e-4")
        need(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, "weight_decay",
             "must be >= 0 (0 disables it)")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "must be an int >= 0")
        need(self.grad_clip is None or (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0),
             "grad_clip", "must be > 0, or None to disable clipping")
        need(self.ema_decay is None or (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1),
             "ema_decay", "must be in [0, 1), e.g. 0.999, or None for no EMA")
        need(is_int(self.seed), "seed", "must be an int")
        need(is_int(self.log_every) and self.log_every >= 1, "log_every", "must be an int >= 1")
        need(is_int(self.checkpoint_every) and self.checkpoint_every >= 0, "checkpoint_every",
             "must be an int >= 0 (0: only a final checkpoint)")
        need(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
        need(self.compile in ("auto", True, False), "compile", "must be 'auto', True or False")
        need(len(tuple(self.betas)) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
             "must be two floats in [0, 1), e.g. (0.9, 0.999)")
        need(is_int(self.keep_checkpoints) and self.keep_checkpoints >= 0, "keep_checkpoints",
             "must be an int >= 0 (0 keeps all)")
        need(self.out_dir is None or (isinstance(self.out_dir, (str, os.PathLike)) and os.fspath(self.out_dir) != ""),
             "out_dir", "must be a directory path, or None to write no checkpoints ('' would mean the working "
             "directory; pass '.' if that is meant)")
        if self.out_dir is not None:
            self.out_dir = os.fspath(self.out_dir)
        self.betas = tuple(float(b) for b in self.betas)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Rebuild from :meth:`to_dict` (unknown keys are ignored: older/newer checkpoints still load)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    """losses: the global-batch mean loss of every step 0..step-1 (a resumed run includes the steps before
    the resume). model: the trained model (unwrapped from DDP/compile); ema: its EMA copy or None.
    checkpoint: the last checkpoint written (None without out_dir). seconds / samples_per_second: this
    call's wall time and global samples per second."""
    losses: list
    step: int
    model: nn.Module
    ema: Optional[nn.Module]
    checkpoint: Optional[str]
    seconds: float
    samples_per_second: float


def step_seed(seed: int, step: int, stream: int) -> int:
    """A well-mixed 63-bit seed for (seed, step, stream): neighbouring steps get unrelated streams."""
    words = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF, int(step), int(stream)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)


def step_generators(seed: int, step: int) -> tuple[torch.Generator, torch.Generator]:
    """(data generator, noise generator) of a step: CPU generators, so every device draws the same numbers."""
    return (torch.Generator().manual_seed(step_seed(seed, step, 0)),
            torch.Generator().manual_seed(step_seed(seed, step, 1)))


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple (SceneBatch)
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _batch_size_of(batch: Any) -> Optional[int]:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    return None


class _RowSlicedModel:
    """Stands in for the model inside the loss under DDP (see the module docstring).

    Called with global-batch inputs: runs `runner` (the DDP module, maybe compiled) on this rank's rows,
    all-gathers every rank's output without grad and returns the global output with this rank's rows
    still attached to the graph. Attribute reads (sigma_data, config, parameters(), ...) go to the model.
    """

    def __init__(self, runner: Callable, model: nn.Module, global_batch: int, rank: int, world: int):
        self._runner, self._model = runner, model
        self._n, self._rank, self._world = global_batch, rank, world
        self._rows = slice(rank * (global_batch // world), (rank + 1) * (global_batch // world))
        self.calls = 0  # forwards through DDP this step: 0 would mean gradients were never synchronized

    def _slice(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == self._n:
            return v[self._rows]
        return v

    def __call__(self, *args, **kwargs):
        self.calls += 1
        out = self._runner(*(self._slice(a) for a in args), **{k: self._slice(v) for k, v in kwargs.items()})
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"under DDP the model must return one tensor of per-sample rows, got {type(out)}")
        parts = [torch.empty_like(out) for _ in range(self._world)]
        dist.all_gather(parts, out.detach().contiguous())
        parts[self._rank] = out
        return torch.cat(parts, dim=0)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _default_loss(sigma_dist):
    from fastcomp.models import edm_loss  # lazy: the models package is optional for custom losses

    if sigma_dist is None:
        from fastcomp.models import LogNormalSigma
        sigma_dist = LogNormalSigma()

    def loss_fn(model, batch, generator):
        return edm_loss(model, batch, sigma_dist, generator=generator)

    return loss_fn


def _distributed_from_env(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether we initialized the process group) from torchrun's RANK/WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10), **kwargs)
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _make_progress(progress, total: int, initial: int, rank: int):
    if progress is False or rank != 0:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=None if progress is None else False, file=sys.stderr)


def prepare_out_dir(out_dir: str, *, resume_from: Optional[str] = None, overwrite: bool = False,
                    rank: int = 0) -> None:
    """Make out_dir ready for a run, before step 0, so that a run never trains for nothing or overwrites
    another: create it, check it is a writable directory, remove the orphans of interrupted writes, and
    refuse a folder that holds another run's checkpoints unless this run resumes from that folder
    (resume_from: the checkpoint file or folder resumed) or overwrite=True (which deletes them first).
    Only rank 0 deletes anything; every rank checks, so all of them fail together under DDP."""
    where = f"TrainConfig.out_dir={out_dir!r}"
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{where} is a file, not a directory; pass a directory for the checkpoints")
    try:
        os.makedirs(out_dir, exist_ok=True)
        # An unnamed file (O_TMPFILE): nothing left behind if killed here, nothing another rank could
        # remove under this one.
        with tempfile.TemporaryFile(dir=out_dir) as f:
            f.write(b"ok")
    except OSError as e:
        raise PermissionError(f"{where} cannot be written ({e.strerror or e}); pass a directory you can write "
                              "to") from None
    if rank == 0:
        removed = remove_orphans(out_dir)
        if removed:
            warnings.warn(f"removed {len(removed)} incomplete checkpoint file(s) left by an interrupted write or "
                          f"prune in {out_dir}: {', '.join(os.path.basename(p) for p in removed)}",
                          CheckpointWarning, stacklevel=3)
    existing = list_checkpoints(out_dir)
    if not existing:
        return
    if resume_from is not None:
        source = resume_from if os.path.isdir(resume_from) else os.path.dirname(os.path.abspath(resume_from))
        if os.path.samefile(source, out_dir):
            return
    if not overwrite:
        names = ", ".join(os.path.basename(p) for p in existing[-3:])
        raise FileExistsError(f"{where} already holds another run's checkpoints ({len(existing)}, newest: "
                              f"{names}); resume it (resume=True, or --resume {out_dir}), pass overwrite=True "
                              "(--overwrite) to delete them and start over, or choose another out_dir")
    if rank == 0:
        for path in existing:
            _remove_checkpoint(path[: -len(".safetensors")])


def _remove_checkpoint(stem: str) -> None:
    for path in (stem + ".json", stem + ".safetensors"):  # JSON first: never a JSON without tensors
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _set_aside(skipped: list) -> None:
    """Rename checkpoints that failed verification to *.corrupt: kept for inspection (never deleted), but
    out of the way of the resumed run, which would otherwise overwrite or prune them."""
    for path, _ in skipped:
        for part in (path[: -len(".safetensors")] + ".json", path):
            with contextlib.suppress(FileNotFoundError):
                os.replace(part, part + ".corrupt")


# Training settings a resumed run must share with its checkpoint (anything else would make the
# checkpoints record a config that did not produce them), and those that may change (with a warning).
RESUME_MUST_MATCH = ("seed", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "ema_decay",
                     "betas", "precision")
RESUME_MAY_CHANGE = ("log_every", "checkpoint_every", "compile", "keep_checkpoints",
                     "ddp_find_unused_parameters")
# Model-config keys that choose how, not what, a model computes.
HARMLESS_MODEL_KEYS = ("backend",)


def _differences(old: dict, new: dict, keys) -> list[str]:
    return [f"{k}={old[k]!r} (now {k}={new.get(k)!r})" for k in keys if k in old and old[k] != new.get(k)]


def check_resume(ckpt, config: "TrainConfig", model: nn.Module) -> None:
    """Refuse to resume ckpt with another training config or model config (naming every differing field);
    warn about differences that do not change the run's numbers (logging, checkpointing, backends) and
    model options the checkpoint does not record (added to the model since)."""
    old = ckpt.config or {}
    new = _jsonable(config.to_dict())
    refuse = _differences(old, new, RESUME_MUST_MATCH)
    harmless = _differences(old, new, RESUME_MAY_CHANGE)
    old_model, new_model = ckpt.model_config, _jsonable(getattr(model, "config", None))
    if isinstance(old_model, dict) and isinstance(new_model, dict):
        keys = sorted(set(old_model) | set(new_model))
        refuse += [f"model {d}" for d in _differences(old_model, new_model, [k for k in keys
                                                                           if k not in HARMLESS_MODEL_KEYS])]
        harmless += [f"model {d}" for d in _differences(old_model, new_model, HARMLESS_MODEL_KEYS)]
        # A key the checkpoint lacks is most likely an option added since, at its default: say so, go on.
        harmless += [f"model {k}={new_model[k]!r} (not recorded in the checkpoint)" for k in keys
                     if k not in old_model]
    model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    if ckpt.meta.get("model_class") not in (None, model_class):
        refuse.append(f"model class {ckpt.meta['model_class']} (now {model_class})")
    if refuse:
        raise ValueError(f"cannot resume {ckpt.path}: it was trained with " + "; ".join(refuse)
                         + ". A resumed run must use the same settings (the checkpoints would record a config "
                         "that did not produce them): pass the same ones, or start a fresh run")
    if harmless:
        warnings.warn(f"resuming {ckpt.path} with settings that differ from its own, which a resume may "
                      "change (logging, checkpointing, backends, options added since): "
                      + "; ".join(harmless), UserWarning, stacklevel=4)


def _prune_checkpoints(out_dir: str, keep: int) -> None:
    if keep <= 0:
        return
    found = sorted(name for name in os.listdir(out_dir) if re.match(r"^checkpoint-\d+\.json$", name))
    for name in found[:-keep]:
        # A kill between the two removals leaves an orphan .safetensors: the next run's prepare_out_dir
        # removes it.
        _remove_checkpoint(os.path.join(out_dir, name[: -len(".json")]))


def train(model: nn.Module, dataset: Any, config: TrainConfig, *, loss_fn: Optional[Callable] = None,
          sigma_dist: Any = None, resume: Union[str, bool, None] = None, overwrite: bool = False,
          progress: Optional[bool] = None, run_info: Optional[dict] = None) -> TrainResult:
    """Train `model` on `dataset` for `config.steps` optimizer steps (counted from 0; a resumed run goes on
    from its checkpoint's step up to config.steps).

    model: an nn.Module on the device to train on (its parameters' device is used).
    dataset: anything with ``.sample(n, *, generator) -> batch`` (a SceneBatch: images [n, C, S, S],
    points [n, M, 2], valid [n, M]); batches are moved to the model's device.
    loss_fn: ``loss_fn(model, batch, generator) -> scalar`` (default: fastcomp.models.edm_loss with
    `sigma_dist`, LogNormalSigma() when None). `generator` is a CPU torch.Generator: draw on the CPU and
    move, so the numbers do not depend on the device or on the DDP rank.
    resume: a checkpoint file or directory (its newest checkpoint that verifies; newer ones that do not are
    renamed to *.corrupt, with a warning), True for config.out_dir, or a Checkpoint already loaded. The checkpoint's training config
    and model config must match (check_resume names any field that differs).
    overwrite: config.out_dir may hold another run's checkpoints, which are deleted first; without it
    (and without resuming from that folder) such a folder is refused before step 0.
    progress: None = a tqdm bar when stderr is a terminal, True = always, False = never (rank 0 only).
    run_info: JSON-serializable facts about the run (e.g. the command line) stored in every checkpoint
    as ``extra["run"]``.
    Under torchrun (RANK / WORLD_SIZE set) or an initialized process group, trains with DDP.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a fastcomp.train.TrainConfig, got {type(config).__name__}")
    if not hasattr(dataset, "sample"):
        raise TypeError(f"dataset must have .sample(n, *, generator) -> batch; got {type(dataset).__name__}")
    if loss_fn is None:
        loss_fn = _default_loss(sigma_dist)
    elif sigma_dist is not None:
        raise ValueError("sigma_dist is only used by the default loss (edm_loss); with a custom loss_fn, "
                         "bind the noise distribution into loss_fn instead")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    device = params[0].device

    rank, world, own_group = _distributed_from_env(device)
    try:
        # The DDP wrapper lives in _train's frame only, so it is gone before the group is destroyed.
        return _train(model, dataset, config, loss_fn, resume, progress, device, rank, world,
                      overwrite=overwrite, run_info=run_info)
    except BaseException as e:
        if own_group:
            # Or an exception's traceback would keep it alive past destroy_process_group, and its
            # Reducer, holding the last reference to a gloo group, would destroy the group with the GIL
            # held: that joins gloo's threads, which may need the GIL to free tensors, and deadlocks
            # (pytorch/pytorch#56297; tests/helpers.py tells how it was found).
            traceback.clear_frames(e.__traceback__)
        raise
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(model, dataset, config, loss_fn, resume, progress, device, rank, world, *, overwrite=False,
           run_info=None) -> TrainResult:
    if config.batch_size % world:
        raise ValueError(f"TrainConfig.batch_size={config.batch_size} (the global batch) must divide by the "
                         f"{world} DDP processes; use a multiple of {world}")
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    use_compile = config.compile is True or (config.compile == "auto" and device.type == "cuda")

    model.train()
    decay, no_decay = [], []  # no weight decay on biases and norm gains (1-D tensors), as usual
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)
    ema = None
    if config.ema_decay is not None:
        ema = copy.deepcopy(model).eval().requires_grad_(False)

    start, losses = 0, []
    where = None
    if isinstance(resume, Checkpoint):  # already read (and verified) by the caller
        where = resume.path
    elif resume:
        where = config.out_dir if resume is True else os.fspath(resume)
        if where is None:
            raise ValueError("resume=True needs TrainConfig.out_dir (the directory to resume from)")
    if config.out_dir is not None:
        prepare_out_dir(config.out_dir, resume_from=where, overwrite=overwrite, rank=rank)
    if resume:
        # Verified; a directory falls back to its newest intact checkpoint.
        ckpt = resume if isinstance(resume, Checkpoint) else load_checkpoint(where)
        check_resume(ckpt, config, model)
        if ckpt.skipped and rank == 0:
            _set_aside(ckpt.skipped)
        restore(ckpt, model, optimizer, ema=ema, restore_rng=True)
        start, losses = ckpt.step, list(ckpt.extra.get("losses", []))[: ckpt.step]
        if start > config.steps:
            raise ValueError(f"the checkpoint is at step {start}, past TrainConfig.steps={config.steps}; "
                             "raise steps to train further")

    runner = model
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.ddp_find_unused_parameters)
    if use_compile:
        runner = torch.compile(runner)
    loss_model = runner if world == 1 else _RowSlicedModel(runner, model, config.batch_size, rank, world)

    def save(step: int) -> str:
        path = save_checkpoint(checkpoint_path(config.out_dir, step), model, optimizer, step=step,
                               config=config.to_dict(), ema=ema,
                               extra={"losses": losses[:step], **({"run": run_info} if run_info else {})})
        _prune_checkpoints(config.out_dir, config.keep_checkpoints)
        return path

    bar = _make_progress(progress, config.steps, start, rank)
    pending: list[torch.Tensor] = []  # losses not yet read back (a .item() per step would sync CUDA)
    last_ckpt = None
    t0 = time.perf_counter()
    t_log, step_log = t0, start

    def flush() -> None:
        if pending:
            losses.extend(torch.stack(pending).float().cpu().tolist())
            pending.clear()

    for step in range(start, config.steps):
        data_gen, noise_gen = step_generators(config.seed, step)
        batch = dataset.sample(config.batch_size, generator=data_gen)
        n = _batch_size_of(batch)
        if n is not None and n != config.batch_size:
            raise ValueError(f"dataset.sample({config.batch_size}) returned {n} samples")
        batch = _to_device(batch, device)
        lr = config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
        for g in optimizer.param_groups:
            g["lr"] = lr

        if world > 1:
            loss_model.calls = 0
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = loss_fn(loss_model, batch, noise_gen)
        if world > 1 and loss_model.calls != 1:
            raise RuntimeError(f"under DDP loss_fn must call the model it is given exactly once per step (it "
                               f"called it {loss_model.calls} times): DDP synchronizes gradients through "
                               "that call; a method other than forward bypasses it")
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {list(loss.shape)}")
        optimizer.zero_grad(set_to_none=True)
        # Under DDP every rank's loss is the global loss; DDP averages the ranks' partial gradients, so
        # the world-size factor makes the sum of the partial gradients, i.e. the global gradient.
        (loss * world if world > 1 else loss).backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm.detach(), 1.0 - config.ema_decay)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)
        pending.append(loss.detach())

        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            flush()
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"loss became {losses[-1]} at step {step}; lower TrainConfig.lr or "
                                         "set grad_clip")
            if bar is not None:
                now = time.perf_counter()
                rate = (done - step_log) * config.batch_size / max(now - t_log, 1e-9)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", samples_s=f"{rate:.1f}", lr=f"{lr:.2e}")
                bar.update(done - bar.n)
                t_log, step_log = now, done
        if config.out_dir is not None and rank == 0 and (
                done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0)):
            flush()
            last_ckpt = save(done)
    flush()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    if world > 1:
        dist.barrier()  # rank 0 finished its checkpoint before anyone returns (and maybe reads it)
    if config.out_dir is not None and last_ckpt is None:  # other ranks, or nothing left to train
        with contextlib.suppress(FileNotFoundError):
            last_ckpt = find_checkpoint(config.out_dir)
    trained = config.steps - start
    return TrainResult(losses=losses, step=config.steps, model=model, ema=ema, checkpoint=last_ckpt,
                       seconds=seconds,
                       samples_per_second=trained * config.batch_size / seconds if seconds > 0 else 0.0)
