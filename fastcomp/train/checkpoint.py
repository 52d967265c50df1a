"""Checkpoints: tensors in safetensors, everything else in a JSON sidecar.

A checkpoint is two files written side by side::

    <dir>/checkpoint-00001000.safetensors   model.*, ema.*, optimizer.state.<param index>.<key>, rng.*
    <dir>/checkpoint-00001000.json          step, train config, the model's .config, optimizer
                                            param_groups and non-tensor state, RNG states, extra

safetensors holds only tensors (no pickle: loading a checkpoint cannot run code); the JSON is readable
by people and tools. The JSON is written last, so a checkpoint whose JSON exists is complete: a run
killed while writing leaves at most an orphan .safetensors (or a .tmp file) that :func:`find_checkpoint`
ignores and :func:`remove_orphans` deletes. Every file is written to a temporary name, flushed to disk
and renamed, so a reader never sees half a file.

Trust: the JSON records the size and SHA-256 of its .safetensors, and loading verifies both, so flipped
bits, a truncated or emptied file, or a sidecar paired with another run's tensors are refused with a
:class:`CheckpointError` that names the file and the reason, instead of loading garbage. Given a
directory, :func:`load_checkpoint` falls back to the newest checkpoint that verifies, with a
:class:`CheckpointWarning` naming each one it skipped (it never deletes them).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load, save

FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)\.json$")
_FILE = re.compile(r"^checkpoint-(\d+)\.(json|safetensors)(\.tmp)?$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted (missing half, unreadable, corrupt, another format); the message
    names the file and the reason."""


class CheckpointWarning(UserWarning):
    """load_checkpoint skipped a checkpoint that does not verify and used an older one."""


def checkpoint_path(out_dir: str, step: int) -> str:
    """Where the checkpoint of `step` goes in `out_dir` (the .safetensors file; the .json sits beside it)."""
    return os.path.join(out_dir, f"checkpoint-{step:08d}.safetensors")


def _paths(path: str) -> tuple[str, str]:
    """path (the .safetensors, the .json or the stem) -> (tensors file, JSON file)."""
    stem = path
    for suffix in (".safetensors", ".json"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem + ".safetensors", stem + ".json"


def list_checkpoints(out_dir: str) -> list[str]:
    """The .safetensors paths of the complete checkpoints (those with a JSON) in out_dir, oldest first."""
    found = sorted((int(m.group(1)), name) for name in os.listdir(out_dir) if (m := _NAME.match(name)))
    return [_paths(os.path.join(out_dir, name))[0] for _, name in found]


def find_checkpoint(path: str) -> str:
    """A checkpoint file, or the newest complete checkpoint in a directory -> its .safetensors path
    (found by name; :func:`load_checkpoint` verifies the contents)."""
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"no checkpoint-*.json in {path!r}: pass a directory a training run "
                                    "wrote checkpoints into, or a checkpoint file")
        return found[-1]
    tensors, meta = _paths(path)
    if os.path.exists(meta) and not os.path.exists(tensors):
        raise CheckpointError(f"checkpoint {tensors} is missing (its sidecar {meta} exists): the checkpoint "
                              f"is incomplete; use an older checkpoint of the run")
    if not (os.path.exists(tensors) and os.path.exists(meta)):
        raise FileNotFoundError(f"checkpoint {path!r} not found: need both {tensors!r} and {meta!r}")
    return tensors


def remove_orphans(out_dir: str) -> list[str]:
    """Delete what interrupted writes and prunes leave in out_dir: .tmp files and .safetensors files
    without a JSON (never a checkpoint whose JSON exists, intact or not). Returns the removed paths."""
    names = set(os.listdir(out_dir))
    removed = []
    for name in sorted(names):
        m = _FILE.match(name)
        if m is None:
            continue
        orphan = m.group(3) is not None or (m.group(2) == "safetensors" and name[: -len("safetensors")] + "json"
                                            not in names)
        if orphan:
            path = os.path.join(out_dir, name)
            try:
                os.remove(path)
            except FileNotFoundError:  # another process got there first
                continue
            removed.append(path)
    return removed


def _jsonable(value: Any) -> Any:
    """Best-effort JSON for configs: tuples become lists, paths/dtypes/devices become strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):  # np.int64(7) -> 7, not "7"
        return value.item()
    return str(value)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """torch (CPU and every CUDA device), numpy and python RNG states, split into tensors and JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, py_state, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(py_state), gauss_next]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss_next = meta["python"]
    random.setstate((version, tuple(py_state), gauss_next))


