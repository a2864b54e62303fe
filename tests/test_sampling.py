"""Frame sampling arithmetic for each mode (PLLaVA uniform / random, LLaVA-Video fps, TOPA fixed)."""

from __future__ import annotations

import numpy as np
import pytest

from vidlm.sampling import EmptyWindowError, SamplingConfig, sample_frame_indices, window_frame_range


def test_window_frame_range_is_half_open_and_clamped():
    assert window_frame_range(100, 10.0, 1.0, 2.0) == (10, 19)  # frames at 1.0 .. 1.9 s
    assert window_frame_range(100, 10.0, None, None) == (0, 99)
    assert window_frame_range(100, 10.0, 9.5, 30.0) == (95, 99)  # past the end: clamped
    assert window_frame_range(100, 25.0, 0.01, 0.05) == (1, 1)  # 0.04 s is the only frame inside


@pytest.mark.parametrize("start, end", [(10.0, 12.0), (3.0, 3.0), (5.0, 4.0)])
def test_window_without_frames_raises(start, end):
    with pytest.raises(EmptyWindowError, match="holds no frame"):
        window_frame_range(100, 10.0, start, end)


def test_uniform_takes_segment_centres():
    idx = sample_frame_indices(SamplingConfig(mode="uniform", num_frames=4), 100, 10.0, 2.0, 6.0)
    # window = frames 20..59 (40 frames), segments of 10, centres at offset 5, 15, 25, 35
    assert idx.tolist() == [25, 35, 45, 55]
    assert idx.dtype == np.int64


def test_uniform_repeats_frames_when_the_window_is_shorter_than_T():
    idx = sample_frame_indices(SamplingConfig(mode="uniform", num_frames=8), 100, 10.0, 0.0, 0.4)
    assert len(idx) == 8 and set(idx.tolist()) <= {0, 1, 2, 3}
    assert np.all(np.diff(idx) >= 0)


def test_random_draws_one_point_per_segment_reproducibly():
    cfg = SamplingConfig(mode="random", num_frames=5, seed=3)
    a = sample_frame_indices(cfg, 1000, 10.0, 0.0, 50.0, np.random.default_rng(7))
    b = sample_frame_indices(cfg, 1000, 10.0, 0.0, 50.0, np.random.default_rng(7))
    c = sample_frame_indices(cfg, 1000, 10.0, 0.0, 50.0, np.random.default_rng(8))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    for i, x in enumerate(a):  # 500 frames, segments of 100
        assert 100 * i <= x < 100 * (i + 1)


def test_fixed_includes_both_ends_like_topa():
    idx = sample_frame_indices(SamplingConfig(mode="fixed", num_frames=10), 91, 1.0)
    assert idx[0] == 0 and idx[-1] == 90 and len(idx) == 10
    assert np.all(np.diff(idx) == 10)


def test_fps_steps_by_round_of_avg_fps_over_fps():
    idx = sample_frame_indices(SamplingConfig(mode="fps", fps=1.0, max_frames=64), 300, 30.0, 0.0, 10.0)
    assert idx.tolist() == list(range(0, 300, 30))
    idx = sample_frame_indices(SamplingConfig(mode="fps", fps=2.0, max_frames=64), 300, 25.0, 1.0, 3.0)
    assert idx.tolist() == [25, 37, 49, 61, 73]  # step round(25/2)=12 from frame 25 to 74


def test_fps_switches_to_uniform_past_the_cap_or_when_forced():
    cfg = SamplingConfig(mode="fps", fps=1.0, max_frames=8)
    idx = sample_frame_indices(cfg, 3000, 30.0)  # 100 s -> 100 frames at 1 fps > 8
    assert idx.tolist() == np.linspace(0, 2999, 8).astype(int).tolist()
    forced = SamplingConfig(mode="fps", fps=1.0, max_frames=8, force_sample=True)
    assert len(sample_frame_indices(forced, 90, 30.0)) == 8  # 3 s would give 3 frames


def test_max_frames_per_clip():
    assert SamplingConfig(mode="fps", max_frames=32).max_frames_per_clip() == 32
    assert SamplingConfig(mode="uniform", num_frames=16).max_frames_per_clip() == 16
