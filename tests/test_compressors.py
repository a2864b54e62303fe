"""Token compressors and TOPA modality projection: shapes, token counts, the math against references."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vidlm.models.compressors import (
    AdaptiveStructurePooling,
    CompressorConfig,
    NFrame,
    NoPatchTokens,
    SlowFast,
    SpatialTemporalMean,
    build_compressor,
    num_visual_tokens,
    pool_2d,
    pooled_grid,
)
from vidlm.models.modality_projection import modality_projection
from vidlm.models.presets import PLLAVA_POOLING_SHAPE


@pytest.mark.parametrize("kind", ["nframe", "pllava", "slowfast", "mean", "none"])
@pytest.mark.parametrize("t", [1, 4, 16, 20])
def test_output_shape_matches_num_visual_tokens(kind, t):
    cfg = CompressorConfig(kind=kind, pooling_shape=(4, 3, 3), grid=(6, 6))
    x = torch.randn(2, t, 6, 6, 8)
    y = build_compressor(cfg)(x)
    assert y.shape == (2, num_visual_tokens(cfg, t), 8) and y.dtype == x.dtype


def test_token_counts():
    pllava = CompressorConfig(kind="pllava", pooling_shape=PLLAVA_POOLING_SHAPE)
    assert num_visual_tokens(pllava, 16) == 16 * 12 * 12  # PLLaVA default: 2304
    with pytest.raises(ValueError, match="needs pooling_shape"):
        CompressorConfig(kind="pllava")
    assert num_visual_tokens(CompressorConfig(kind="nframe", grid=(24, 24)), 16) == 16 * 576
    assert num_visual_tokens(CompressorConfig(kind="mean", grid=(16, 16)), 100) == 256 + 100
    with pytest.raises(ValueError):
        num_visual_tokens(pllava, 0)


def test_pllava_pooling_equals_adaptive_avg_pool3d_on_a_known_tensor():
    x = torch.arange(2 * 8 * 6 * 6 * 3, dtype=torch.float32).reshape(2, 8, 6, 6, 3)
    y = AdaptiveStructurePooling((4, 3, 3))(x)
    ref = F.adaptive_avg_pool3d(x.permute(0, 4, 1, 2, 3), (4, 3, 3)).permute(0, 2, 3, 4, 1).reshape(2, 36, 3)
    assert torch.equal(y, ref)
    # by hand: token 0 averages frames 0-1, rows 0-1, cols 0-1 of channel 0
    assert y[0, 0, 0] == x[0, :2, :2, :2, 0].mean()


@pytest.mark.parametrize("t", [1, 2, 3, 5, 7, 15])
def test_pllava_pads_short_videos_as_the_reference(t):
    # PllavaMultiModalProjector: multiplier = int(num_frames/total_frames)+1; repeat_interleave(multiplier)[:num_frames]
    x = torch.randn(1, t, 4, 4, 5)
    order = [i // (16 // t + 1) for i in range(16)]
    assert order == torch.arange(t).repeat_interleave(16 // t + 1)[:16].tolist()
    y = AdaptiveStructurePooling((16, 2, 2))(x)
    assert torch.equal(y, AdaptiveStructurePooling((16, 2, 2))(x[:, order]))
    if t == 3:  # 6, 6, 4 copies: not the even floor(i*T/T') spread (6, 5, 5)
        assert order.count(0) == 6 and order.count(2) == 4


def test_nframe_and_mean_by_hand():
    x = torch.randn(1, 3, 2, 2, 4)
    assert torch.equal(NFrame()(x), x.reshape(1, 12, 4))
    y = SpatialTemporalMean()(x)
    assert torch.allclose(y[0, 0], x[0, :, 0, 0].mean(0)) and torch.allclose(y[0, 4], x[0, 0].mean((0, 1)))


def test_none_gives_no_patch_tokens_and_only_the_appended_ones_are_counted():
    assert NoPatchTokens()(torch.randn(2, 4, 6, 6, 8)).shape == (2, 0, 8)
    none = CompressorConfig(kind="none", grid=(14, 14))
    assert num_visual_tokens(none, 16) == 0 and num_visual_tokens(none, 4, summary_tokens=11) == 11


def test_bad_input_shape_names_the_expected_layout():
    with pytest.raises(ValueError, match=r"\(B, T, h, w, D\)"):
        NFrame()(torch.zeros(2, 3, 4))


def test_modality_projection_lies_in_the_span_of_the_memory():
    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    v = torch.randn(7, 16, generator=g)
    out = modality_projection(v, memory, tau=0.1)
    assert torch.allclose(out.norm(dim=-1), torch.ones(7), atol=1e-5)
    coeffs = torch.linalg.lstsq(memory.T, out.T).solution  # (5, 7)
    assert torch.allclose(memory.T @ coeffs, out.T, atol=1e-5)  # exactly representable by the memory rows


def test_modality_projection_tends_to_the_nearest_neighbour_as_tau_falls():
    g = torch.Generator().manual_seed(1)
    memory = F.normalize(torch.randn(50, 32, generator=g), dim=-1)
    v = torch.randn(10, 32, generator=g)
    nearest = memory[(F.normalize(v, dim=-1) @ memory.T).argmax(-1)]
    errors = [(modality_projection(v, memory, tau=tau) - nearest).norm(dim=-1).max().item() for tau in (1.0, 0.1, 1e-4)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3


def test_modality_projection_chunked_equals_direct_softmax():
    g = torch.Generator().manual_seed(2)
    memory = torch.randn(1000, 24, generator=g)
    v = torch.randn(3, 4, 24, generator=g)
    mem_n = F.normalize(memory, dim=-1)
    direct = F.normalize(torch.softmax(F.normalize(v, dim=-1) @ mem_n.T / 0.05, dim=-1) @ mem_n, dim=-1)
    for chunk in (7, 128, 5000):
        assert torch.allclose(modality_projection(v, memory, tau=0.05, chunk_size=chunk), direct, atol=1e-5)


def test_modality_projection_rejects_bad_inputs():
    with pytest.raises(ValueError, match="memory"):
        modality_projection(torch.randn(2, 8), torch.randn(3, 9))
    with pytest.raises(ValueError, match="tau"):
        modality_projection(torch.randn(2, 8), torch.randn(3, 8), tau=0)


PAPERS = Path(__file__).resolve().parents[2] / "shared" / "papers"

LLAVA_VIDEO_TABLE4_ROW = "110\t110\t169\t82.0 (+1.6)"
"""LLaVA-Video Table 4, first group: T_train = T_test = 110 frames at ``M/p^2 = 169`` tokens per frame."""
LLAVA_VIDEO_TOTAL = "(18,590 versus 21,632)"
"""LLaVA-Video §4 text on Table 4: 110 x 169 = 18,590 visual tokens."""
LLAVA_VIDEO_TABLE5_SIMPLE = "Simple representation\tn (32, 729, 1, 2\t) 5,408"
"""LLaVA-Video Table 5: the simple representation ``V = (32, 729, 1, 2)`` has 5,408 visual tokens."""
LLAVA_VIDEO_POOLING = "For each group, we apply different pooling rate using Pytorch function pooling avg\\_pool2d()."
"""LLaVA-Video §3.2: the pooling is ``avg_pool2d``."""


def _quoted(name: str, *sentences: str) -> None:
    paper = PAPERS / name
    if paper.is_file():
        text = paper.read_text()
        for sentence in sentences:
            assert sentence in text, sentence


def test_slowfast_token_counts_are_the_papers_tables():
    quotes = (LLAVA_VIDEO_TABLE4_ROW, LLAVA_VIDEO_TOTAL, LLAVA_VIDEO_TABLE5_SIMPLE, LLAVA_VIDEO_POOLING)
    _quoted("llava-video.txt", *quotes)
    siglip = CompressorConfig(kind="slowfast", slow_stride=1, slow_pool=2, grid=(27, 27))  # M = 729, p = 2
    assert num_visual_tokens(siglip, 1) == 169  # Table 4: M/p^2
    assert num_visual_tokens(siglip, 32) == 5408  # Table 5: (32, 729, 1, 2)
    assert num_visual_tokens(siglip, 110) == 18590  # §4: 18,590 for 110 frames
    assert num_visual_tokens(siglip.model_copy(update={"slow_pool": 1}), 32) == 32 * 729  # Table 4: 729 per frame


def test_slowfast_row_of_table5_from_the_pooled_grids():
    # (64, 729, 3, 2): 21 slow frames of 13x13 and 43 fast frames of avg_pool2d(4): 6x6; Table 5 prints 5,396,
    # the paper's floor(M/4p^2) = 45 would give 5,484 -- the README says why vidlm gives 5,097
    cfg = CompressorConfig(kind="slowfast", slow_stride=3, slow_pool=2, grid=(27, 27))
    assert num_visual_tokens(cfg, 64) == 21 * 13 * 13 + 43 * 6 * 6 == 5097


@pytest.mark.parametrize("mode", ["average", "max", "bilinear"])
@pytest.mark.parametrize("side", [6, 9, 27])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_pool_modes_are_llava_next_get_2dpool(mode, side, k):
    x = torch.randn(3, 5, side, side)  # (N, D, h, w)
    if mode == "average":
        ref = F.avg_pool2d(x, k)
    elif mode == "max":
        ref = F.max_pool2d(x, k)
    else:
        ref = F.interpolate(x, size=[math.ceil(side / k)] * 2, mode="bilinear")
    assert torch.equal(pool_2d(x, k, mode), ref)
    assert pooled_grid(side, side, k, mode) == tuple(ref.shape[-2:])


@pytest.mark.parametrize("t", [1, 2, 3, 7])
@pytest.mark.parametrize("s", [1, 2, 3])
@pytest.mark.parametrize("mode", ["average", "bilinear"])
@pytest.mark.parametrize("newline", ["none", "grid", "frame", "one_token"])
def test_slowfast_output_length_is_its_token_count(t, s, mode, newline):
    cfg = CompressorConfig(kind="slowfast", slow_stride=s, slow_pool=2, pool_mode=mode, newline=newline, grid=(9, 9))
    y = build_compressor(cfg, dim=4)(torch.randn(2, t, 9, 9, 4))
    assert y.shape == (2, num_visual_tokens(cfg, t), 4)


def test_slowfast_grid_newline_follows_each_row():
    # LLaVA-NeXT add_token_per_grid: (T, h'*w', D) -> rows of w' tokens, each followed by image_newline
    torch.manual_seed(0)
    sf = SlowFast(slow_stride=1, slow_pool=2, pool_mode="bilinear", newline="grid", dim=3)
    x = torch.randn(1, 2, 5, 5, 3)
    y = sf(x)[0]
    pooled = F.interpolate(x[0].permute(0, 3, 1, 2), size=[3, 3], mode="bilinear").permute(0, 2, 3, 1)  # (2,3,3,D)
    rows = torch.cat([pooled, sf.image_newline.expand(2, 3, 1, 3)], dim=2)  # (2, 3, 4, D)
    assert torch.equal(y, rows.reshape(-1, 3))
    one = SlowFast(1, 2, "average", "one_token", dim=3)
    assert torch.equal(one(x)[0, -1], one.image_newline) and one(x).shape[1] == 2 * 4 + 1


def test_slowfast_keeps_time_order_and_pools_slow_and_fast_frames():
    # frame i is constant i+1: every token of frame i must equal i+1, in time order
    t, side = 5, 8
    x = (torch.arange(t, dtype=torch.float32) + 1).view(1, t, 1, 1, 1).expand(1, t, side, side, 2)
    y = SlowFast(slow_stride=2, slow_pool=2)(x)[0, :, 0]
    slow, fast = 16, 4  # 8x8 pooled 2x2 -> 4x4, 4x4 -> 2x2
    sizes = [fast, slow, fast, slow, fast]  # frames 1 and 3 are slow ((i+1) % 2 == 0)
    assert y.numel() == sum(sizes)
    assert torch.equal(y, torch.cat([torch.full((n,), i + 1.0) for i, n in enumerate(sizes)]))
    z = torch.randn(1, 1, 8, 8, 3)
    ref = F.avg_pool2d(z[0].permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2)
    assert torch.allclose(SlowFast(1, 2)(z), ref)


PLLAVA_SHAPE_SENTENCE = (
    "For the pooling layer, we uniformly select 16 frames as input and set the target pooling shape to be "
    "$16 \\times 12 \\times 12 \\times d$"
)
"""PLLaVA §4.1, Models and Implementation Details (``../shared/papers/pllava.txt``)."""


def test_pllava_pooling_shape_is_the_paper_s():
    import re
    from pathlib import Path

    from vidlm.models.presets import preset_config

    paper = Path(__file__).resolve().parents[2] / "shared" / "papers" / "pllava.txt"
    if paper.is_file():
        assert PLLAVA_SHAPE_SENTENCE in paper.read_text()
    quoted = tuple(int(n) for n in re.findall(r"(\d+) \\times", PLLAVA_SHAPE_SENTENCE))
    assert PLLAVA_POOLING_SHAPE == quoted == (16, 12, 12)
    for name in ("pllava-7b", "pllava-13b", "pllava-34b"):
        config = preset_config(name)
        assert config.compressor_config.pooling_shape == quoted
        assert config.sampling_config.max_frames_per_clip() == 16  # "we uniformly select 16 frames as input"
