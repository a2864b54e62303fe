"""``vidlm planted``: real videos of simple scenes whose content is known, with captions and questions about them.

``vidlm planted --out DIR --num 200 --seed 0``

Each video (H.264 mp4 through PyAV) shows one to three objects on a background. An object has a shape and a colour
(no two objects of a video share either), appears at its own time -- one after another, so there is an order --
and moves in one direction at its own speed until the video ends. Sizes, speeds, positions, appearance times and
the background's tone and texture are drawn from the seed, video by video, so a seed gives the same corpus on any
machine. It writes:

- ``videos/planted_NNNNN.mp4``;
- ``train.csv`` / ``test.csv``: Panda-70M manifests (one clip window per video: the whole video), split by video,
  whose ``caption`` is the ground truth, e.g. ``A red circle moves left. Then a blue square appears and moves up.``,
  and whose ``conversations`` (LLaVA's layout, which ``vidlm train``'s ``video`` recipe reads: one training sample
  per conversation) ask for the caption, and each of the video's questions on its own, open-ended (answered with
  the true option's words);
- ``train_mc.jsonl`` / ``test_mc.jsonl``: multiple-choice questions in the EgoSchema / MVBench layout that
  ``vidlm eval mc`` reads (``video``, ``question``, five ``options``, ``answer``, ``task_type``): ``colour``,
  ``shape``, ``count``, ``direction`` and, with two objects or more, ``order`` (the last two need the frames in
  their order);
- ``scenes.jsonl``: every video's scene (objects, their attributes, appearance frames and paths).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from vidlm.config import JobConfig
from vidlm.jobs import Report
from vidlm.writers import write_frames

__all__ = [
    "ATTRIBUTES",
    "COLOURS",
    "DIRECTIONS",
    "SHAPES",
    "TASK_TYPES",
    "PlantedConfig",
    "Scene",
    "caption_accuracy",
    "conversations",
    "planted_job",
    "write_planted",
]

ATTRIBUTES = ("colour", "shape", "direction")
"""What a caption names of each object (the ``caption_accuracy`` columns, with ``all``)."""

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (200, 60, 200),
}
"""Object colours (RGB), far apart from each other and from the grey backgrounds."""
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
"""Direction -> unit step ``(dx, dy)`` in image coordinates (``y`` grows downwards)."""
STILL = "it does not move"
"""The fifth option of a direction question (no planted object stays still)."""
TASK_TYPES = ("colour", "shape", "count", "direction", "order")


class PlantedConfig(JobConfig):
    """``vidlm planted``: how the videos look."""

    size: int = Field(192, ge=64, le=1024, multiple_of=2)
    """Width and height in pixels (even, as H.264's 4:2:0 needs)."""
    fps: int = Field(8, gt=0, le=60)
    seconds: float = Field(4.0, gt=0, le=60)
    max_objects: int = Field(3, ge=1, le=3)
    object_size: tuple[float, float] = (0.06, 0.09)
    """Range ``(low, high)`` of an object's half size, a fraction of the width (drawn per object); at most 0.14, so
    three objects fit the 3 x 3 grid of the scene apart from each other."""
    test_fraction: float = Field(0.2, ge=0, lt=1)
    """Share of the videos held out for testing (at least one when there are two videos or more)."""

    @field_validator("object_size")
    @classmethod
    def _fits(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.02 <= value[0] <= value[1] <= 0.14:
            raise ValueError(f"object_size must be (low, high) with 0.02 <= low <= high <= 0.14, got {value}")
        return value


@dataclass(frozen=True)
class PlantedObject:
    """One object of a scene; positions are pixels of the object's centre, ``radius`` its half size."""

    shape: str
    colour: str
    direction: str
    appears: int
    """The first frame it is in."""
    start: tuple[float, float]
    speed: float
    """Pixels per frame."""
    radius: float

    def centre(self, frame: int) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        t = frame - self.appears
        return self.start[0] + dx * self.speed * t, self.start[1] + dy * self.speed * t

    @property
    def name(self) -> str:
        return f"the {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A planted video: its background and objects, in order of appearance."""

    video_id: str
    frames: int
    background: tuple[int, int, int]
    texture: float
    """Amplitude of the background's seeded texture (grey levels)."""
    objects: tuple[PlantedObject, ...]

    def caption(self) -> str:
        """The ground-truth caption: every object's colour, shape and direction, in order of appearance."""
        first, *rest = self.objects
        parts = [f"A {first.colour} {first.shape} moves {first.direction}."]
        parts += [f"Then a {o.colour} {o.shape} appears and moves {o.direction}." for o in rest]
        return " ".join(parts)


def _apart(objects: list[PlantedObject], frames: int) -> bool:
    """No two objects ever touch (their bounding circles, 1.25 half sizes, stay apart while both are visible)."""
    for i, a in enumerate(objects):
        for b in objects[i + 1 :]:
            for t in range(max(a.appears, b.appears), frames):
                (ax, ay), (bx, by) = a.centre(t), b.centre(t)
                if (ax - bx) ** 2 + (ay - by) ** 2 < (1.25 * (a.radius + b.radius)) ** 2:
                    return False
    return True


def _scene(video_id: str, rng: np.random.Generator, config: PlantedConfig) -> Scene:
    n = round(config.seconds * config.fps)
    k = int(rng.integers(1, config.max_objects + 1))
    shapes = rng.choice(SHAPES, size=k, replace=False)
    colours = rng.choice(list(COLOURS), size=k, replace=False)
    gap = max(1, n // (k + 2))
    appears = np.cumsum([0, *rng.integers(gap, 2 * gap, size=k - 1)]).tolist()
    cell = config.size / 3
    while True:  # positions and paths until no two objects touch
        cells = rng.choice(9, size=k, replace=False)  # distinct cells of a 3 x 3 grid hold the paths' midpoints
        objects = []
        for i in range(k):
            direction = str(rng.choice(list(DIRECTIONS)))
            travel = config.size * rng.uniform(0.15, 0.25)  # over the frames it is visible
            mid = ((cells[i] % 3 + 0.5) * cell, (cells[i] // 3 + 0.5) * cell)
            dx, dy = DIRECTIONS[direction]
            start = (mid[0] - dx * travel / 2, mid[1] - dy * travel / 2)
            speed = travel / max(n - appears[i], 1)
            radius = config.size * rng.uniform(*config.object_size)
            objects.append(PlantedObject(str(shapes[i]), str(colours[i]), direction, appears[i], start, speed, radius))
        if _apart(objects, n):
            break
    tone = int(rng.integers(60, 180))
    background = tuple(int(np.clip(tone + rng.integers(-15, 16), 0, 255)) for _ in range(3))
    return Scene(video_id, n, background, float(rng.uniform(0, 12)), tuple(objects))


def _mask(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Pixels of ``shape`` of half size ``r`` centred on the origin (``x``, ``y``: offsets from the centre)."""
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return (ax <= 0.85 * r) & (ay <= 0.85 * r)
    if shape == "diamond":
        return ax + ay <= r
    if shape == "cross":
        return ((ax <= r) & (ay <= 0.3 * r)) | ((ax <= 0.3 * r) & (ay <= r))
    # triangle, apex up: rows from -r to 0.7 r, half width growing to 0.95 r
    return (y >= -r) & (y <= 0.7 * r) & (ax <= 0.95 * r * (y + r) / (1.7 * r))


def render(scene: Scene, size: int, seed: int = 0) -> np.ndarray:
    """The frames of ``scene``: ``(T, size, size, 3) uint8``."""
    rng = np.random.default_rng(seed)
    texture = rng.normal(0, scene.texture, size=(size, size, 1))
    base = np.clip(np.asarray(scene.background, np.float32) + texture, 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    frames = np.repeat(base[None], scene.frames, axis=0)
    for t in range(scene.frames):
        for o in scene.objects:
            if t >= o.appears:
                cx, cy = o.centre(t)
                frames[t][_mask(o.shape, xx - cx, yy - cy, o.radius)] = COLOURS[o.colour]
    return frames


def questions(scene: Scene, rng: np.random.Generator) -> list[dict]:
    """The multiple-choice questions about ``scene``: one per task type (``order`` needs two objects)."""
    rows = []

    def add(task: str, question: str, options: list[str], answer: str) -> None:
        rows.append({"task_type": task, "question": question, "options": options, "answer": options.index(answer)})

    def shuffled(items) -> list[str]:
        return [str(x) for x in rng.permutation(list(items))]

    target = scene.objects[int(rng.integers(len(scene.objects)))]
    add("colour", f"What colour is the {target.shape}?", shuffled(COLOURS), target.colour)
    add("shape", f"What shape is the {target.colour} object?", shuffled(SHAPES), target.shape)
    add("count", "How many objects appear in the video?", ["1", "2", "3", "4", "5"], str(len(scene.objects)))
    add("direction", f"Which way does {target.name} move?", shuffled([*DIRECTIONS, STILL]), target.direction)
    if len(scene.objects) > 1:
        names = [o.name for o in scene.objects]
        others = [f"the {c} {s}" for c in COLOURS for s in SHAPES if f"the {c} {s}" not in names]
        distractors = [str(x) for x in rng.choice(others, size=5 - len(names), replace=False)]
        add("order", "Which object appears first?", shuffled(names + distractors), names[0])
    return rows


def conversations(scene: Scene, rows: list[dict]) -> str:
    """The LLaVA ``conversations`` of a video (JSON): a list of single-turn conversations, each a training sample
    about the video -- its caption asked for with the training recipes' caption prompt, and each of its questions
    asked open-ended right after the video and answered with the true option's words (LLaVA-Video-178K's
    open-ended questions; ``vidlm eval mc --option-text`` scores the options the same way)."""
    from training.config import DataConfig

    turns = [(DataConfig().caption_prompt, scene.caption())]
    turns += [(r["question"], r["options"][r["answer"]]) for r in rows]
    return json.dumps([[{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}] for q, a in turns])


def _video_file(scene: Scene) -> str:
    """The scene's video, relative to the corpus folder."""
    return f"videos/{scene.video_id}.mp4"


def _plant(job: tuple[Path, int, int, PlantedConfig]) -> tuple[Scene, list[dict]]:
    """Video ``i`` of the corpus of ``seed`` (its own random stream, so any process renders it alike), written to
    ``out/videos/``; its scene and questions."""
    out, seed, i, config = job
    rng = np.random.default_rng([seed, 0, i])
    scene = _scene(f"planted_{i:05d}", rng, config)
    frames = render(scene, config.size, seed=int(rng.integers(2**31)))
    write_frames(out / _video_file(scene), frames, fps=config.fps)
    return scene, questions(scene, rng)


def write_planted(out: str | Path, num: int, seed: int, config: PlantedConfig) -> dict[str, Path]:
    """Render ``num`` planted videos into ``out`` with their manifests and questions (see the module), a process
    per CPU.

    Returns:
        ``name -> path`` of the files written (``train``, ``test``, ``train_mc``, ``test_mc``, ``scenes``).

    Raises:
        ValueError: ``num`` < 1 or a negative ``seed``.
    """
    if num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    if seed < 0:
        raise ValueError(f"--seed must be 0 or more (numpy's seeds are non-negative), got {seed}")
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    held = max(1, round(num * config.test_fraction)) if num > 1 and config.test_fraction else 0
    test = set(np.random.default_rng([seed, 1]).permutation(num)[:held].tolist())
    splits: dict[str, list[tuple[Scene, list[dict]]]] = {"train": [], "test": []}
    scenes = []
    jobs = [(out, seed, i, config) for i in range(num)]
    spawn = multiprocessing.get_context("spawn")  # a fork of a process running threads (torch, Ray) can abort
    with ProcessPoolExecutor(max_workers=min(num, os.cpu_count() or 1), mp_context=spawn) as pool:
        for i, (scene, rows) in enumerate(pool.map(_plant, jobs, chunksize=8)):
            splits["test" if i in test else "train"].append((scene, rows))
            scenes.append({"video": _video_file(scene), "caption": scene.caption(), **asdict(scene)})
    files = {"scenes": out / "scenes.jsonl"}
    files["scenes"].write_text("".join(json.dumps(s) + "\n" for s in scenes))
    end = f"0:00:{config.seconds:06.3f}"
    for split, items in splits.items():
        files[split] = out / f"{split}.csv"
        with files[split].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["videoID", "url", "timestamp", "caption", "matching_score", "path", "conversations"])
            for scene, rows in items:
                path = _video_file(scene)
                window, caption = repr([["0:00:00.000", end]]), repr([scene.caption()])
                writer.writerow([scene.video_id, "", window, caption, "[1.0]", path, conversations(scene, rows)])
        files[f"{split}_mc"] = out / f"{split}_mc.jsonl"
        with files[f"{split}_mc"].open("w") as f:
            for scene, rows in items:
                video = str((out / _video_file(scene)).resolve())
                for n, row in enumerate(rows):
                    f.write(json.dumps({"id": f"{scene.video_id}_q{n}", "video": video, **row}) + "\n")
    return files


def caption_accuracy(captions: list[dict], scenes: dict[str, dict]) -> dict[str, float]:
    """How well captions tell the planted truth: the share naming every object's true colour, shape and direction
    (whole words), each, and all three (``all``). A word match: which colour goes with which shape is not checked
    (the ``colour`` and ``shape`` questions check that).

    Args:
        captions: rows with ``video_id`` and ``caption`` (``None`` for an error row: no attribute named).
        scenes: ``video_id`` -> the scene ``vidlm planted`` wrote to ``scenes.jsonl``.
    """
    hits = {a: 0 for a in (*ATTRIBUTES, "all")}
    for row in captions:
        words = set((row["caption"] or "").lower().replace(".", " ").replace(",", " ").split())
        named = {a: all(o[a] in words for o in scenes[row["video_id"]]["objects"]) for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            hits[a] += named[a]
        hits["all"] += all(named.values())
    return {a: round(n / max(len(captions), 1), 3) for a, n in hits.items()}


def planted_job(out: Path, num: int, seed: int, config: PlantedConfig) -> Report:
    """``vidlm planted``: :func:`write_planted`, then what it wrote."""
    files = write_planted(out, num, seed, config)
    rows = [(name, str(path)) for name, path in files.items()]
    counts = {s: sum(1 for _ in files[s].open()) - 1 for s in ("train", "test")}
    lines = [f"{counts['train']} train and {counts['test']} test videos of {config.seconds:g} s in {out}/videos"]
    return Report("vidlm planted", rows, lines=lines)
