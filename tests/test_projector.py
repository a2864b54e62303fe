"""Projectors: LLaVA mlp2x_gelu and TOPA linear + temporal embedding, by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidlm.models.projector import MLPProjector, ProjectorConfig, TopaProjector, build_projector


def test_mlp2x_gelu_is_linear_gelu_linear_per_token():
    torch.manual_seed(0)
    p = build_projector(ProjectorConfig(vision_dim=8, llm_dim=16))
    assert isinstance(p, MLPProjector)
    x = torch.randn(2, 3, 4, 4, 8)
    expected = F.linear(F.gelu(F.linear(x, p.linear_1.weight, p.linear_1.bias)), p.linear_2.weight, p.linear_2.bias)
    assert torch.allclose(p(x), expected) and p(x).shape == (2, 3, 4, 4, 16)


def test_topa_adds_the_temporal_embedding_of_each_position():
    torch.manual_seed(0)
    p = build_projector(ProjectorConfig(kind="topa_linear", vision_dim=8, llm_dim=6, max_frames=10))
    assert isinstance(p, TopaProjector)
    x = torch.randn(2, 10, 8)
    y = p(x)
    assert torch.allclose(y[:, 3], p.proj(x[:, 3]) + p.temporal_embedding.weight[3])
    same = x[:, :1].expand(2, 10, 8)  # the same feature at every position differs only by position
    out = p(same)
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_topa_rejects_too_many_frames():
    p = TopaProjector(8, 6, max_frames=4)
    with pytest.raises(ValueError, match="T <= 4"):
        p(torch.randn(1, 5, 8))
