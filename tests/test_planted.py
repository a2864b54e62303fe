"""``vidlm planted``: the decoded pixels show what the ground truth says, the manifests and questions are what the jobs
and ``vidlm eval mc`` read, and a seed gives one corpus."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import av
import numpy as np
import pytest

from pipelines.planted import COLOURS, DIRECTIONS, PlantedConfig, write_planted
from training.eval import load_benchmark
from vidlm.clips import clips_table

LETTERS = "ABCDE"


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _near(pixel: np.ndarray, colour) -> bool:
    return bool(np.abs(pixel.astype(int) - np.asarray(colour)).max() <= 40)


def test_planted_pixels_manifests_and_questions_tell_the_truth(tmp_path):
    from transformers import AutoTokenizer

    from training.data import clip_samples
    from vidlm.models.presets import resolve_model

    model = str(resolve_model("tiny-video"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    config = PlantedConfig()
    files = write_planted(tmp_path, 12, seed=5, config=config)
    scenes = [json.loads(line) for line in files["scenes"].read_text().splitlines()]
    assert len(scenes) == 12 and {len(s["objects"]) for s in scenes} == {1, 2, 3}

    for scene in scenes:
        frames = _frames(tmp_path / scene["video"])
        assert frames.shape == (round(config.seconds * config.fps), config.size, config.size, 3)
        objects = scene["objects"]
        assert [o["appears"] for o in objects] == sorted(o["appears"] for o in objects)  # listed in order
        assert len({o["shape"] for o in objects}) == len({o["colour"] for o in objects}) == len(objects)
        for o in objects:
            dx, dy = DIRECTIONS[o["direction"]]
            for t in (o["appears"], len(frames) - 1):  # where the truth puts its centre, the object's colour
                x = o["start"][0] + dx * o["speed"] * (t - o["appears"])
                y = o["start"][1] + dy * o["speed"] * (t - o["appears"])
                assert _near(frames[t, round(y), round(x)], COLOURS[o["colour"]]), (scene["video_id"], o, t)
            if o["appears"] > 0:  # not there before it appears
                x, y = o["start"]
                assert not _near(frames[o["appears"] - 1, round(y), round(x)], COLOURS[o["colour"]])

    train = clips_table(files["train"]).to_pylist()
    test = clips_table(files["test"]).to_pylist()
    assert not any(r["error_type"] for r in train + test)
    assert len(test) == round(12 * config.test_fraction) and len(train) + len(test) == 12
    assert not {r["video_id"] for r in train} & {r["video_id"] for r in test}  # split by video
    truth = {s["video_id"]: s["caption"] for s in scenes}
    for r in train + test:
        assert r["caption"] == truth[r["video_id"]] and r["end_s"] == config.seconds
    assert truth["planted_00000"].startswith(
        f"A {scenes[0]['objects'][0]['colour']} {scenes[0]['objects'][0]['shape']}"
    )

    asked = Counter()
    by_id = {s["video_id"]: s for s in scenes}
    for split in ("train_mc", "test_mc"):
        for q in load_benchmark(files[split]):
            scene = by_id[q["id"].rsplit("_q", 1)[0]]
            objects = scene["objects"]
            answer = q["options"][LETTERS.index(q["answer"])]
            assert len(q["options"]) == len(set(q["options"])) == 5
            asked[q["task_type"]] += 1
            if q["task_type"] == "count":
                assert answer == str(len(objects))
            elif q["task_type"] == "order":
                assert len(objects) > 1 and answer == f"the {objects[0]['colour']} {objects[0]['shape']}"
            elif q["task_type"] == "colour":
                shape = q["question"].removeprefix("What colour is the ").rstrip("?")
                assert answer == next(o["colour"] for o in objects if o["shape"] == shape)
            elif q["task_type"] == "shape":
                colour = q["question"].removeprefix("What shape is the ").removesuffix(" object?")
                assert answer == next(o["shape"] for o in objects if o["colour"] == colour)
            else:
                name = q["question"].removeprefix("Which way does ").removesuffix(" move?")
                assert answer == next(o["direction"] for o in objects if f"the {o['colour']} {o['shape']}" == name)
    assert set(asked) == {"colour", "shape", "count", "direction", "order"}

    # the training rows: one sample asking for the caption, one per question of the video asked on its own right
    # after the video and answered with the true option's words, as eval mc's option score asks and scores it
    answers = defaultdict(list)
    for q in load_benchmark(files["train_mc"]):
        answers[q["id"].rsplit("_q", 1)[0]].append(q["options"][LETTERS.index(q["answer"])])
    for row in train[:4]:
        samples = clip_samples(
            {**row, "patch_features": np.zeros((4, 49, 64), np.float32)},
            model,
            "patch_features",
            "unused",
            max_length=4096,
        )
        texts = [tokenizer.decode([t for t in s["labels"] if t >= 0]) for s in samples]
        assert len(samples) == 1 + len(answers[row["video_id"]]) and texts[0].startswith(truth[row["video_id"]])
        assert [t.split("<|im_end|>")[0] for t in texts[1:]] == answers[row["video_id"]]
    assert asked["colour"] == 12 and asked["order"] == sum(len(s["objects"]) > 1 for s in scenes)

    again = write_planted(tmp_path / "again", 12, seed=5, config=config)
    assert again["scenes"].read_text().replace(str(tmp_path / "again"), "") == files["scenes"].read_text().replace(
        str(tmp_path), ""
    )
    other = write_planted(tmp_path / "other", 12, seed=6, config=config)
    assert other["scenes"].read_text() != again["scenes"].read_text()


def test_planted_command_writes_the_corpus_and_refuses_an_empty_one(tmp_path):
    from typer.testing import CliRunner

    from vidlm.cli import app

    runner = CliRunner()
    args = ["planted", "--out", str(tmp_path), "--num", "3", "size=64", "object_size=[0.12,0.12]"]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert _frames(next((tmp_path / "videos").glob("*.mp4"))).shape[1:] == (64, 64, 3)
    scenes = [json.loads(line) for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    assert {o["radius"] for s in scenes for o in s["objects"]} == {0.12 * 64}
    result = runner.invoke(app, ["planted", "--out", str(tmp_path), "--num", "0"], terminal_width=200)
    assert result.exit_code == 2 and "--num must be at least 1" in result.output
    result = runner.invoke(app, ["planted", "--out", str(tmp_path), "--seed", "-1"], terminal_width=200)
    assert result.exit_code == 2 and "--seed must be 0 or more" in result.output
    result = runner.invoke(app, ["planted", "--out", str(tmp_path), "size=65"], terminal_width=200)
    assert result.exit_code == 2 and "size" in result.output
    result = runner.invoke(app, ["planted", "--out", str(tmp_path), "object_size=[0.1,0.3]"], terminal_width=200)
    assert result.exit_code == 2 and "object_size must be (low, high)" in result.output
    bad = [("max_objects", 0), ("max_objects", 4), ("test_fraction", 1.5), ("test_fraction", -0.1)]
    for field, value in [*bad, ("test_fraction", float("nan"))]:
        with pytest.raises(ValueError, match=field):
            PlantedConfig(**{field: value})
    with pytest.raises(ValueError, match="object_size"):
        PlantedConfig(object_size=(0.09, 0.06))


def test_caption_accuracy_counts_the_captions_that_name_every_object_s_truth():
    from pipelines.planted import caption_accuracy

    scenes = {
        "a": {"objects": [{"colour": "red", "shape": "circle", "direction": "left"}]},
        "b": {
            "objects": [
                {"colour": "blue", "shape": "square", "direction": "up"},
                {"colour": "green", "shape": "cross", "direction": "down"},
            ]
        },
    }
    captions = [
        {"video_id": "a", "caption": "A red circle moves left."},
        {"video_id": "b", "caption": "A blue square moves up. Then a green triangle appears and moves down."},
        {"video_id": "b", "caption": "A BLUE cross moves down, then a green square moves up."},
        {"video_id": "a", "caption": None},  # an error row names nothing
    ]
    assert caption_accuracy(captions, scenes) == {"colour": 0.75, "shape": 0.5, "direction": 0.75, "all": 0.5}
    assert caption_accuracy([{"video_id": "a", "caption": "A redcircle moves leftwards."}], scenes)["all"] == 0.0
