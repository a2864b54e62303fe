"""``vidlm eval mc``: multiple-choice video QA in the EgoSchema / MVBench layout.

A benchmark is JSONL, one question per line: ``question``, ``options`` (list), ``answer`` (a letter, or the
option's index), ``task_type`` (optional), and the video as either ``video`` (a path, decoded with the
model's own frame sampling), ``features`` (the tower's features as nested lists: ``(T, D)`` for TOPA,
``(T, h*w, Dv)`` for patch models) or ``features_path`` (a ``.npy`` of the same).

Up to three scores per question:

- ``loss`` (TOPA §4, zero-shot multiple choice): each option's answer ``The correct choice is (X)`` is
  scored by the mean token cross-entropy of the answer given the video and the question; the lowest wins.
- ``generate``: greedy decoding of the answer, and the first ``(X)`` (or lone letter) in it.
- ``option`` (optional): the question asked on its own, open-ended, as LLaVA-Video-178K's open-ended questions
  are (no options listed); each option's own words are scored as the answer by their mean token cross-entropy,
  the lowest wins -- the likelihood scoring of multiple choice for models trained on open-ended answers.

The ``loss`` and ``generate`` prompt is the training prompt (:func:`training.data.mc_prompt` in the chat template),
so a model pre-aligned on TOPA's multiple-choice task is asked exactly what it learned.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from training.data import IGNORE_INDEX, LETTERS, conversation_ids, labelled_positions, mc_answer, mc_prompt
from vidlm.jobs import Report

__all__ = ["McResult", "evaluate_mc", "load_benchmark"]

_CHOICE = re.compile(r"\(([A-Z])\)|\b([A-Z])\b")


def load_benchmark(path: str | Path) -> list[dict]:
    """Rows of a JSONL benchmark, each checked and with ``answer`` as a letter.

    Raises:
        FileNotFoundError: no file.
        ValueError: a row without question / options / answer / video, or an answer outside its options
            (names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"question", "options", "answer"} - set(row)
        if missing or not ({"video", "features", "features_path"} & set(row)):
            raise ValueError(f"{path}:{n}: needs question, options, answer and video|features|features_path")
        answer = row["answer"]
        letter = LETTERS[answer] if isinstance(answer, int) else str(answer).strip("() ").upper()
        if letter not in LETTERS[: len(row["options"])]:
            raise ValueError(f"{path}:{n}: answer {answer!r} is not one of {len(row['options'])} options")
        rows.append({**row, "answer": letter, "task_type": row.get("task_type", "all")})
    return rows


@dataclass
class McResult:
    """Accuracy of one model on one benchmark, overall and per task type, for each score."""

    n: int = 0
    correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # score -> count
    by_type: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    def add(self, task_type: str, score: str, ok: bool) -> None:
        self.correct[score] += int(ok)
        counts = self.by_type[(task_type, score)]
        counts[0] += int(ok)
        counts[1] += 1

    def accuracy(self, score: str = "loss", task_type: str | None = None) -> float:
        """Fraction correct (``task_type=None``: all questions)."""
        if task_type is None:
            return self.correct[score] / max(self.n, 1)
        ok, total = self.by_type[(task_type, score)]
        return ok / max(total, 1)

    @property
    def task_types(self) -> list[str]:
        return sorted({t for t, _ in self.by_type})


def _features(row: dict, model) -> dict:
    """Model inputs for the row's video: ``video_features`` (subsampled evenly to the model's frame count, as
    TOPA's dataloaders do) or ``pixel_values_videos``."""
    from vidlm.models.visual_tokens import subsample_frames

    max_frames = model.config.sampling_config.max_frames_per_clip()
    if "features" in row:
        features = np.asarray(row["features"], np.float32)
        return {"video_features": [torch.from_numpy(subsample_frames(features, max_frames))]}
    if "features_path" in row:
        features = np.load(row["features_path"], allow_pickle=False).astype(np.float32)
        return {"video_features": [torch.from_numpy(subsample_frames(features, max_frames))]}
    from vidlm.decode import decode_clip

    clip = decode_clip(row["video"], model.config.sampling_config, model.config.image_size)
    return {"pixel_values_videos": model.preprocess(clip.frames)[None]}


