"""The focus token (``VidlmConfig.visual_focus_token``): the region summaries weighed by the question's words, each word
by its inverse document frequency over the training captions' sentences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vidlm.models.caption_words import word_weights
from vidlm.models.compressors import QuestionFocus
from vidlm.models.presets import build_preset
from vidlm.models.video_llm import VidlmConfig, VidlmForConditionalGeneration
from vidlm.models.visual_tokens import question_ids

FOCUS = {"center_visual_tokens": "clip", "visual_summary_token": True, "visual_region_tokens": 2}


def test_the_focus_token_is_the_region_the_weighed_words_name():
    """Four regions, each near one word's embedding; the question's words: a weighed one (``cross``) and unweighed
    ones, one of them near every region alike. The softmax at 0.02 picks the cross's region; without weights (or with
    ids past the vocabulary) the focus token is the regions' mean; a word as near every region changes nothing."""
    g = torch.Generator().manual_seed(0)
    words = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)  # ids 0..5
    shared = words[5]
    regions = 3 * (words[:4] + 0.3 * shared)  # region r holds word r, and every region word 5
    focus = QuestionFocus(vocab_size=6, temperature=0.02)
    question = torch.tensor([4, 2, 5])  # "what", "cross", a word of every region
    assert torch.allclose(focus(regions, question, words[question]), regions.mean(0), atol=1e-6)  # no weights yet
    focus.word_weights.copy_(torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0, 2.0]))
    picked = focus(regions, question, words[question])
    assert torch.allclose(picked, regions[2], atol=1e-3)
    alone = focus(regions, question[1:2], words[question[1:2]])
    assert torch.allclose(picked, alone, atol=1e-5)  # word 5 is as near every region: it weighs nothing
    past = torch.tensor([7, 9])
    assert torch.allclose(focus(regions, past, torch.randn(2, 16, generator=g)), regions.mean(0), atol=1e-6)


def test_the_question_is_the_tokens_after_the_placeholders_up_to_the_first_label():
    v = 99
    ids = torch.tensor([1, 2, v, v, v, 10, 11, 12, 20, 21, 0, 0])
    assert question_ids(ids, v).tolist() == [10, 11, 12, 20, 21, 0, 0]
    labels = torch.tensor([-100] * 8 + [20, 21, -100, -100])
    assert question_ids(ids, v, labels).tolist() == [10, 11, 12]
    mask = torch.tensor([1] * 10 + [0, 0])
    assert question_ids(ids, v, None, mask).tolist() == [10, 11, 12, 20, 21]
    assert question_ids(torch.tensor([1, 2, 3]), v).tolist() == []
    assert question_ids(torch.tensor([1, v]), v).tolist() == []


def test_word_weights_are_inverse_document_frequencies_over_sentences():
    weights = word_weights([[1, 2, 2], [2, 3], [2]], vocab_size=5)  # a token twice in a sentence counts once
    assert weights.dtype == torch.float32
    assert weights.tolist() == pytest.approx([0.0, math.log(3), 0.0, math.log(3), 0.0])
    assert word_weights([], vocab_size=3).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="outside the vocabulary of 5"):
        word_weights([[1, 5]], vocab_size=5)


def test_the_focus_token_is_counted_saved_and_follows_the_question_not_the_answer(tmp_path):
    """The focus token comes last, one more token counted alike by the config and the processor; its word weights
    are saved with the model; another question changes it and nothing else; in training (labels given), the answer
    after the question does not reach it."""
    from vidlm.models.processing import VidlmProcessor, expand_video_tokens

    model, tokenizer = build_preset("tiny", FOCUS | {"visual_focus_token": True})
    for word in (" cross", " square", " red", " blue"):  # the caption words; the rest weigh 0
        model.visual_focus.word_weights[tokenizer(word, add_special_tokens=False)["input_ids"]] = 1.0
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = VidlmForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.visual_focus.word_weights, model.visual_focus.word_weights)
    plain = build_preset("tiny", FOCUS)[0].config
    count = loaded.config.num_visual_tokens(4)
    assert count == plain.num_visual_tokens(4) + 1 == VidlmProcessor.from_pretrained(tmp_path).num_visual_tokens(4)

    c = loaded.config
    clip = loaded.preprocess(np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))[None]

    def visual(text: str, labelled: int = 0) -> torch.Tensor:
        ids = tokenizer(f"{c.video_token}\n{text}", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([expand_video_tokens(ids, c.video_token_index, count)])
        labels = torch.full_like(ids, -100)
        labels[0, ids.shape[1] - labelled :] = ids[0, ids.shape[1] - labelled :]
        with torch.no_grad():
            embeds = loaded.embed(ids, pixel_values_videos=clip, labels=labels if labelled else None)
        return embeds[0, ids[0] == c.video_token_index]  # (count, Dl)

    cross, square = visual("What colour is the cross?"), visual("What colour is the square?")
    assert torch.equal(cross[:-1], square[:-1]) and not torch.allclose(cross[-1], square[-1], atol=1e-4)
    answered = [visual(f"What colour is the cross? {a}", labelled=1) for a in (" red", " blue")]
    assert torch.equal(answered[0], answered[1])
    assert not torch.allclose(visual("What colour is the cross? red")[-1], answered[0][-1], atol=1e-4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"visual_region_tokens": 0}, "visual_focus_token weighs the region summaries"),
        ({"visual_focus_token": 1}, "visual_focus_token must be true or false"),
        ({"visual_focus_temperature": 0.0}, "visual_focus_temperature must be a positive number"),
        ({"visual_focus_temperature": "hot"}, "visual_focus_temperature must be a positive number"),
    ],
)
def test_a_focus_token_needs_regions_and_a_positive_temperature(override, message):
    tiny = build_preset("tiny", FOCUS)[0].config.to_dict()
    with pytest.raises(ValueError, match=message):
        VidlmConfig(**{**tiny, "visual_focus_token": True, **override})
