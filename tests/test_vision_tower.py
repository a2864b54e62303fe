"""The vision tower: the feature job's encoder is the model's own tower; TOPA's text tower is the same CLIP's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidlm.models.presets import build_preset, resolve_model
from vidlm.models.video_llm import VidlmForConditionalGeneration
from vidlm.models.vision_tower import FrameEncoder, TextTower, TowerConfig, tower_model_config


@pytest.fixture(scope="module")
def encoder():
    return FrameEncoder(TowerConfig(model="tiny-video"))


def test_frame_encoder_is_the_model_s_tower_on_the_model_s_preprocessing(encoder):
    frames = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    emb, patches = encoder(frames)
    assert emb.shape == (3, 64) and patches.shape == (3, 49, 64) and emb.dtype == torch.float32
    model = VidlmForConditionalGeneration.from_pretrained(resolve_model("tiny-video")).eval()
    with torch.no_grad():
        pooled, grid = model.vision_tower(model.preprocess(frames))
    torch.testing.assert_close(emb, pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(patches, grid.flatten(1, 2), atol=1e-5, rtol=0)
    emb_only, none = encoder(frames, with_patches=False)
    assert none is None and torch.equal(emb_only, emb)


def test_paper_presets_give_their_towers_without_weights():
    siglip = tower_model_config(TowerConfig(model="llava-video-7b"))
    assert siglip.vision_config.model_type == "siglip_vision_model" and siglip.image_size == 384
    assert siglip.compressor_config.grid == (27, 27) and siglip.vision_config.hidden_size == 1152
    clip = tower_model_config(TowerConfig(model="pllava-7b"))
    assert clip.image_size == 336 and clip.compressor_config.grid == (24, 24)


def test_seeded_random_weights_of_a_paper_preset_and_weights_from_a_directory(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from vidlm.models._builders import vision_config
    from vidlm.models.presets import PRESETS

    config = TowerConfig(model="topa-llama2-7b", seed=3)
    mc = tower_model_config(config)
    small = vision_config("clip_vision_model", 224, 32, 64, 2, 2, 128)
    PRESETS["tiny-weights-test"] = lambda: mc.__class__(**{**mc.to_dict(), "vision_config": small.to_dict()})
    try:
        a = FrameEncoder(TowerConfig(model="tiny-weights-test", seed=3))
        b = FrameEncoder(TowerConfig(model="tiny-weights-test", seed=3))
        c = FrameEncoder(TowerConfig(model="tiny-weights-test", seed=4))
        frames = np.full((1, 224, 224, 3), 128, np.uint8)
        assert torch.equal(a(frames)[0], b(frames)[0]) and not torch.equal(a(frames)[0], c(frames)[0])
        hub = CLIPVisionModelWithProjection(small.__class__(**{**small.to_dict(), "projection_dim": 768}))
        hub.save_pretrained(tmp_path / "clip")
        loaded = FrameEncoder(TowerConfig(model="tiny-weights-test", weights=str(tmp_path / "clip")))
        with torch.no_grad():
            pixels = torch.zeros(1, 3, 224, 224)
            expected = hub(pixel_values=pixels).image_embeds
            got, _ = loaded.tower(pixels)
        torch.testing.assert_close(got, expected)
        with pytest.raises(FileNotFoundError):
            FrameEncoder(TowerConfig(model="tiny-weights-test", weights=str(tmp_path / "nothing")))
    finally:
        del PRESETS["tiny-weights-test"]


def test_wrong_frames_and_unknown_models_are_errors(encoder):
    with pytest.raises(ValueError, match="expected frames"):
        encoder(np.zeros((1, 112, 112, 3), np.uint8))
    with pytest.raises(ValueError, match="expected frames"):
        encoder(np.zeros((1, 224, 224, 3), np.float32))
    with pytest.raises(ValueError, match="unknown preset"):
        tower_model_config(TowerConfig(model="ViT-Nope"))


def test_topa_text_tower_is_the_same_clip_s():
    """tiny-topa keeps its CLIP's text tower in clip_text/: unit-norm features in the width of the pooled image
    embeddings, different texts giving different features (the pooled token is the end of each text)."""
    tower = TextTower("tiny-topa")
    model, _ = build_preset("tiny-topa")
    assert tower.embed_dim == model.vision_tower.embed_dim == 64
    features = tower(["red red red ball", "blue blue blue car", "red red red ball"])
    assert features.shape == (3, 64) and torch.allclose(features.norm(dim=-1), torch.ones(3))
    assert torch.allclose(features[0], features[2]) and not torch.allclose(features[0], features[1], atol=1e-3)
    first_word = tower(["red ball moves", "red car stops"])
    assert not torch.allclose(first_word[0], first_word[1], atol=1e-3)
    with pytest.raises(FileNotFoundError, match="CLIP text tower"):
        TextTower("tiny-video")


def test_feature_configs_give_what_the_presets_expect():
    """features_llava_video.yaml: the llava-video presets' SigLIP (27 x 27 patches of 1152) and frame sampling;
    features_topa.yaml: topa-llama2-7b's 768-d CLIP embeddings of 10 frames."""
    from pathlib import Path

    from pipelines.features import FeaturesConfig
    from vidlm.config import load_config
    from vidlm.models.presets import preset_config

    configs = Path(__file__).resolve().parents[1] / "pipelines" / "configs"
    video = load_config(FeaturesConfig, configs / "features_llava_video.yaml", [])
    mc = tower_model_config(video.encode.tower)
    assert mc.vision_config.model_type == "siglip_vision_model" and mc.compressor_config.grid == (27, 27)
    assert mc.vision_config.hidden_size == 1152 and video.encode.patch_features
    assert video.sampling == preset_config("llava-video-7b").sampling_config
    topa = load_config(FeaturesConfig, configs / "features_topa.yaml", [])
    mc = tower_model_config(topa.encode.tower)
    assert mc.projection_dim == 768 and not topa.encode.patch_features
    assert topa.sampling == preset_config("topa-llama2-7b").sampling_config
