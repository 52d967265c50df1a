"""Checkpoints: tensors in safetensors, everything else in a JSON sidecar.

A checkpoint is two files written side by side::

    <dir>/checkpoint-00001000.safetensors   model.*, ema.*, optimizer.state.<param index>.<key>, rng.*
    <dir>/checkpoint-00001000.json          step, train config, the model's .config, optimizer
                                            param_groups and non-tensor state, RNG states, extra

safetensors holds only tensors (no pickle: loading a checkpoint cannot run code); the JSON is readable
by people and tools. The JSON is written last, so a checkpoint whose JSON exists is complete: a run
killed while writing leaves at most an orphan .safetensors that :func:`find_checkpoint` ignores.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)\.json$")


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


def find_checkpoint(path: str) -> str:
    """A checkpoint file, or the newest complete checkpoint in a directory -> its .safetensors path."""
    if os.path.isdir(path):
        found = sorted((int(m.group(1)), name) for name in os.listdir(path) if (m := _NAME.match(name)))
        if not found:
            raise FileNotFoundError(f"no checkpoint-*.json in {path!r}: pass a directory a training run "
                                    "wrote checkpoints into, or a checkpoint file")
        return _paths(os.path.join(path, found[-1][1]))[0]
    tensors, meta = _paths(path)
    if not (os.path.exists(tensors) and os.path.exists(meta)):
        raise FileNotFoundError(f"checkpoint {path!r} not found: need both {tensors!r} and {meta!r}")
    return tensors


def _jsonable(value: Any) -> Any:
    """Best-effort JSON for configs: tuples become lists, paths/dtypes/devices become strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
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
    from safetensors.torch import save_file

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
        from dataclasses import asdict
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
    # Write both to temporary names and rename: a reader never sees a half-written file, and the JSON,
    # renamed last, marks the checkpoint complete.
    save_file(tensors, tensors_path + ".tmp", metadata={"format": str(FORMAT_VERSION), "step": str(step)})
    os.replace(tensors_path + ".tmp", tensors_path)
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f)
    os.replace(meta_path + ".tmp", meta_path)
    return tensors_path


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

    def state_dict(self, prefix: str = "model") -> dict[str, torch.Tensor]:
        """The model's (prefix="model") or the EMA's (prefix="ema") state dict."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}


def load_checkpoint(path: str, model: Optional[torch.nn.Module] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, *, ema: Optional[torch.nn.Module] = None,
                    restore_rng: bool = False, strict: bool = True) -> Checkpoint:
    """Read a checkpoint (a file, or the newest one in a directory) and load it into the given objects.

    model / ema / optimizer: loaded in place when given (tensors are moved to their devices). restore_rng:
    also restore the global torch, CUDA, numpy and python RNG states saved with it (exact resume of code
    that uses the global RNGs, e.g. dropout). Returns a :class:`Checkpoint`.
    """
    from safetensors.torch import load_file

    tensors_path = find_checkpoint(path)
    _, meta_path = _paths(tensors_path)
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: checkpoint format {meta.get('format')!r} is not {FORMAT_VERSION}; "
                         "it was written by an incompatible fastcomp version")
    tensors = load_file(tensors_path)
    ckpt = Checkpoint(path=tensors_path, step=int(meta["step"]), config=meta.get("config"),
                      model_config=meta.get("model_config"), extra=meta.get("extra") or {}, meta=meta,
                      tensors=tensors)
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
    return ckpt
