"""Scheduling: duration estimate, memory, intra-task packing, cluster policies, trace simulator."""
from __future__ import annotations

import pytest
from transformers import LlamaConfig

from alto.registry import KNOWN_TARGET_MODULES, AdapterConfig
from alto.sched import estimate
from alto.sched.estimate import ModelShape, adapter_step_flops

LLAMA3_8B = ModelShape(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256)


def test_model_shape_from_hf_config_and_params():
    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    shape = ModelShape.from_hf_config(cfg)
    assert shape == LLAMA3_8B
    assert shape.projection_dims()["k_proj"] == (4096, 1024)
    assert shape.projection_dims()["down_proj"] == (14336, 4096)
    assert tuple(shape.projection_dims()) == KNOWN_TARGET_MODULES
    assert abs(shape.params() - 8.03e9) < 0.01e9  # Llama-3-8B has 8.03B parameters
    with pytest.raises(ValueError, match="kv_heads"):
        ModelShape(64, 2, 128, 4, 3, 100)


def test_adapter_step_flops_positive_deterministic_monotone():
    base = AdapterConfig(rank=8, micro_batch_size=2)
    f = adapter_step_flops(base, 256, LLAMA3_8B)
    assert f > 0 and f == adapter_step_flops(base, 256, LLAMA3_8B)
    assert adapter_step_flops(AdapterConfig(rank=16, micro_batch_size=2), 256, LLAMA3_8B) > f
    assert adapter_step_flops(AdapterConfig(rank=8, micro_batch_size=3), 256, LLAMA3_8B) > f
    assert adapter_step_flops(base, 257, LLAMA3_8B) > f
    # ~4 flops per weight per token dominate: 2 sequences of 256 tokens through 7.5B matmul weights.
    assert 0.9 < f / (4 * 512 * LLAMA3_8B.matmul_params()) < 1.1
    with pytest.raises(ValueError, match="seq_len"):
        adapter_step_flops(base, 0, LLAMA3_8B)
