"""Training under SIGKILL, for test_faults_runs.py: run as a subprocess,

    python fault_worker.py PLAN.json RESULT.json

it imports torch once, then forks one child per attempt. Each child resumes the run in plan["out_dir"]
(a checkpoint every step, the two newest kept) and is SIGKILLed at a point the plan picks:
  ("op", n, "before" | "after")  at the n-th file operation of checkpointing or pruning (os.replace,
                                 os.remove), before or after it runs;
  ("torn", n)                    while writing the n-th checkpoint file: half its bytes are on disk;
  ("timer", seconds)             by this process, after that long (anywhere: a step, a write, a prune);
  None                           not at all: the run finishes.
A plan gives a list of kills, then n_kills more drawn from an RNG seeded with plan["seed"]. After the last child
finished, the same run is trained here uninterrupted and the two are compared bitwise (every tensor of
the final checkpoint, and the loss history). Forking is safe here: this process never ran an OpenMP
region (one torch thread, nothing computed before the children).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import traceback
import warnings

os.environ["FASTCOMP_CHECKPOINT_FSYNC"] = "0"  # a killed process loses nothing without fsync

import torch  # noqa: E402

torch.set_num_threads(1)

from fastcomp.train import CheckpointWarning, checkpoint, train  # noqa: E402
from fastcomp.train.checkpoint import list_checkpoints, read_checkpoint  # noqa: E402
from test_train import TinyScenes, cfg, fresh, tiny_loss  # noqa: E402


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(kill) -> None:
    """Install the kill point in this (child) process."""
    if kill is None or kill[0] == "timer":
        return
    count = [0]
    if kill[0] == "op":
        n, when = kill[1], kill[2]

        def wrap(fn):
            def wrapped(*args, **kwargs):
                count[0] += 1
                if count[0] == n and when == "before":
                    _die()
                result = fn(*args, **kwargs)
                if count[0] == n and when == "after":
                    _die()
                return result
            return wrapped

        os.replace, os.remove = wrap(os.replace), wrap(os.remove)
    else:  # torn write
        real = checkpoint._write_atomic

        def torn(path, data):
            count[0] += 1
            if count[0] == kill[1]:
                with open(path + ".tmp", "wb") as f:
                    f.write(data[: len(data) // 2])
                _die()
            real(path, data)

        checkpoint._write_atomic = torn


def _run(out_dir: str, steps: int, resume) -> None:
    train(fresh(0.2), TinyScenes(), cfg(steps=steps, checkpoint_every=1, keep_checkpoints=2, log_every=1,
                                        out_dir=out_dir), loss_fn=tiny_loss, resume=resume, progress=False)


def _child(out_dir: str, steps: int, kill) -> None:
    _arm(kill)
    with warnings.catch_warnings():
        # Atomic writes mean a kill never leaves a corrupt checkpoint to skip: that would be a bug.
        warnings.filterwarnings("error", message="skipping", category=CheckpointWarning)
        _run(out_dir, steps, resume=True if list_checkpoints(out_dir) else None)


def _random_kills(rng: random.Random, n: int) -> list:
    kills = []
    for _ in range(n):
        kind = rng.choice(["op", "op", "torn", "timer"])
        if kind == "op":
            kills.append(["op", rng.randint(1, 60), rng.choice(["before", "after"])])
        elif kind == "torn":
            kills.append(["torn", rng.randint(1, 30)])
        else:
            kills.append(["timer", rng.uniform(0.0, 0.4)])
    return kills


def main(plan_path: str, result_path: str) -> int:
    with open(plan_path) as f:
        plan = json.load(f)
    out_dir, steps = plan["out_dir"], plan["steps"]
    kills = list(plan.get("kills", [])) + _random_kills(random.Random(plan["seed"]), plan.get("n_kills", 0))
    os.makedirs(out_dir, exist_ok=True)
    killed, log = 0, []
    for kill in kills + [None]:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _child(out_dir, steps, kill)
            except BaseException:
                traceback.print_exc()
                code = 3
            sys.stderr.flush()
            os._exit(code)
        if kill is not None and kill[0] == "timer":
            time.sleep(kill[1])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
        newest = list_checkpoints(out_dir)
        log.append({"kill": kill, "status": status, "newest": os.path.basename(newest[-1]) if newest else None})
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            killed += 1
        elif not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            json.dump({"error": f"a child failed (status {status}); its traceback is on stderr", "log": log},
                      open(result_path, "w"))
            return 1
        elif kill is not None:  # finished before its kill point: the remaining kills have nothing to hit
            break
    left = sorted(os.listdir(out_dir))
    final = read_checkpoint(list_checkpoints(out_dir)[-1])
    ref_dir = out_dir + "-uninterrupted"
    _run(ref_dir, steps, resume=None)
    ref = read_checkpoint(list_checkpoints(ref_dir)[-1])
    differ = sorted(k for k in set(final.tensors) | set(ref.tensors)
                    if k not in final.tensors or k not in ref.tensors or not torch.equal(final.tensors[k], ref.tensors[k]))
    json.dump({"killed": killed, "log": log, "left": left, "step": final.step,
               "tensors_differ": differ, "losses_equal": final.extra["losses"] == ref.extra["losses"]},
              open(result_path, "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
