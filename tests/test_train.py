"""fastcomp.train: exact resume, EMA, safetensors checkpoints, config errors, DDP on 2 gloo processes, CLI.

The loop is tested with tiny stand-ins of the contract's pieces (a denoiser with the ConditionalDenoiser
forward signature, a dataset whose .sample returns a SceneBatch-like NamedTuple, an EDM-like loss), so
these tests do not depend on fastcomp.models / fastcomp.data; the CLI test on the real ones skips until
those are importable.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn

from fastcomp.train import TrainConfig, find_checkpoint, load_checkpoint, save_checkpoint, train
from fastcomp.train import loop as train_loop

from helpers import ddp_worker_env, run_spawned

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: see conftest.one_thread


# --- stand-ins ---------------------------------------------------------------------------------------

class Batch(NamedTuple):
    images: torch.Tensor  # [n, C, S, S]
    points: torch.Tensor  # [n, M, 2]
    valid: torch.Tensor   # [n, M]


class TinyScenes:
    """A bump at a random place per image: enough structure for a loss that goes down."""

    def __init__(self, size: int = 7, channels: int = 1):
        self.size, self.channels = size, channels

    def sample(self, n: int, *, generator=None) -> Batch:
        pts = torch.rand(n, 1, 2, generator=generator) * (self.size - 1)
        rows = torch.arange(self.size, dtype=torch.float32)
        d2 = (rows[None, :, None] - pts[:, 0, 0, None, None]) ** 2 + (rows[None, None, :] - pts[:, 0, 1, None, None]) ** 2
        img = (2 * torch.exp(-d2 / 2) - 1)[:, None].expand(n, self.channels, self.size, self.size)
        return Batch(img.contiguous(), pts, torch.ones(n, 1, dtype=torch.bool))


class TinyDenoiser(nn.Module):
    """forward(x, sigma, points, valid=None) -> denoised x, like ConditionalDenoiser."""

    def __init__(self, channels: int = 1, width: int = 8, dropout: float = 0.0):
        super().__init__()
        self.config = {"channels": channels, "width": width, "dropout": dropout}
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.cond = nn.Linear(3, width)
        self.norm = nn.GroupNorm(2, width)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, sigma, points, valid=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        c = torch.cat([points.mean(1) / x.shape[-1], sigma.log()[:, None] / 4], dim=1)
        h = self.inp(x / (1 + sigma[:, None, None, None] ** 2).sqrt()) + self.cond(c)[:, :, None, None]
        h = self.drop(torch.nn.functional.silu(self.norm(h)))
        return x / (1 + sigma[:, None, None, None] ** 2) + self.out(h)


def tiny_loss(model, batch, generator):
    n = batch.images.shape[0]
    sigma = torch.exp(torch.randn(n, generator=generator) - 1.0).to(batch.images.device)
    noise = torch.randn(batch.images.shape, generator=generator).to(batch.images.device)
    denoised = model(batch.images + sigma[:, None, None, None] * noise, sigma, batch.points, batch.valid)
    return (denoised - batch.images).square().mean()


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, lr=1e-2, warmup_steps=2, grad_clip=1.0, ema_decay=0.9, seed=3,
                log_every=2, compile=False)
    base.update(kw)
    return TrainConfig(**base)


def fresh(dropout: float = 0.0) -> TinyDenoiser:
    torch.manual_seed(0)
    return TinyDenoiser(dropout=dropout)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- the loop ----------------------------------------------------------------------------------------

def test_training_reduces_the_loss_and_reports_throughput():
    res = train(fresh(), TinyScenes(), cfg(steps=30, lr=2e-2, log_every=5), loss_fn=tiny_loss, progress=False)
    assert len(res.losses) == 30 and res.step == 30 and res.checkpoint is None
    assert sum(res.losses[-5:]) < sum(res.losses[:5])
    assert res.samples_per_second > 0 and res.seconds > 0


def test_exact_resume_is_bitwise(tmp_path):
    # Dropout draws from the global torch RNG: the checkpoint's RNG state must be restored for bitwise
    # equality too, not only the per-step generators.
    full = train(fresh(0.2), TinyScenes(), cfg(), loss_fn=tiny_loss, progress=False)
    first = train(fresh(0.2), TinyScenes(), cfg(steps=4, checkpoint_every=2, out_dir=str(tmp_path)),
                  loss_fn=tiny_loss, progress=False)
    assert first.checkpoint == find_checkpoint(str(tmp_path)) and first.checkpoint.endswith("00000004.safetensors")
    torch.manual_seed(1234)  # the resumed process's RNG is elsewhere: resume must restore it
    other_init = TinyDenoiser(dropout=0.2)  # different weights: resume must overwrite them
    resumed = train(other_init, TinyScenes(), cfg(out_dir=str(tmp_path)), loss_fn=tiny_loss, resume=True,
                    progress=False)
    assert resumed.losses == full.losses  # floats compared exactly, the resumed steps included
    assert same_state(resumed.model, full.model)
    assert same_state(resumed.ema, full.ema)
    # Resuming at the final step trains nothing and returns the same model.
    again = train(TinyDenoiser(dropout=0.2), TinyScenes(), cfg(out_dir=str(tmp_path)), loss_fn=tiny_loss,
                  resume=True, progress=False)
    assert again.losses == full.losses and same_state(again.model, full.model)


def test_resume_refuses_a_different_data_stream(tmp_path):
    train(fresh(), TinyScenes(), cfg(steps=2, out_dir=str(tmp_path)), loss_fn=tiny_loss, progress=False)
    with pytest.raises(ValueError, match="seed=3.*seed=4"):
        train(fresh(), TinyScenes(), cfg(seed=4), loss_fn=tiny_loss, resume=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="past TrainConfig.steps=1"):
        train(fresh(), TinyScenes(), cfg(steps=1), loss_fn=tiny_loss, resume=str(tmp_path), progress=False)


def test_ema_follows_the_weights():
    init = fresh()
    one = train(fresh(), TinyScenes(), cfg(steps=1, ema_decay=0.75), loss_fn=tiny_loss, progress=False)
    for (name, pe), p0, p1 in zip(one.ema.named_parameters(), init.parameters(), one.model.parameters()):
        torch.testing.assert_close(pe, 0.75 * p0 + 0.25 * p1, msg=name)
        assert not pe.requires_grad
    none = train(fresh(), TinyScenes(), cfg(steps=2, ema_decay=None), loss_fn=tiny_loss, progress=False)
    assert none.ema is None
    zero = train(fresh(), TinyScenes(), cfg(steps=2, ema_decay=0.0), loss_fn=tiny_loss, progress=False)
    assert same_state(zero.ema, zero.model)


def test_warmup_ramps_the_learning_rate(monkeypatch):
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(fresh(), TinyScenes(), cfg(steps=5, lr=0.4, warmup_steps=4), loss_fn=tiny_loss, progress=False)
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4])


def test_bf16_autocast_on_cpu_runs():
    res = train(fresh(), TinyScenes(), cfg(steps=3, precision="bf16"), loss_fn=tiny_loss, progress=False)
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert next(res.model.parameters()).dtype == torch.float32  # autocast, not a cast of the weights


def test_per_step_batches_do_not_depend_on_history():
    d0, _ = train_loop.step_generators(3, 5)
    d1, n1 = train_loop.step_generators(3, 5)
    assert torch.equal(torch.rand(4, generator=d0), torch.rand(4, generator=d1))
    assert not torch.equal(torch.rand(4, generator=train_loop.step_generators(3, 6)[0]),
                           torch.rand(4, generator=train_loop.step_generators(3, 5)[0]))
    assert not torch.equal(torch.rand(4, generator=train_loop.step_generators(4, 5)[0]),
                           torch.rand(4, generator=train_loop.step_generators(3, 5)[0]))


# --- checkpoints -------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    from safetensors import safe_open

    model = fresh()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 7, 7), 0.5, torch.rand(2, 1, 2)).square().mean().backward()
    opt.step()
    ema = TinyDenoiser()
    expected_rng = torch.get_rng_state()  # what the checkpoint records
    path = save_checkpoint(str(tmp_path / "c.safetensors"), model, opt, step=7, config=cfg(), ema=ema,
                           extra={"note": "hi"})
    with safe_open(path, framework="pt") as f:  # a real safetensors file with every part in it
        keys = set(f.keys())
    assert {"model.inp.weight", "ema.out.bias", "optimizer.state.0.exp_avg", "rng.torch"} <= keys
    meta = json.loads((tmp_path / "c.json").read_text())
    assert meta["step"] == 7 and meta["model_config"] == model.config and meta["config"]["seed"] == 3

    model2, ema2 = TinyDenoiser(width=8), TinyDenoiser()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    torch.rand(3)
    ck = load_checkpoint(str(tmp_path / "c"), model2, opt2, ema=ema2, restore_rng=True)  # the stem works too
    assert ck.step == 7 and ck.extra == {"note": "hi"} and ck.config["batch_size"] == 4
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert same_state(model2, model) and same_state(ema2, ema)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"][0]["lr"] == s2["param_groups"][0]["lr"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(torch.as_tensor(s1["state"][i][k]), torch.as_tensor(s2["state"][i][k]))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="need both"):
        load_checkpoint(str(tmp_path / "nope.safetensors"))
    model = fresh()
    save_checkpoint(str(tmp_path / "c.safetensors"), model, step=1)
    with pytest.raises(ValueError, match="no EMA"):
        load_checkpoint(str(tmp_path / "c.safetensors"), model, ema=TinyDenoiser())
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(str(tmp_path / "c.json"), model, torch.optim.AdamW(model.parameters()))


def test_old_checkpoints_are_pruned(tmp_path):
    train(fresh(), TinyScenes(), cfg(steps=6, checkpoint_every=1, keep_checkpoints=2, out_dir=str(tmp_path)),
          loss_fn=tiny_loss, progress=False)
    assert sorted(os.listdir(tmp_path)) == [f"checkpoint-0000000{i}.{e}" for i in (5, 6)
                                            for e in ("json", "safetensors")]


# --- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,match", [
    ("steps", 0, "TrainConfig.steps=0"),
    ("batch_size", 2.5, "TrainConfig.batch_size"),
    ("lr", -1.0, "TrainConfig.lr=-1.0.*> 0"),
    ("lr", float("nan"), "TrainConfig.lr"),
    ("grad_clip", 0.0, "TrainConfig.grad_clip.*None to disable"),
    ("ema_decay", 1.0, "TrainConfig.ema_decay.*None for no EMA"),
    ("precision", "fp16", "TrainConfig.precision.*'bf16'"),
    ("compile", "yes", "TrainConfig.compile"),
    ("warmup_steps", -1, "TrainConfig.warmup_steps"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        cfg(**{field: value})


def test_train_argument_errors():
    with pytest.raises(TypeError, match="TrainConfig"):
        train(fresh(), TinyScenes(), {"steps": 1}, loss_fn=tiny_loss)
    with pytest.raises(TypeError, match=r"\.sample"):
        train(fresh(), object(), cfg(), loss_fn=tiny_loss)
    with pytest.raises(ValueError, match="sigma_dist is only used by the default loss"):
        train(fresh(), TinyScenes(), cfg(), loss_fn=tiny_loss, sigma_dist=object())
    with pytest.raises(ValueError, match="resume=True needs TrainConfig.out_dir"):
        train(fresh(), TinyScenes(), cfg(), loss_fn=tiny_loss, resume=True)
    # The global batch must split evenly across DDP ranks (checked before any process group is used).
    with pytest.raises(ValueError, match="batch_size=4 .* must divide by the 3 DDP processes"):
        train_loop._train(fresh(), TinyScenes(), cfg(), tiny_loss, None, False, torch.device("cpu"), 0, 3)


# --- DDP: 2 gloo processes == 1 process on the global batch -------------------------------------------

def _ddp_train_worker(rank: int, port: int, out_dir: str) -> None:
    ddp_worker_env(rank, 2, port)  # RANK/WORLD_SIZE like torchrun: train() initializes the group itself
    model, rows = fresh(), []
    model.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    res = train(model, TinyScenes(), cfg(batch_size=6, out_dir=os.path.join(out_dir, "ckpt")),
                loss_fn=tiny_loss, progress=False)
    torch.save({"rows": rows, "losses": res.losses, "state": res.model.state_dict(), "ema": res.ema.state_dict(),
                "checkpoint": res.checkpoint}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    def clean():
        for f in tmp_path.glob("rank*.pt"):
            f.unlink()

    run_spawned(_ddp_train_worker, (None, str(tmp_path)), on_retry=clean)
    single = train(fresh(), TinyScenes(), cfg(batch_size=6), loss_fn=tiny_loss, progress=False)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["rows"] == r1["rows"] == [3] * 6, "each rank runs the model on its half of the batch"
    assert r0["losses"] == r1["losses"], "every rank reports the same global-batch loss"
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-7)
    for name, p in single.model.state_dict().items():
        torch.testing.assert_close(r0["state"][name], p, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(r0["state"][name], r1["state"][name]), f"{name} differs between the ranks"
    for name, p in single.ema.state_dict().items():
        torch.testing.assert_close(r0["ema"][name], p, rtol=1e-4, atol=1e-6, msg=name)
    # Only rank 0 wrote checkpoints; both ranks report its path.
    assert r0["checkpoint"] == r1["checkpoint"] and os.path.exists(r0["checkpoint"])
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) == 1


# --- the CLI -----------------------------------------------------------------------------------------

def test_cli_trains_saves_and_resumes_with_stand_ins(tmp_path, monkeypatch, capsys):
    from fastcomp.cli import main
    from fastcomp.train import cli as train_cli

    built = []

    def build(args, model_config=None):
        built.append(model_config)
        return (TinyDenoiser(**model_config) if model_config else fresh()), TinyScenes()

    monkeypatch.setattr(train_cli, "build_model_and_dataset", build)
    monkeypatch.setattr(train_cli, "build_loss", lambda args: tiny_loss)
    out = tmp_path / "run"
    common = ["train", "--task", "bumps", "--batch-size", "4", "--out", str(out), "--device", "cpu",
              "--no-progress", "--warmup-steps", "1", "--log-every", "1"]
    assert main(common + ["--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "trained 2 steps" in text and f"checkpoint: {out / 'checkpoint-00000002.safetensors'}" in text
    assert json.loads((out / "run.json").read_text())["args"]["task"] == "bumps"
    assert main(common + ["--steps", "3", "--resume", str(out)]) == 0
    assert built[1] == TinyDenoiser().config  # the resumed model is rebuilt from the checkpoint's config
    assert load_checkpoint(str(out)).step == 3
    assert main(common + ["--steps", "0"]) == 2
    assert "TrainConfig.steps=0" in capsys.readouterr().err


@pytest.mark.parametrize("task,locality", [("bumps", "local"), ("shapes", "global")])
def test_cli_trains_the_real_model(tmp_path, capsys, task, locality):
    from fastcomp.cli import main

    out = tmp_path / task
    assert main(["train", "--task", task, "--locality", locality, "--labelling", "one", "--steps", "2",
                 "--batch-size", "2", "--image-size", "16", "--channels", "16", "--depth", "1",
                 "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert f"checkpoint: {out / 'checkpoint-00000002.safetensors'}" in capsys.readouterr().out
    ck = load_checkpoint(str(out))
    from fastcomp.models import ConditionalDenoiser
    model = ConditionalDenoiser(**ck.model_config)
    model.load_state_dict(ck.state_dict("ema"))


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_defaults_bf16_autocast_and_compile():
    # precision="auto" and compile="auto" turn on bf16 autocast and torch.compile on CUDA.
    model = fresh().cuda()
    res = train(model, TinyScenes(), cfg(steps=4, precision="auto", compile="auto"), loss_fn=tiny_loss,
                progress=False)
    assert all(torch.isfinite(torch.tensor(res.losses))) and len(res.losses) == 4
    assert next(res.model.parameters()).dtype == torch.float32 and res.model is model
