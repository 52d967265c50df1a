"""Faults on purpose (issue 13), training runs and checkpoints: corrupt and incomplete checkpoints, runs
that would overwrite each other, bad out_dirs, resumes with another config, and SIGKILLs at random points
of checkpoint writes and prunes (a 200-step soak among them), each resumed bitwise exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcomp.models import ConditionalDenoiser
from fastcomp.train import CheckpointError, CheckpointWarning, load_checkpoint, train
from fastcomp.train import checkpoint as checkpoint_module
from test_train import TinyScenes, cfg, fresh, same_state, tiny_loss

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).parent


def run(out_dir, steps=6, every=2, resume=None, model=None, **kw):
    config = cfg(steps=steps, checkpoint_every=every, out_dir=str(out_dir), **kw)
    return train(model or fresh(), TinyScenes(), config, loss_fn=tiny_loss, resume=resume, progress=False)


@pytest.fixture(scope="module")
def uninterrupted():
    """Six steps, no checkpoints: what every resumed run below must reproduce bitwise (on one thread, as
    the tests run: a module fixture is set up before their one_thread fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(fresh(), TinyScenes(), cfg(steps=6), loss_fn=tiny_loss, progress=False)
    finally:
        torch.set_num_threads(threads)


def ckpt(out_dir, step, ext="safetensors") -> Path:
    return Path(out_dir) / f"checkpoint-{step:08d}.{ext}"


# --- corrupt or incomplete newest checkpoint ----------------------------------------------------------------
# Was: flipped bytes resumed silently (loss 3.6e13); truncated / empty / bad JSON / missing tensors gave raw
# SafetensorError or JSONDecodeError tracebacks, and the intact older checkpoint was neither used nor offered.

def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 8, 7):  # tensor data sits at the end, after the header
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped bytes": (_flip, "corrupt"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "corrupt"),
    "empty": (lambda p: p.write_bytes(b""), "corrupt"),
    "bad JSON": (lambda p: p.with_suffix(".json").write_text('{"step": 4, "format'), "unreadable"),
    "missing tensors": (lambda p: p.unlink(), "missing"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_refused_and_resume_falls_back(tmp_path, corruption, uninterrupted):
    damage, reason = CORRUPTIONS[corruption]
    run(tmp_path, steps=4)
    damage(ckpt(tmp_path, 4))
    with pytest.raises(CheckpointError, match=f"checkpoint.*{ckpt(tmp_path, 4).stem}.*{reason}.*newest intact "
                                              f"checkpoint before it is .*{ckpt(tmp_path, 2).name}"):
        load_checkpoint(str(ckpt(tmp_path, 4)))
    with pytest.warns(CheckpointWarning, match=f"skipping .*{ckpt(tmp_path, 4).name}.*{reason}.*using "
                                               f".*{ckpt(tmp_path, 2).name}"):
        resumed = run(tmp_path, steps=6, resume=True)
    assert resumed.losses == uninterrupted.losses  # from step 2, bitwise
    assert same_state(resumed.model, uninterrupted.model)
    # Never deleted: set aside for inspection, out of the resumed run's way.
    kept = sorted(n for n in os.listdir(tmp_path) if n.endswith(".corrupt"))
    assert kept and all(n.startswith(ckpt(tmp_path, 4).stem) for n in kept)
    assert load_checkpoint(str(tmp_path)).step == 6


def test_every_checkpoint_records_and_verifies_its_hash(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(checkpoint_module, "FSYNC", True)
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    run(tmp_path, steps=2, every=1)
    meta = json.loads(ckpt(tmp_path, 2, "json").read_text())
    data = ckpt(tmp_path, 2).read_bytes()
    assert meta["tensors"] == {"file": ckpt(tmp_path, 2).name, "bytes": len(data),
                               "sha256": hashlib.sha256(data).hexdigest()}
    assert len(calls) >= 4  # each file and its directory flushed to disk (FSYNC on, the default)
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies"):
        for step in (1, 2):
            _flip(ckpt(tmp_path, step))
        load_checkpoint(str(tmp_path))


# --- runs never overwrite each other ---------------------------------------------------------------------
# Was: train() without resume into another run's folder overwrote its step 2 and 4 checkpoints, its step 6
# survived, and --resume then picked the OLD run.

def test_a_folder_holding_another_run_is_refused_unless_overwrite(tmp_path):
    run(tmp_path, steps=6)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    calls = []

    def counting_loss(model, batch, generator):
        calls.append(1)
        return tiny_loss(model, batch, generator)

    with pytest.raises(FileExistsError, match="already holds another run's checkpoints.*overwrite=True"):
        train(fresh(), TinyScenes(), cfg(steps=4, seed=9, checkpoint_every=2, out_dir=str(tmp_path)),
              loss_fn=counting_loss, progress=False)
    assert not calls, "refused before step 0"
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
    new = train(fresh(), TinyScenes(), cfg(steps=4, seed=9, checkpoint_every=2, out_dir=str(tmp_path)),
                loss_fn=tiny_loss, overwrite=True, progress=False)
    assert sorted(os.listdir(tmp_path)) == [ckpt(tmp_path, s, e).name for s in (2, 4) for e in ("json", "safetensors")]
    assert load_checkpoint(str(tmp_path)).config["seed"] == 9 and new.step == 4


@pytest.mark.parametrize("out_dir", ["a file", "under a file", ""])
def test_a_bad_out_dir_is_refused_before_step_0(tmp_path, out_dir):
    (tmp_path / "f").write_text("not a folder")
    if out_dir == "":
        with pytest.raises(ValueError, match="TrainConfig.out_dir='': must be a directory path"):
            cfg(out_dir="")
        return
    path = tmp_path / "f" if out_dir == "a file" else tmp_path / "f" / "run"
    calls = []
    with pytest.raises(OSError, match="TrainConfig.out_dir=.*(is a file, not a directory|cannot be written)"):
        train(fresh(), TinyScenes(), cfg(steps=2, checkpoint_every=1, out_dir=str(path)),
              loss_fn=lambda m, b, g: calls.append(1) or tiny_loss(m, b, g), progress=False)
    assert not calls


# --- resume with another config ---------------------------------------------------------------------------
# Was: the same parameter shapes with another config (kernel 7 -> 3, local -> global) resumed silently, and the
# checkpoints then recorded a config that was not used.

def _denoiser(**kw):
    torch.manual_seed(0)
    return ConditionalDenoiser(img_channels=1, image_size=7, channels=8, depth=1, num_heads=2, **kw)


@pytest.mark.parametrize("change,match", [
    (dict(model=dict(kernel_size=3)), "model kernel_size=7 \\(now kernel_size=3\\)"),
    (dict(model=dict(locality="global")), "model locality='local' \\(now locality='global'\\)"),
    (dict(config=dict(lr=5e-2)), "lr=0.01 \\(now lr=0.05\\)"),
])
def test_resume_refuses_another_config_naming_the_fields(tmp_path, change, match):
    run(tmp_path, steps=2, every=1, model=_denoiser(kernel_size=7))
    model = _denoiser(**{"kernel_size": 7, **change.get("model", {})})
    with pytest.raises(ValueError, match=f"cannot resume .*checkpoint-00000002.*trained with .*{match}"):
        run(tmp_path, steps=3, every=1, model=model, resume=True, **change.get("config", {}))
    assert load_checkpoint(str(tmp_path)).step == 2


def test_resume_warns_about_harmless_differences(tmp_path):
    run(tmp_path, steps=2, every=1)
    with pytest.warns(UserWarning, match="which a resume may change .*: log_every=2 \\(now log_every=1\\)"):
        run(tmp_path, steps=3, every=1, resume=True, log_every=1)


# --- orphans of an interrupted prune --------------------------------------------------------------------
# Was: a SIGKILL between the two removals of a prune left an orphan .safetensors that was never removed.

def test_orphans_of_interrupted_writes_and_prunes_are_removed_at_the_next_start(tmp_path, uninterrupted):
    run(tmp_path, steps=4, every=1, keep_checkpoints=3)  # 2, 3, 4
    ckpt(tmp_path, 2, "json").unlink()  # killed between the prune's two removals
    (tmp_path / "checkpoint-00000005.safetensors.tmp").write_bytes(b"half")  # killed while writing
    with pytest.warns(CheckpointWarning, match="removed 2 incomplete checkpoint file"):
        resumed = run(tmp_path, steps=6, every=1, keep_checkpoints=3, resume=True)
    assert resumed.losses == uninterrupted.losses
    assert sorted(os.listdir(tmp_path)) == [ckpt(tmp_path, s, e).name for s in (4, 5, 6)
                                            for e in ("json", "safetensors")]


# --- SIGKILL at any point of a checkpoint write or a prune ----------------------------------------------------

def _kill_and_resume(tmp_path, plan: dict, timeout: float) -> dict:
    plan = {"out_dir": str(tmp_path / "run"), **plan}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    result = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(TESTS / "fault_worker.py"), str(tmp_path / "plan.json"), str(result)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:] + (result.read_text() if result.exists() else "")
    out = json.loads(result.read_text())
    assert out["tensors_differ"] == [] and out["losses_equal"], out
    # Only the two newest checkpoints are left: no orphan, no .tmp, nothing set aside.
    steps = plan["steps"]
    assert out["left"] == [f"checkpoint-{s:08d}.{e}" for s in (steps - 1, steps) for e in ("json", "safetensors")]
    return out


@pytest.mark.slow
def test_soak_200_steps_with_sigkills_in_writes_and_prunes_ends_bitwise_equal(tmp_path):
    # One checkpoint + prune is: tensors .tmp -> rename, JSON .tmp -> rename, then two removals. First
    # kills at chosen points of those (before / after a rename or a removal, half a file written), then
    # random ones (a file operation, a torn write or a timer, anywhere in a step), each run resumed.
    chosen = [["op", 9, "after"], ["op", 2, "before"], ["torn", 4], ["op", 12, "before"], ["op", 7, "after"],
              ["torn", 1]]
    out = _kill_and_resume(tmp_path, {"steps": 200, "kills": chosen, "seed": 13, "n_kills": 12}, timeout=300)
    assert out["killed"] >= len(chosen) + 8, out["log"]
