"""fastcomp.train: the training loop behind `fastcomp train`.

    config = TrainConfig(steps=2000, batch_size=64, lr=2e-4, out_dir="runs/shapes")
    result = train(model, dataset, config)          # dataset.sample(n, *, generator) -> SceneBatch
    result.losses, result.ema, result.checkpoint, result.samples_per_second
    train(model, dataset, TrainConfig(steps=4000, ...), resume="runs/shapes")   # exact resume

AdamW with linear warmup, gradient clipping, an EMA of the weights, bf16 autocast and torch.compile on
CUDA, checkpoints in safetensors + JSON, and DistributedDataParallel under torchrun.
"""

from .checkpoint import (Checkpoint, CheckpointError, CheckpointWarning, find_checkpoint, load_checkpoint,
                         save_checkpoint)
from .loop import TrainConfig, TrainResult, step_generators, train

__all__ = ["TrainConfig", "TrainResult", "train", "save_checkpoint", "load_checkpoint", "find_checkpoint",
           "Checkpoint", "CheckpointError", "CheckpointWarning", "step_generators"]