def _visual_len(inputs: dict, model) -> int:
    if "video_features" in inputs:
        return model.config.num_visual_tokens(inputs["video_features"][0].shape[0])
    return model.config.num_visual_tokens(inputs["pixel_values_videos"].shape[1])


@torch.no_grad()
def _reply_losses(model, tokenizer, prompt: str, replies: list[str], inputs: dict) -> list[float]:
    """Mean token cross-entropy of each reply to ``prompt`` about the video, all replies in one forward.

    The video and the prompt are embedded once (the first reply's conversation); each reply's sequence is that
    shared prefix followed by its own text embeddings, right-padded into a ``(R, L, Dl)`` batch (the causal mask
    keeps a reply's logits those of its sequence alone), and the LM head runs only where a reply token follows (as
    in training: :func:`~training.data.labelled_positions`).

    Returns:
        ``R`` floats: each reply's mean negative log-likelihood (nats per token).
    """
    from vidlm.models.processing import expand_video_tokens

    c = model.config
    n = _visual_len(inputs, model)
    sequences = []  # (embeds (1, L_r, Dl), labels)
    first = None  # (ids, embeds) of the first reply
    for reply in replies:
        turns = [(prompt, reply)]
        ids, labels = conversation_ids(tokenizer, turns, c.video_token, c.video_token_index, c.system_prompt)
        at = ids.index(c.video_token_index)
        ids = expand_video_tokens(ids, c.video_token_index, n)
        labels = labels[:at] + [IGNORE_INDEX] * n + labels[at + 1 :]
        if first is None:
            first = ids, model.embed(torch.tensor([ids]), labels=torch.tensor([labels]), **_as_embed_kwargs(inputs))
            embeds = first[1]
        else:  # the shared prefix (system, video, prompt) from the first; the rest is text
            shared = next((i for i, (a, b) in enumerate(zip(ids, first[0], strict=False)) if a != b), len(ids))
            shared = min(shared, len(ids) - 1, first[1].shape[1])
            rest = model.get_input_embeddings()(torch.tensor([ids[shared:]]))
            embeds = torch.cat([first[1][:, :shared], rest], dim=1)
        sequences.append((embeds, labels))
    batch = pad_sequence([e[0] for e, _ in sequences], batch_first=True)  # (R, L, Dl), zeros after each reply
    lengths = torch.tensor([e.shape[1] for e, _ in sequences])
    mask = (torch.arange(batch.shape[1]) < lengths[:, None]).long()
    labels = pad_sequence([torch.tensor(t) for _, t in sequences], batch_first=True, padding_value=IGNORE_INDEX)
    kept = labelled_positions(labels)
    logits = model(inputs_embeds=batch, attention_mask=mask, logits_to_keep=kept["logits_to_keep"]).logits.float()
    targets = kept["shift_labels"]  # (R, K)
    counted = targets != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")  # (R, K)
    return ((nll * counted).sum(dim=1) / counted.sum(dim=1)).tolist()


def _option_losses(model, tokenizer, row: dict, inputs: dict) -> list[float]:
    """Mean token cross-entropy of each option's answer (TOPA's multiple-choice score)."""
    letters = LETTERS[: len(row["options"])]
    prompt = mc_prompt(row["question"], list(row["options"]))
    return _reply_losses(model, tokenizer, prompt, [mc_answer(letter) for letter in letters], inputs)


def _answer_losses(model, tokenizer, row: dict, inputs: dict) -> list[float]:
    """Mean token cross-entropy of each option's words as the reply to the question alone (the ``option`` score)."""
    return _reply_losses(model, tokenizer, row["question"], [str(o) for o in row["options"]], inputs)