def _module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights, views into one buffer).
    return {f"{prefix}.{k}": v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                    step: int, config: Any = None, ema: Optional[torch.nn.Module] = None,
                    extra: Optional[dict] = None) -> str:
    """Write model (and EMA, optimizer state, RNG states) to `path` (.safetensors) plus its .json sidecar.

    path: the .safetensors file to write (a directory: ``checkpoint-<step>.safetensors`` inside it).
    config: the training config (a dataclass or dict; stored as JSON). The model's own ``.config`` (the
    constructor kwargs, when it has one) is stored too, so the model can be rebuilt from the checkpoint.
    extra: anything JSON-serializable (e.g. the loss history). Returns the .safetensors path.
    """
    if os.path.isdir(path):
        path = checkpoint_path(path, step)
    tensors_path, meta_path = _paths(path)
    os.makedirs(os.path.dirname(os.path.abspath(tensors_path)), exist_ok=True)

    tensors = _module_tensors("model", model)
    if ema is not None:
        tensors.update(_module_tensors("ema", ema))
    optim_meta = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, state in sd["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.state.{idx}.{key}"] = value.detach().cpu().clone().contiguous()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        optim_meta = {"class": type(optimizer).__name__, "param_groups": _jsonable(sd["param_groups"]),
                      "state_indices": [int(i) for i in sd["state"]], "scalars": _jsonable(scalars)}
    rng_tensors, rng_meta = _rng_state()
    tensors.update(rng_tensors)

    if hasattr(config, "__dataclass_fields__"):
        config = asdict(config)
    meta = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "config": _jsonable(config),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_config": _jsonable(getattr(model, "config", None)),
        "has_ema": ema is not None,
        "optimizer": optim_meta,
        "rng": rng_meta,
        "extra": _jsonable(extra or {}),
    }
    data = save(tensors, metadata={"format": str(FORMAT_VERSION), "step": str(step)})
    meta["tensors"] = {"file": os.path.basename(tensors_path), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()}
    # Tensors first, the JSON (with their hash) last: a JSON on disk marks a complete checkpoint.
    _write_atomic(tensors_path, data)
    _write_atomic(meta_path, json.dumps(meta).encode())
    return tensors_path


# fsync makes a checkpoint survive a power cut or an OS crash too (a killed process loses nothing
# without it: the data is in the page cache). It costs ~10 ms a file on a VM disk: tests that write
# hundreds of checkpoints turn it off with FASTCOMP_CHECKPOINT_FSYNC=0.
FSYNC = os.environ.get("FASTCOMP_CHECKPOINT_FSYNC", "1") != "0"


