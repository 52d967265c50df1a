"""Faults on purpose (issue 13), the command line: every expected failure is one line,
``fastcomp <cmd>: <what> (<how to fix>)``, with exit code 2 (--debug: the traceback); devices; probes that
never run pickled code unasked and that read what `fastcomp train` writes.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from fastcomp import _cli
from fastcomp.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["train", "--task", "bumps", "--steps", "1", "--batch-size", "2", "--image-size", "16", "--channels", "8",
         "--depth", "1", "--no-progress", "--device", "cpu"]


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"fastcomp {command}: ") and err[0].endswith(")"), err[0]
    return err[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """What `fastcomp train` writes: a run folder with checkpoints and run.json (a tiny real model)."""
    out = tmp_path_factory.mktemp("run") / "bumps"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(TRAIN + ["--steps", "2", "--checkpoint-every", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


# --- expected failures: one line, exit 2 -------------------------------------------------------------------
# Was: raw tracebacks and exit 1 for each of these.

def test_garbage_model_file(tmp_path, capsys):
    # not 0x80 first: a file that starts like a pickle (1 in 256 of random ones) is a pickle error instead
    (tmp_path / "m.pt").write_bytes(b"garbage " + os.urandom(300))
    assert main(["probe", str(tmp_path / "m.pt")]) == 2
    assert "is not a model file" in one_line_error(capsys, "probe")


def test_wrong_channels(tmp_path, capsys):
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 3, 3, padding=1)), tmp_path / "m.pt")
    assert main(["probe", str(tmp_path / "m.pt"), "--channels", "2", "--size", "8"]) == 2
    assert "refused an input of shape [2, 2, 8, 8]" in one_line_error(capsys, "probe")


@pytest.mark.parametrize("command", ["probe", "train"])
def test_cuda_on_a_machine_without_it(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.jit.save(torch.jit.script(torch.nn.Identity()), tmp_path / "m.pt")
    argv = ["probe", str(tmp_path / "m.pt")] if command == "probe" else TRAIN[:-2] + ["--out", str(tmp_path / "o")]
    assert main(argv + ["--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available on this machine" in one_line_error(capsys, command)


def test_resume_of_a_missing_path(tmp_path, capsys):
    assert main(TRAIN + ["--out", str(tmp_path / "o"), "--resume", str(tmp_path / "nope")]) == 2
    assert "not found" in one_line_error(capsys, "train")


def test_image_size_too_small(tmp_path, capsys):
    assert main(["train", "--image-size", "7", "--steps", "1", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "size 7 is too small" in one_line_error(capsys, "train")


@pytest.mark.parametrize("command", ["train", "probe"])
def test_unwritable_out(tmp_path, capsys, command):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub"
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 3, 3, padding=1)), tmp_path / "m.pt")
    argv = TRAIN + ["--out", str(out)] if command == "train" else ["probe", str(tmp_path / "m.pt"), "--size", "6",
                                                                    "--radius", "1", "--out", str(out / "p")]
    assert main(argv) == 2
    assert "file" in one_line_error(capsys, command)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(_cli.CommandError, match="does not exist"):
        main(["probe", str(tmp_path / "nope.pt"), "--debug"])


# --- devices -------------------------------------------------------------------------------------------------
# Was: `fastcomp train --device cuda` failed with "Expected a torch.device with a specified index".

def test_device_cuda_means_the_current_device_or_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert _cli.device("cuda") == torch.device("cuda", 1)
    assert _cli.device(None) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "0")  # under torchrun: the rank's own device
    assert _cli.device("cuda") == torch.device("cuda", 0)
    assert _cli.device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(_cli.CommandError, match="only 2 CUDA device"):
        _cli.device("cuda:5")


# --- training runs from the command line ---------------------------------------------------------------------
# Was: `--resume` with other flags was accepted silently (run.json then recorded flags that were not used),
# another --task / --image-size failed at step 1 with a shape error.

@pytest.mark.parametrize("flags,named", [
    (["--task", "shapes"], "--task bumps (given: shapes)"),
    (["--image-size", "8"], "--image-size 16 (given: 8)"),
    (["--locality", "global", "--lr", "0.1"], "--locality local (given: global), --lr 0.0002 (given: 0.1)"),
])
def test_resume_with_other_flags_is_refused_naming_them(tmp_path, capsys, trained_run, flags, named):
    out = tmp_path / "copy"
    out.mkdir()
    for name in os.listdir(trained_run):
        (out / name).write_bytes((trained_run / name).read_bytes())
    run_json = (out / "run.json").read_text()
    assert main(TRAIN + ["--steps", "3", "--out", str(out), "--resume", str(out)] + flags) == 2
    assert named in one_line_error(capsys, "train")
    assert (out / "run.json").read_text() == run_json
    # Flags not given are the resumed run's own: this resumes the bumps run at image size 16.
    assert main(["train", "--steps", "3", "--out", str(out), "--resume", str(out), "--no-progress"]) == 0
    recorded = json.loads((out / "run.json").read_text())["args"]
    assert recorded["task"] == "bumps" and recorded["image_size"] == 16 and recorded["steps"] == 3


def test_train_into_another_runs_folder_needs_overwrite(tmp_path, capsys, trained_run):
    out = tmp_path / "copy"
    out.mkdir()
    for name in os.listdir(trained_run):
        (out / name).write_bytes((trained_run / name).read_bytes())
    assert main(TRAIN + ["--seed", "5", "--out", str(out)]) == 2
    assert "already holds another run's checkpoints" in one_line_error(capsys, "train")
    assert main(TRAIN + ["--seed", "5", "--out", str(out), "--overwrite"]) == 0
    assert sorted(n for n in os.listdir(out) if n.endswith(".json")) == ["checkpoint-00000001.json", "run.json"]


# --- probes ----------------------------------------------------------------------------------------------------

class _NaNModel(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 3, 1, 1) * float("nan")


def test_probe_of_a_nan_model_writes_standard_json_with_nulls(tmp_path, capsys):
    # Was: leakage 0 and mass radius 2 at every quantile, and bare NaN tokens (not JSON) in probe.json.
    torch.jit.save(torch.jit.script(_NaNModel()), tmp_path / "nan.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["probe", str(tmp_path / "nan.pt"), "--channels", "1", "--size", "6", "--radius", "2",
                     "--out", str(tmp_path / "p")]) == 0

    def refuse(token):
        raise AssertionError(f"{token} is not JSON")

    summary = json.loads((tmp_path / "p.json").read_text(), parse_constant=refuse)
    assert summary["leakage"] is None and set(summary["mass_radius"].values()) == {None}


class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_probe_never_unpickles_code_unasked(tmp_path, capsys):
    # Was: the pickle's command ran (torch.load(weights_only=False), no flag, no warning).
    evil = _Evil()
    evil.marker = str(tmp_path / "PWNED")
    torch.save(evil, tmp_path / "evil.pt")
    assert main(["probe", str(tmp_path / "evil.pt")]) == 2
    assert "--trust-pickle" in one_line_error(capsys, "probe")
    assert not (tmp_path / "PWNED").exists()
    with pytest.warns(UserWarning, match="--trust-pickle: unpickling .* runs any code"):
        assert main(["probe", str(tmp_path / "evil.pt"), "--trust-pickle"]) == 2  # ran, but no model
    assert (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("what", ["run folder", "checkpoint", "torch.save'd ConditionalDenoiser"])
def test_probe_reads_what_fastcomp_train_writes(tmp_path, capsys, trained_run, what):
    # Was: "holds a state_dict" / "does not exist"; a saved ConditionalDenoiser gave TypeError (sigma, points).
    from fastcomp.probe.cli import load_checkpoint_model

    path = {"run folder": trained_run, "checkpoint": trained_run / "checkpoint-00000002.safetensors"}.get(what)
    extra = []
    if path is None:
        model, _ = load_checkpoint_model(trained_run, "cpu")
        path = tmp_path / "den.pt"
        torch.save(model, path)
        extra = ["--trust-pickle", "--size", "16", "--channels", "1"]
    argv = ["probe", str(path), "--radius", "1", "--batch", "1", "--method", "colored", "--out", str(tmp_path / "p")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # forward-mode and batched-backward fallbacks of the C++ attention
        assert main(argv + extra) == 2
        assert "pass --sigmas" in one_line_error(capsys, "probe")
        assert main(argv + extra + ["--sigmas", "0.5,5"]) == 0
    levels = json.loads((tmp_path / "p.json").read_text())["levels"]
    assert [lv["sigma"] for lv in levels] == [0.5, 5.0] and all(lv["radius_50"] in (0, 1) for lv in levels)
