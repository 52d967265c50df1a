"""Opt-in stress of the two-process DDP tests, as the full suite runs them: after OpenMP-heavy tests, in
the same pytest process. Skipped unless FASTCOMP_DDP_STRESS=N (N repetitions); a hang or a retry fails.

    FASTCOMP_DDP_STRESS=20 python -m pytest tests/test_ddn_cpu_kernels.py \\
        tests/test_attention_backends.py tests/test_ddp_stress.py

See tests/helpers.py for the stall these tests once had (a teardown deadlock) and its fix.
"""

from __future__ import annotations

import os
import warnings

import pytest

import test_split_and_prune
import test_train
from helpers import DDPRetryWarning

N = int(os.environ.get("FASTCOMP_DDP_STRESS", "0"))


@pytest.mark.skipif(N == 0, reason="opt-in: FASTCOMP_DDP_STRESS=N runs the DDP tests N times")
@pytest.mark.parametrize("i", range(N))
def test_ddp_tests_pass_without_a_retry(i, tmp_path, one_thread):
    (tmp_path / "train").mkdir()
    (tmp_path / "split").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DDPRetryWarning)  # a stall is a failure here, not a second chance
        test_train.test_ddp_two_gloo_processes_match_one_process(tmp_path / "train")
        test_split_and_prune.test_ddp_two_gloo_processes_take_the_same_decision(tmp_path / "split")