def _as_embed_kwargs(inputs: dict) -> dict:
    return (
        {"video_features": inputs["video_features"]}
        if "video_features" in inputs
        else {"pixel_values_videos": inputs["pixel_values_videos"]}
    )


@torch.no_grad()
def _generated_choice(model, tokenizer, row: dict, inputs: dict, max_new_tokens: int) -> str | None:
    """The letter in the greedy answer, or ``None``."""
    from vidlm.models.processing import expand_video_tokens, video_prompt_ids

    c = model.config
    ids = video_prompt_ids(
        tokenizer, mc_prompt(row["question"], list(row["options"])), c.video_token, c.video_token_index, c.system_prompt
    )
    ids = expand_video_tokens(ids, c.video_token_index, _visual_len(inputs, model))
    embeds = model.embed(torch.tensor([ids]), **_as_embed_kwargs(inputs))
    out = model.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    valid = LETTERS[: len(row["options"])]
    for m in _CHOICE.finditer(text):
        letter = m.group(1) or m.group(2)
        if letter in valid:
            return letter
    return None


def evaluate_mc(
    model_dir: str | Path,
    benchmark: str | Path,
    generate: bool = True,
    max_new_tokens: int = 12,
    limit: int | None = None,
    modality_projection: bool = True,
    option_text: bool = False,
) -> McResult:
    """Score a model on a multiple-choice benchmark (see the module docstring).

    Args:
        model_dir: a vidlm model directory (``OUT/export`` of ``vidlm train``, a preset name, a converted model).
        benchmark: the JSONL file.
        generate: also score by greedy generation.
        limit: the first ``limit`` questions only.
        modality_projection: project image features onto the model's memory (TOPA eq. 2) when it has one;
            ``False`` scores the same model without it (the ablation of TOPA's Table 5).
        option_text: also score each option's own words as the answer to the question alone (``option``).

    Raises:
        FileNotFoundError, ValueError: see :func:`load_benchmark`.
    """
    from transformers import AutoTokenizer

    from vidlm.models.presets import resolve_model
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    rows = load_benchmark(benchmark)[:limit]
    path = resolve_model(model_dir)
    model = VidlmForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    if not modality_projection:
        model.modality_memory = None
    tokenizer = AutoTokenizer.from_pretrained(path)
    result = McResult()
    last = (None, None)  # (source, inputs): a video's questions in a row decode it once
    for row in rows:
        source = row.get("video") or row.get("features_path")
        inputs = last[1] if source is not None and source == last[0] else _features(row, model)
        last = (source, inputs)
        losses = _option_losses(model, tokenizer, row, inputs)
        result.n += 1
        result.add(row["task_type"], "loss", LETTERS[int(np.argmin(losses))] == row["answer"])
        if option_text:
            losses = _answer_losses(model, tokenizer, row, inputs)
            result.add(row["task_type"], "option", LETTERS[int(np.argmin(losses))] == row["answer"])
        if generate:
            result.add(
                row["task_type"],
                "generate",
                _generated_choice(model, tokenizer, row, inputs, max_new_tokens) == row["answer"],
            )
    return result


def eval_mc_job(
    benchmark: Path,
    model: str,
    generate: bool = True,
    limit: int | None = None,
    modality_projection: bool = True,
    option_text: bool = False,
) -> Report:
    """``vidlm eval mc``: :func:`evaluate_mc`, as a table of accuracy per task type and score."""
    result = evaluate_mc(
        model,
        benchmark,
        generate=generate,
        limit=limit,
        modality_projection=modality_projection,
        option_text=option_text,
    )
    scores = ["loss", *(["generate"] if generate else []), *(["option"] if option_text else [])]
    rows = [(t, *(f"{result.accuracy(s, t):.3f}" for s in scores)) for t in result.task_types]
    rows.append(("[bold]overall[/]", *(f"[bold]{result.accuracy(s):.3f}[/]" for s in scores)))
    header = ("task type", *(f"accuracy ({s})" for s in scores))
    return Report(f"{Path(benchmark).name}: {result.n} questions", rows, header=header)
