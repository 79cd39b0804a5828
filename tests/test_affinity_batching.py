"""Batch sizes of Stage 1: greedy length-sorted cuts with a token cap, projection groups, the device defaults."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from shared.ml.affinity.batching import Batching, cut_sorted, gpu_batching, resolve_batching
from shared.ml.affinity.params import AffinityParams
from shared.ml.affinity.store import projection_starts
from shared.ml.sharding import split_ranges

SMOLLM2 = LlamaConfig(
    hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3
)


def test_cut_sorted_caps_rows_and_padded_tokens():
    lengths = [5, 10, 10, 20, 40, 100]
    order = list(range(6))
    assert cut_sorted(order, lengths, rows=4) == [[0, 1, 2, 3], [4, 5]]
    # rows x the longest row: three rows of 10 fit a cap of 40, a fourth (20) would pad them to 80
    assert cut_sorted(order, lengths, rows=4, tokens=40) == [[0, 1, 2], [3], [4], [5]]
    assert cut_sorted(order, lengths, rows=8, tokens=200) == [[0, 1, 2, 3, 4], [5]]
    assert cut_sorted([5], lengths, rows=4, tokens=10) == [[5]]  # longer than the cap: a batch of its own
    with pytest.raises(ValueError, match="rows per batch"):
        cut_sorted(order, lengths, rows=0)


def test_projection_groups_close_at_project_rows_and_shards_start_only_there():
    plan = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10], [11, 12], [13], [14], [15], [16]]
    assert projection_starts(plan, 6) == [0, 2, 5]  # 8 rows | 3 + 2 + 1 rows | 3 rows (the last group may be short)
    assert projection_starts(plan, 1) == list(range(8))
    assert projection_starts([], 6) == []
    assert split_ranges(8, 2, starts=[0, 2, 5]) == [(0, 2), (2, 8)]
    assert split_ranges(8, 5, starts=[0, 2, 5]) == [(0, 2), (2, 5), (5, 8)]
    # equal batches: the starts are the multiples of the old alignment, and so are the cuts
    assert split_ranges(10, 3, starts=range(0, 10, 4)) == split_ranges(10, 3, align=4)


def test_gpu_defaults_scale_with_memory_and_model_size():
    big = gpu_batching(SMOLLM2, 141 * 2**30, 270_000_000)
    small = gpu_batching(SMOLLM2, 24 * 2**30, 270_000_000)
    assert big.rows == small.rows == 512 and big.eval_rows == 512
    # the measured H200 run padded at most 58k tokens per batch (32.7 GiB); the cap leaves it whole
    assert 58_368 <= big.tokens <= 141 * 2**30 // 2 // 560_000
    assert small.tokens < big.tokens / 5 and small.eval_tokens < big.eval_tokens
    llama8b = LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336)
    assert gpu_batching(llama8b, 80 * 2**30, 5 * 2**30).tokens < small.tokens
    assert gpu_batching(SMOLLM2, 2**30, 2**31).tokens >= 16  # weights larger than the device: still a floor
    toy = LlamaConfig(
        hidden_size=8, num_hidden_layers=1, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2
    )
    assert gpu_batching(toy, 141 * 2**30, 0).tokens == 2**24  # what params.batch_tokens accepts at most
    with pytest.raises(ValueError, match="batch_size and batch_tokens"):
        gpu_batching(object(), 2**30, 0)


def test_params_win_over_the_device_defaults(tiny_base):
    p = AffinityParams(model="tiny-llama", tasks=["sst2", "cb"], device="cpu")
    cpu = torch.device("cpu")
    assert resolve_batching(p, tiny_base.model, cpu) == Batching(16, None, 64, None)
    given = p.model_copy(update={"batch_size": 3, "batch_tokens": 99, "eval_batch_size": 5})
    assert resolve_batching(given, tiny_base.model, cpu) == Batching(3, 99, 5, None)
    assert Batching(3, 99, 5, None).params() == {"batch_size": 3, "batch_tokens": 99, "eval_batch_size": 5}
    with pytest.raises(ValueError):
        AffinityParams(model="tiny-llama", tasks=["sst2", "cb"], batch_tokens=8)
