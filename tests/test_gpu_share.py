"""Processes that share a GPU size their automatic batches for their share of it (setting gpu_memory_share)."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from shared.config import Settings
from shared.ml.study.run import _set_device


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("CHORUS_GPU_MEMORY_SHARE", raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("visible", "workers", "slot", "device", "share"),
    [
        ("0,1", 6, 4, "0", "0.333333"),  # 6 processes over 2 GPUs: 3 on each
        ("0,1", 3, 1, "1", "0.5"),  # 3 over 2: the busier GPU holds 2
        ("3", 4, 2, "3", "0.25"),
        ("0,1", 1, 0, "0", "1"),
    ],
)
def test_a_pool_process_gets_its_gpu_and_its_share_of_it(clean_env, visible, workers, slot, device, share):
    clean_env.setenv("CUDA_VISIBLE_DEVICES", visible)
    _set_device(slot, workers)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == device
    assert os.environ["CHORUS_GPU_MEMORY_SHARE"] == share
    assert Settings().gpu_memory_share == pytest.approx(float(share))


def test_a_share_the_operator_set_is_kept(clean_env):
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    clean_env.setenv("CHORUS_GPU_MEMORY_SHARE", "0.1")
    _set_device(0, 6)
    assert Settings().gpu_memory_share == pytest.approx(0.1)


@pytest.mark.parametrize("bad", ["0", "-0.5", "1.5", "half"])
def test_a_share_outside_zero_to_one_is_refused_by_name(clean_env, bad):
    clean_env.setenv("CHORUS_GPU_MEMORY_SHARE", bad)
    with pytest.raises(ValidationError, match="gpu_memory_share"):
        Settings()