def _write_atomic(path: str, data: bytes) -> None:
    """Write to path.tmp, flush it to disk, rename over path, flush the directory: after a crash, path is
    either the old file or the whole new one."""
    with open(path + ".tmp", "wb") as f:
        f.write(data)
        if FSYNC:
            f.flush()
            os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    if not FSYNC:
        return
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:  # some filesystems cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read. `tensors` holds every tensor of the file (model.*, ema.*, ...)."""
    path: str
    step: int
    config: Any
    model_config: Any
    extra: dict
    meta: dict = field(repr=False)
    tensors: dict = field(repr=False)
    # load_checkpoint(directory): newer checkpoints that did not verify, [(path, CheckpointError)]
    skipped: list = field(default_factory=list, repr=False)

    def state_dict(self, prefix: str = "model") -> dict[str, torch.Tensor]:
        """The model's (prefix="model") or the EMA's (prefix="ema") state dict."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}


def read_checkpoint(tensors_path: str) -> Checkpoint:
    """Read and verify one checkpoint (its .safetensors path); CheckpointError names the file and why."""
    tensors_path, meta_path = _paths(tensors_path)
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint sidecar {meta_path} is missing: the checkpoint is incomplete "
                              "(a write was interrupted); use an older checkpoint of the run") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"checkpoint sidecar {meta_path} is unreadable ({type(e).__name__}: {e}); "
                              "use an older checkpoint of the run") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"checkpoint sidecar {meta_path} holds no checkpoint record (no integer 'step'); "
                              "use an older checkpoint of the run")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: checkpoint format {meta.get('format')!r} is not {FORMAT_VERSION}; "
                              "it was written by an incompatible fastcomp version")
    try:
        with open(tensors_path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {tensors_path} is missing (its sidecar {meta_path} exists): the "
                              "checkpoint is incomplete; use an older checkpoint of the run") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {tensors_path} is unreadable ({e})") from None
    record = meta.get("tensors")
    if isinstance(record, dict):
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != record.get("bytes") or digest != record.get("sha256"):
            raise CheckpointError(
                f"checkpoint {tensors_path} is corrupt: it has {len(data)} bytes with SHA-256 {digest[:16]}..., "
                f"but its sidecar {os.path.basename(meta_path)} recorded {record.get('bytes')} bytes with "
                f"{str(record.get('sha256'))[:16]}... (truncated, overwritten or damaged on disk); use an older "
                "checkpoint of the run")
    else:
        warnings.warn(f"{meta_path} records no hash of {os.path.basename(tensors_path)} (written by an older "
                      "fastcomp): its tensors cannot be verified", CheckpointWarning, stacklevel=3)
    try:
        tensors = load(data)
    except Exception as e:  # SafetensorError and friends: a file that is no safetensors file
        raise CheckpointError(f"checkpoint {tensors_path} is not a readable safetensors file ({e})") from None
    return Checkpoint(path=tensors_path, step=meta["step"], config=meta.get("config"),
                      model_config=meta.get("model_config"), extra=meta.get("extra") or {}, meta=meta,
                      tensors=tensors)


def _newest_intact(out_dir: str, before: Optional[str] = None) -> tuple[Optional[Checkpoint], list]:
    """(the newest checkpoint in out_dir that verifies, [(path, CheckpointError) of newer ones that do
    not]); `before`: only consider checkpoints older than this path."""
    skipped = []
    candidates = list_checkpoints(out_dir)
    if before is not None:
        candidates = [c for c in candidates if os.path.basename(c) < os.path.basename(before)]
    for path in reversed(candidates):
        try:
            return read_checkpoint(path), skipped
        except CheckpointError as e:
            skipped.append((path, e))
    return None, skipped


def load_checkpoint(path: str, model: Optional[torch.nn.Module] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, *, ema: Optional[torch.nn.Module] = None,
                    restore_rng: bool = False, strict: bool = True) -> Checkpoint:
    """Read a checkpoint (a file, or the newest intact one in a directory), verify it, and load it into
    the given objects.

    path: a checkpoint (.safetensors, .json or their stem): refused with a CheckpointError when it does not
    verify (the message names an intact older one to use instead, if there is one). A directory: its
    newest checkpoint; one that does not verify is skipped with a CheckpointWarning (never deleted) and
    the next older one is used; ``Checkpoint.skipped`` lists what was skipped and why.
    model / ema / optimizer: loaded in place when given (tensors are moved to their devices). restore_rng:
    also restore the global torch, CUDA, numpy and python RNG states saved with it (exact resume of code
    that uses the global RNGs, e.g. dropout). Returns a :class:`Checkpoint`.
    """
    if os.path.isdir(path):
        find_checkpoint(path)  # FileNotFoundError when there is none at all
        ckpt, skipped = _newest_intact(path)
        if ckpt is None:
            raise CheckpointError(f"no checkpoint in {path} verifies: "
                                  + "; ".join(str(e) for _, e in skipped))
        for bad, e in skipped:
            warnings.warn(f"skipping {bad}: {e}; using {ckpt.path} (step {ckpt.step}) instead. The skipped "
                          "file is left in place", CheckpointWarning, stacklevel=2)
        ckpt.skipped = skipped
    else:
        tensors_path = _paths(path)[0]
        try:
            ckpt = read_checkpoint(find_checkpoint(path))
        except CheckpointError as e:
            folder = os.path.dirname(os.path.abspath(tensors_path))
            older, _ = _newest_intact(folder, before=tensors_path)
            if older is not None:
                raise CheckpointError(f"{e}. The newest intact checkpoint before it is {older.path} (step "
                                      f"{older.step}): pass that file, or the folder {folder} to use the newest "
                                      "one that verifies") from None
            raise
    restore(ckpt, model, optimizer, ema=ema, restore_rng=restore_rng, strict=strict)
    return ckpt


def restore(ckpt: Checkpoint, model: Optional[torch.nn.Module] = None,
            optimizer: Optional[torch.optim.Optimizer] = None, *, ema: Optional[torch.nn.Module] = None,
            restore_rng: bool = False, strict: bool = True) -> None:
    """Load a read checkpoint into model / optimizer / ema (and the global RNGs): see load_checkpoint."""
    meta, tensors, tensors_path = ckpt.meta, ckpt.tensors, ckpt.path
    if model is not None:
        model.load_state_dict(ckpt.state_dict("model"), strict=strict)
    if ema is not None:
        if not meta.get("has_ema"):
            raise ValueError(f"{tensors_path} holds no EMA weights: it was trained with ema_decay=None; "
                             "pass ema=None or train with an EMA")
        ema.load_state_dict(ckpt.state_dict("ema"), strict=strict)
    if optimizer is not None:
        om = meta.get("optimizer")
        if om is None:
            raise ValueError(f"{tensors_path} holds no optimizer state; pass optimizer=None")
        state: dict[int, dict[str, Any]] = {}
        for idx in om["state_indices"]:
            state[idx] = dict(om["scalars"].get(str(idx), {}))
        for key, value in tensors.items():
            if key.startswith("optimizer.state."):
                idx, name = key[len("optimizer.state."):].split(".", 1)
                state.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": om["param_groups"]})
    if restore_rng:
        _set_rng_state(tensors, meta["rng"])
