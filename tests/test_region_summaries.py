"""Region summaries (``VidlmConfig.visual_region_tokens``): one token per region of the patch grid with its motion,
and the ``words`` recipe's matching of a caption's sentences to them."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from torch import nn

from vidlm.models.caption_words import WORD_TEMPERATURE, caption_sentences, region_word_loss
from vidlm.models.compressors import RegionSummaries, appearance_order
from vidlm.models.presets import build_preset
from vidlm.models.video_llm import VidlmConfig, VidlmForConditionalGeneration


def test_regions_are_adaptive_pooling_s_bins():
    regions = RegionSummaries((14, 14), regions=3, dim=2, out_dim=4, order="grid")
    assert regions.bins(14) == [(0, 5), (4, 10), (9, 14)]  # torch's adaptive pooling: floor(i h / R), ceil(...)
    assert RegionSummaries((8, 8), regions=2, dim=2, out_dim=4, order="grid").bins(8) == [(0, 4), (4, 8)]
    with pytest.raises(ValueError, match="3 regions a side do not fit a 2 x 4 patch grid"):
        RegionSummaries((2, 4), regions=3, dim=2, out_dim=4, order="grid")


def test_a_region_s_motion_is_the_velocity_of_its_channels_over_the_frames_they_are_in():
    """A channel that peaks in the top-left region at its left column in frames 0-1 and its right column in frames 2-3
    moves right (the least-squares slope of x, -1 and +1, against times 0, 1/3, 2/3, 1: 2.4) and stays in its row; one
    that is only in the last two frames of the bottom-right region, moving down a row, is timed from those frames
    (mean time 5/6, slope 2 / (1/3) = 6); reversed frames reverse both velocities; a region without them, none."""
    regions = RegionSummaries((4, 4), regions=2, dim=2, out_dim=4, order="grid")
    with torch.no_grad():
        regions.presence_bias.fill_(-10.0)  # a frame where a channel is not counts (almost) nothing
    x = torch.zeros(4, 4, 4, 2)  # (T, h, w, Dv)
    x[:2, 0, 0, 0] = x[2:, 0, 1, 0] = 50.0
    x[2, 2, 3, 1] = x[3, 3, 3, 1] = 50.0
    with torch.no_grad():
        maxima, motion, _ = regions.measure(x)
        _, back, _ = regions.measure(x.flip(0))
    assert maxima.shape == (4, 2) and motion.shape == (4, 6)
    assert torch.equal(maxima[0], torch.tensor([50.0, 0.0])) and torch.equal(maxima[3], torch.tensor([0.0, 50.0]))
    vx, vy, when = motion[:, :2], motion[:, 2:4], motion[:, 4:]
    # within 5 %: the slope's denominator holds 1e-3 more (a channel in one frame has none)
    assert vx[0, 0] == pytest.approx(2.4, rel=0.05) and vy[0, 0] == pytest.approx(0.0, abs=1e-2)
    assert vy[3, 1] == pytest.approx(6.0, rel=0.05) and vx[3, 1] == pytest.approx(0.0, abs=1e-2)
    assert when[3, 1] == pytest.approx(5 / 6, abs=1e-3) and when[0, 0] == pytest.approx(0.5, abs=1e-3)
    assert back[0, 0] == pytest.approx(-vx[0, 0]) and back[3, 3] == pytest.approx(-vy[3, 1])
    assert motion[1, :4].abs().max() < 1e-4 and motion[2, :4].abs().max() < 1e-4
    with pytest.raises(ValueError, match=r"expected patch features \(T, 4, 4, 2\)"):
        regions.measure(torch.zeros(4, 4, 3, 2))


def test_appearance_order_puts_the_regions_of_objects_first_in_the_order_they_appear():
    """A 3 x 3 split of a 6 x 6 grid over a textured background: an object in region 4 from the first of 4 frames, one
    in region 8 from the second, one in region 2 in the last frame only, and a faint one (a third as strong) in region
    6 from the first: the tokens of regions 4, 8, 2 come first, then the rest in row-major order (6 among them);
    the same regions' tokens as the row-major model's, permuted. A clip whose regions are all alike keeps row-major
    order; an unknown order is refused."""
    generator = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(4, 6, 6, 3, generator=generator)  # (T, h, w, Dv): background texture
    for region, first, channel, strength in ((4, 0, 0, 3.0), (8, 1, 1, 3.0), (2, 3, 2, 3.0), (6, 0, 1, 1.0)):
        row, column = divmod(region, 3)
        x[first:, 2 * row, 2 * column + 1, channel] += strength
    appearance = RegionSummaries((6, 6), regions=3, dim=3, out_dim=4, order="appearance")
    grid = RegionSummaries((6, 6), regions=3, dim=3, out_dim=4, order="grid")
    grid.load_state_dict(appearance.state_dict())
    projector = nn.Linear(3, 4)
    expected = [4, 8, 2, 0, 1, 3, 5, 6, 7]
    with torch.no_grad():
        assert appearance.measure(x)[2].tolist() == expected
        assert grid.measure(x)[2].tolist() == list(range(9))
        assert torch.equal(appearance(x, projector), grid(x, projector)[expected])
    assert appearance_order(torch.ones(9, 4, 3)).tolist() == list(range(9))
    with pytest.raises(ValueError, match="visual_region_order must be one of 'grid', 'appearance', got 'spiral'"):
        RegionSummaries((6, 6), regions=3, dim=3, out_dim=4, order="spiral")


def test_region_tokens_follow_the_summary_token_and_are_saved_with_the_model(tmp_path):
    """``visual_region_tokens: 2`` appends 4 tokens per clip after the summary token -- the region summaries of the
    clip's patch features through the model's projector -- counted alike by the config and the processor; the other
    tokens are as without them; the regions' weights are saved and loaded."""
    from vidlm.models.processing import VidlmProcessor

    overrides = {"center_visual_tokens": "clip", "visual_summary_token": True, "visual_region_tokens": 2}
    model, tokenizer = build_preset("tiny", overrides)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = VidlmForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.visual_regions.linear.weight, model.visual_regions.linear.weight)
    count = loaded.config.num_visual_tokens(4)
    plain = VidlmConfig.from_pretrained(tmp_path)
    plain.visual_region_tokens = 0
    assert count == plain.num_visual_tokens(4) + 4 == VidlmProcessor.from_pretrained(tmp_path).num_visual_tokens(4)
    clip = loaded.preprocess(np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        tokens = loaded.get_video_features([clip])[0]
        _, patches = loaded.vision_tower(clip)
        expected = loaded.visual_regions(patches, loaded.projector)
        loaded.visual_regions = None
        rest = loaded.get_video_features([clip])[0]
    assert tokens.shape == (count, loaded.config.text_config.hidden_size)
    assert torch.allclose(tokens[-4:], expected, atol=1e-5) and torch.allclose(tokens[:-4], rest, atol=1e-6)


def test_no_patch_tokens_leaves_the_summary_regions_and_focus_token(tmp_path):
    """``compressor.kind: none``: a clip's tokens are the summary token, the region summaries and the focus token,
    the same as the last ones of the model with patch tokens in front, counted alike by the config and the processor;
    a model that would leave a clip no token, or embed patch tokens it has not, is refused."""
    from vidlm.models.processing import VidlmProcessor

    overrides = {"visual_summary_token": True, "visual_motion": True, "visual_region_tokens": 2}
    overrides["visual_focus_token"] = True
    model, tokenizer = build_preset("tiny", {**overrides, "compressor": {"kind": "none"}})
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = VidlmForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = VidlmProcessor.from_pretrained(tmp_path)
    assert loaded.config.num_visual_tokens(4) == 1 + 4 + 1 == processor.num_visual_tokens(4)
    with_patches = build_preset("tiny", overrides)[0].eval()
    with_patches.load_state_dict(loaded.state_dict())
    clip = loaded.preprocess(np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        tokens = loaded.get_video_features([clip])[0]
        all_tokens = with_patches.get_video_features([clip])[0]
    assert tokens.shape == (6, loaded.config.text_config.hidden_size)
    assert torch.allclose(tokens, all_tokens[-6:], atol=1e-6)
    tiny = build_preset("tiny")[0].config.to_dict()
    with pytest.raises(ValueError, match="compressor.kind='none' leaves a clip no tokens"):
        VidlmConfig(**{**tiny, "compressor": {"kind": "none"}})
    with pytest.raises(ValueError, match="compressor.kind='none' has none"):
        VidlmConfig(**{**tiny, **overrides, "compressor": {"kind": "none"}, "visual_position_embedding": True})


@pytest.mark.parametrize("value", ["time", "", "Appearance", " grid", None, 1, True, ["grid"]])
def test_an_unknown_region_order_is_refused(value):
    tiny = build_preset("tiny")[0].config.to_dict()
    message = f"visual_region_order must be one of 'grid', 'appearance', got {value!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        VidlmConfig(**{**tiny, "visual_region_tokens": 2, "visual_region_order": value})


@pytest.mark.parametrize("value", [-1, 9, True, 1.5, "2", None])
def test_region_tokens_must_be_an_int_that_fits_the_grid(value):
    tiny = build_preset("tiny")[0].config.to_dict()  # 8 x 8 patch grid
    with pytest.raises(ValueError, match="visual_region_tokens must be an int from 0 to 8"):
        VidlmConfig(**{**tiny, "visual_region_tokens": value})
    with pytest.raises(ValueError, match="visual_region_tokens must be an int from 0 to 0"):
        VidlmConfig(
            vision_config=tiny["vision_config"],
            compressor={"kind": "global"},
            projector="topa_linear",
            **{"visual_region_tokens": 1},
        )


def test_a_caption_s_sentences_tokenise_as_inside_it(tiny_models):
    from transformers import AutoTokenizer

    caption = "A red circle moves left. Then a blue square appears and moves up.  "
    assert caption_sentences(caption) == ["A red circle moves left.", " Then a blue square appears and moves up."]
    assert caption_sentences("No full stop") == ["No full stop."] and caption_sentences(" . ") == []
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["pllava"])
    ids = [i for s in caption_sentences(caption) for i in tokenizer(s, add_special_tokens=False)["input_ids"]]
    assert ids == tokenizer(caption.strip(), add_special_tokens=False)["input_ids"]


def _brute_force(regions, sentences, empty, embeddings):
    """``region_word_loss`` by trying every assignment of sentences to distinct regions (the least total cost)."""
    classes = torch.unique(torch.cat([empty, *(w for s in sentences for w in s)]))
    table = nn.functional.normalize(embeddings(classes).float(), dim=-1)
    position = {int(c): i for i, c in enumerate(classes)}
    losses = []
    for b, clip in enumerate(sentences):
        log_probs = torch.log_softmax(nn.functional.normalize(regions[b], dim=-1) @ table.T / WORD_TEMPERATURE, -1)

        def cost(k, words, log_probs=log_probs):
            return -log_probs[k, [position[int(w)] for w in words]].mean()

        k_all, n = regions.shape[1], len(clip)
        if n <= k_all:  # sentence j -> region chosen[j]
            assignments = [list(zip(c, range(n), strict=True)) for c in itertools.permutations(range(k_all), n)]
        else:  # region k -> sentence chosen[k]
            assignments = [list(zip(range(k_all), c, strict=True)) for c in itertools.permutations(range(n), k_all)]
        pairs = min(assignments, key=lambda a: float(sum(cost(k, clip[j]) - cost(k, empty) for k, j in a)))
        loss = torch.stack([cost(k, clip[j]) for k, j in pairs]).mean()
        others = [k for k in range(k_all) if k not in {k for k, _ in pairs}]
        losses.append(loss + 0.5 * torch.stack([cost(k, empty) for k in others]).mean() if others else loss)
    return torch.stack(losses).mean()


def test_sentences_are_matched_to_the_regions_that_hold_their_words():
    """Regions planted with two sentences' words (and the empty word elsewhere) give a small loss wherever the
    sentences are and in whatever order they come; the Hungarian matching's loss is the brute-force best
    assignment's, on planted and on random regions; the planted loss is far below that of regions that hold every
    word at once; of more sentences than regions, the best matched count; a clip without a sentence, or an empty
    sentence, is refused."""
    torch.manual_seed(0)
    embeddings = nn.Embedding(32, 64)
    first, second, empty = torch.tensor([3, 4, 7]), torch.tensor([5, 6, 7]), torch.tensor([9])
    vectors = embeddings.weight.detach()
    planted = torch.stack([vectors[empty].sum(0)] * 4)
    planted[2], planted[0] = vectors[first].sum(0), vectors[second].sum(0)
    loss = region_word_loss(planted[None], [[first, second]], empty, embeddings)
    swapped = region_word_loss(planted[None], [[second, first]], empty, embeddings)
    moved = region_word_loss(planted[[1, 3, 0, 2]][None], [[first, second]], empty, embeddings)
    assert float(loss) < 1.5 and torch.isclose(loss, swapped) and torch.isclose(loss, moved)
    mixed = torch.stack([vectors[torch.cat([first, second, empty])].sum(0)] * 4)[None]
    assert float(region_word_loss(mixed, [[first, second]], empty, embeddings)) > float(loss) + 1.0
    random = torch.randn(3, 4, 64)
    sentences = [[first, second], [second], [first, second, torch.tensor([1, 2])]]
    assert torch.isclose(
        region_word_loss(random, sentences, empty, embeddings), _brute_force(random, sentences, empty, embeddings)
    )
    many = [[first, second, torch.tensor([1, 2]), torch.tensor([8]), torch.tensor([10, 11])]]  # 5 for 4 regions
    assert torch.isclose(
        region_word_loss(random[:1], many, empty, embeddings), _brute_force(random[:1], many, empty, embeddings)
    )
    with pytest.raises(ValueError, match="each clip needs a sentence"):
        region_word_loss(random[:1], [[]], empty, embeddings)
    with pytest.raises(ValueError, match="each sentence a word"):
        region_word_loss(random[:1], [[first, torch.tensor([], dtype=torch.int64)]], empty, embeddings)
