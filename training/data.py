"""Training rows -> token sequences with labels on answers only, as Ray Data datasets.

Input contracts (parquet, read with Ray Data):

- Tideos (``topa``; what ``vidlm textvid`` writes, the TOPA reference's record layout): ``tideo_id``,
  ``frames`` (list of textual frames), ``global_video_caption``, ``QAs`` (a JSON list of
  ``{question, options (5), answer ('A'-'E'), answer_open_ended}``) and ``frame_features (T, D)`` -- the
  CLIP text features of the frames.
- Clips (``video``; what ``vidlm features`` writes): ``clip_id``, ``caption``, ``extra`` (the manifest's
  other columns as JSON; a ``conversations`` list in LLaVA's ``{"from": "human"|"gpt", "value"}`` layout
  is used when present, or a list of such lists: one sample per conversation) and ``patch_features (T, h*w, Dv)``
  or ``embeddings (T, D)``. Error rows are skipped.
- Videos (``video``, ``data.train`` a manifest file: CSV, JSONL... as the jobs read it): each clip's frames are
  decoded in the training's Ray Data ingest with the model's frame sampling (:func:`frame_samples`), so the vision
  tower can train too (``trainable.vision_tower: full``); the conversation as for feature rows.
- Captioned videos (``words``: a manifest file, as for ``video``): each clip's frames and the distinct token ids
  of its ``caption`` and of each of its sentences (:func:`word_samples`), ``task`` :data:`WORDS_TASK`.

Output rows (:data:`SAMPLE_COLUMNS`): ``input_ids (L,) int64`` with the video placeholder already repeated
``num_visual_tokens(T)`` times, ``labels (L,) int64`` (``-100`` everywhere but the assistant's answers and
their end-of-turn tokens: LLaVA's masking), ``features`` (the tower features the model projects, or the clip's
frames), ``task``.

Every prompt is rendered by the tokenizer's chat template; an assistant turn's labels are the tokens the
template adds after the generation prompt, so training and inference see the same text.
"""

from __future__ import annotations

import json
import string
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "IGNORE_INDEX",
    "SAMPLE_COLUMNS",
    "collate",
    "conversation_ids",
    "frame_samples",
    "labelled_positions",
    "mc_answer",
    "mc_prompt",
    "ordered_execution",
    "read_memory",
    "tideo_samples",
    "word_samples",
]

IGNORE_INDEX = -100
SAMPLE_COLUMNS = ("input_ids", "labels", "features", "task")
SUMMARY_PROMPT = "Generate a summary for the video."  # TOPA's summary task
LETTERS = string.ascii_uppercase
WORDS_TASK = "caption_words"
"""``task`` of :func:`word_samples`' rows: ``input_ids`` holds the caption's words, not a sequence, and ``labels``
each sentence's words, each sentence's followed by :data:`SENTENCE_END`, then the empty region's word's."""
SENTENCE_END = -1
"""Ends a sentence's words in the ``labels`` of a :data:`WORDS_TASK` row."""


def mc_prompt(question: str, options: list[str]) -> str:
    """The multiple-choice question as TOPA asks it: the question, then ``(A) ...`` options, one per line."""
    lines = [f"({LETTERS[i]}) {option}" for i, option in enumerate(options)]
    return f"Question: {question}\nOptions:\n" + "\n".join(lines) + "\nAnswer with the option's letter."


def mc_answer(letter: str) -> str:
    """TOPA's answer form: ``The correct choice is (X)``."""
    return f"The correct choice is ({letter})"


@lru_cache(maxsize=4)
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@lru_cache(maxsize=4)
def _model_config(model_dir: str):
    from vidlm.models.video_llm import VidlmConfig

    return VidlmConfig.from_pretrained(model_dir)


def conversation_ids(
    tokenizer, turns: list[tuple[str, str]], video_token: str, video_token_id: int, system_prompt: str | None
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a multi-turn chat about one video (one unexpanded placeholder).

    Args:
        turns: ``(user, assistant)`` pairs; the first user message gets ``video_token`` in front when no
            turn holds it.
        video_token, video_token_id: the placeholder (``VidlmConfig.video_token*``).
        system_prompt: the system message, or ``None`` for the template's own.

    Returns:
        ``(ids, labels)``, equal lengths; labels are ``-100`` except on each assistant reply (and the tokens
        that close it).

    Raises:
        ValueError: no turn, a placeholder count other than one, or a chat template whose rendering of a
            conversation does not extend the rendering of its prefix (labels would be wrong).
    """
    if not turns:
        raise ValueError("a conversation needs at least one (user, assistant) turn")
    if not any(video_token in user for user, _ in turns):
        turns = [(f"{video_token}\n{turns[0][0]}", turns[0][1]), *turns[1:]]
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    ids: list[int] = []
    labels: list[int] = []

    def render(msgs, generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=generation_prompt, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        prompt = render(messages, True)
        messages.append({"role": "assistant", "content": assistant})
        full = render(messages, False)
        if prompt[: len(ids)] != ids or full[: len(prompt)] != prompt:
            raise ValueError("the chat template does not render conversations incrementally; cannot mask labels")
        labels += [IGNORE_INDEX] * (len(prompt) - len(ids)) + full[len(prompt) :]
        ids = full
    if ids.count(video_token_id) != 1:
        raise ValueError(f"a conversation must hold exactly one {video_token!r}, found {ids.count(video_token_id)}")
    return ids, labels


def read_memory(path: str) -> np.ndarray:
    """TOPA's memory of CLIP text features from a ``.npy`` file (``vidlm textvid``'s ``memory.npy``).

    The header is read first (memory-mapped), so a file that claims a huge or non-float array is refused before
    anything is loaded.

    Returns:
        ``(K, D) float32``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a ``.npy`` of ``(K>0, D>0)`` floats (pickled objects are never loaded).
    """
    from pathlib import Path

    if not Path(path).is_file():
        raise FileNotFoundError(f"data.memory: no file at {path}")
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"data.memory: {path} is not a .npy array ({err})") from None
    if mapped.ndim != 2 or 0 in mapped.shape or mapped.dtype.kind != "f":
        raise ValueError(f"data.memory: expected (K, D) floats, got {mapped.shape} {mapped.dtype}")
    return np.asarray(mapped, dtype=np.float32)


def _sample(model_dir: str, turns, features: np.ndarray, task: str, max_length: int) -> dict[str, Any] | None:
    """One output row, or ``None`` when the visual tokens alone do not fit ``max_length``.

    Feature rows of more frames than the model's are subsampled evenly
    (:func:`~vidlm.models.visual_tokens.subsample_frames`, TOPA's dataloaders)."""
    from vidlm.models.processing import expand_video_tokens
    from vidlm.models.visual_tokens import subsample_frames

    config = _model_config(model_dir)
    features = subsample_frames(features, config.sampling_config.max_frames_per_clip())
    ids, labels = conversation_ids(
        _tokenizer(model_dir), turns, config.video_token, config.video_token_index, config.system_prompt
    )
    n = config.num_visual_tokens(int(features.shape[0]))
    at = ids.index(config.video_token_index)
    ids = expand_video_tokens(ids, config.video_token_index, n)
    labels = labels[:at] + [IGNORE_INDEX] * n + labels[at + 1 :]
    if at + n >= max_length or all(x == IGNORE_INDEX for x in labels[:max_length]):
        return None  # nothing left to learn from after the cut
    return {
        "input_ids": np.asarray(ids[:max_length], np.int64),
        "labels": np.asarray(labels[:max_length], np.int64),
        "features": np.asarray(features),
        "task": task,
    }


def _qas(value) -> list[dict]:
    if value is None:
        return []
    if isinstance(value, str):
        return json.loads(value)
    return [dict(q) for q in value]


def tideo_samples(row: dict[str, Any], model_dir: str, tasks: tuple[str, ...], max_length: int) -> list[dict]:
    """The TOPA tasks of one Tideo (TOPA §3.2), each a training row.

    - ``summary``: ``Generate a summary for the video.`` -> the global caption;
    - ``qa``: each question -> its open-ended answer;
    - ``mcq``: each question with its five options -> ``The correct choice is (X)``.

    Args:
        row: a Tideo (module docstring); ``frame_features (T, D)``.
        model_dir: the model being trained (its tokenizer, placeholder and token counts).
    """
    features = np.asarray(row["frame_features"])
    out = []
    if "summary" in tasks and row.get("global_video_caption"):
        out.append(_sample(model_dir, [(SUMMARY_PROMPT, row["global_video_caption"])], features, "summary", max_length))
    for qa in _qas(row.get("QAs")):
        if "qa" in tasks and qa.get("answer_open_ended"):
            out.append(_sample(model_dir, [(qa["question"], qa["answer_open_ended"])], features, "qa", max_length))
        if "mcq" in tasks and qa.get("options"):
            turn = (mc_prompt(qa["question"], list(qa["options"])), mc_answer(qa["answer"]))
            out.append(_sample(model_dir, [turn], features, "mcq", max_length))
    return [s for s in out if s is not None]


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("from"), str) and "value" in m for m in value
    )


def _conversations(row: dict[str, Any], model_dir: str, caption_prompt: str) -> list[list[tuple[str, str]]]:
    """A clip's conversations, each a list of ``(user, assistant)`` turns and each one training sample.

    LLaVA's ``conversations`` in ``extra``: one list of ``{"from": ..., "value": ...}`` messages (one sample), or a
    list of such lists (several samples about the same clip, e.g. each question asked on its own as LLaVA-Video's
    and the evaluations' single-turn questions are); else the clip's caption under ``caption_prompt``.

    Raises:
        ValueError: ``conversations`` (a manifest column: hostile) is neither layout; the message names the clip.
    """
    extra = json.loads(row["extra"]) if row.get("extra") else {}
    conversations = extra.get("conversations") or []
    try:
        if isinstance(conversations, str):  # a manifest column holding LLaVA's JSON
            conversations = json.loads(conversations)
        if _is_messages(conversations):
            conversations = [conversations]
        elif not (isinstance(conversations, list) and all(_is_messages(c) for c in conversations)):
            raise ValueError("not a list of {from, value} messages, nor a list of such lists")
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"clip {row.get('clip_id')!r}: conversations: {err}") from None
    video_token = _model_config(model_dir).video_token
    out = []
    for messages in conversations:
        turns: list[tuple[str, str]] = []
        pending = None
        for message in messages:
            text = str(message["value"]).replace("<image>", video_token)
            if message["from"] in ("human", "user"):
                pending = text
            elif pending is not None:
                turns.append((pending, text))
                pending = None
        if turns:
            out.append(turns)
    if not out and row.get("caption"):
        out = [[(caption_prompt, row["caption"])]]
    return out


def clip_samples(
    row: dict[str, Any], model_dir: str, feature_column: str, caption_prompt: str, max_length: int
) -> list[dict]:
    """The conversations of one clip of ``vidlm features``' output (LLaVA's ``conversations``, else its caption),
    a sample each."""
    if row.get("error") or row.get(feature_column) is None or not len(row[feature_column]):
        return []
    features = np.asarray(row[feature_column])
    samples = [
        _sample(model_dir, turns, features, "conversation", max_length)
        for turns in _conversations(row, model_dir, caption_prompt)
    ]
    return [s for s in samples if s is not None]


def frame_samples(row: dict[str, Any], model_dir: str, caption_prompt: str, max_length: int) -> list[dict]:
    """The conversations of one clip of a manifest, a sample each, with its frames decoded as the model samples them.

    The frames are the model's frame sampling (``VidlmConfig.sampling_config``, seeded per clip) of the clip window,
    ``(T, S, S, 3) uint8`` at the tower's side ``S``, in the row's ``features`` (decoded once for all the clip's
    conversations); the trainer turns them into pixel values with the model's own
    :meth:`~vidlm.models.video_llm.VidlmForConditionalGeneration.preprocess`, as inference does. A manifest error
    row, or a clip that does not decode (:class:`~vidlm.clips.ClipError`: missing, corrupt, too large), gives no
    sample.
    """
    if row.get("error") or not row.get("path"):
        return []
    conversations = _conversations(row, model_dir, caption_prompt)
    if not conversations:
        return []
    clip = _decoded(row, model_dir)
    if clip is None:
        return []
    samples = [_sample(model_dir, turns, clip.frames, "conversation", max_length) for turns in conversations]
    return [s for s in samples if s is not None]


def _decoded(row: dict[str, Any], model_dir: str):
    """The clip of a manifest row decoded as the model samples frames (``(T, S, S, 3) uint8``), or ``None`` for an
    error row or a clip that does not decode (:class:`~vidlm.clips.ClipError`: missing, corrupt, too large)."""
    from vidlm.clips import ClipError
    from vidlm.decode import decode_clip

    if row.get("error") or not row.get("path"):
        return None
    config = _model_config(model_dir)
    try:
        window = (row["start_s"], row["end_s"])
        return decode_clip(row["path"], config.sampling_config, config.image_size, *window, clip_key=row["clip_id"])
    except ClipError:
        return None


def word_samples(row: dict[str, Any], model_dir: str) -> list[dict]:
    """One ``words`` sample of a manifest clip: its frames decoded as the model samples them (``features``, ``(T, S,
    S, 3) uint8``), the distinct token ids of its ``caption`` (``input_ids``, ``(W,) int64``, sorted), those of each
    of the caption's sentences (:func:`~vidlm.models.caption_words.caption_sentences`; the caption itself where it has
    none, as ``"..."``), each sentence's sorted and
    followed by :data:`SENTENCE_END`, then the ids of
    :data:`~vidlm.models.caption_words.EMPTY_REGION_WORD` (``labels``, int64), ``task`` :data:`WORDS_TASK`. A row
    without a caption, an error row or a clip that does not decode gives no sample."""
    from vidlm.models.caption_words import EMPTY_REGION_WORD, caption_sentences

    caption = row.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        return []
    clip = _decoded(row, model_dir)
    if clip is None:
        return []
    tokenizer = _tokenizer(model_dir)

    def distinct(text: str) -> list[int]:
        return sorted(set(tokenizer(text, add_special_tokens=False)["input_ids"]))

    sentences = [[*distinct(s), SENTENCE_END] for s in caption_sentences(caption) or [caption]]
    labels = np.asarray([i for s in sentences for i in s] + distinct(EMPTY_REGION_WORD), np.int64)
    words = np.asarray(distinct(caption), np.int64)
    return [{"input_ids": words, "labels": labels, "features": clip.frames, "task": WORDS_TASK}]


def manifest_word_weights(config, model_dir: str) -> torch.Tensor:
    """The focus token's word weights of a ``words`` run (``VidlmConfig.visual_focus_token``): the inverse document
    frequencies (:func:`~vidlm.models.caption_words.word_weights`) of the tokens of every sentence of the manifest's
    captions, split and tokenised as :func:`word_samples` splits them; every rank computes the same.

    Returns:
        ``(V,) float32``, V the LLM's vocabulary.

    Raises:
        FileNotFoundError: no manifest at ``data.train``.
    """
    from vidlm.clips import clips_table
    from vidlm.models.caption_words import caption_sentences, word_weights

    tokenizer = _tokenizer(model_dir)
    captions = clips_table(Path(config.data.train), config.data.manifest).column("caption").to_pylist()
    sentences = (
        tokenizer(s, add_special_tokens=False)["input_ids"]
        for c in captions
        if isinstance(c, str) and c.strip()
        for s in caption_sentences(c) or [c]
    )
    return word_weights(sentences, _model_config(model_dir).text_config.vocab_size)


@contextmanager
def ordered_execution():
    """Ray Data executions in this process keep the dataset's order (``DataContext.execution_options
    .preserve_order``) inside the block, as Ray Train's ingest does (:func:`training.trainer.run_training`): a
    materialised training set then holds the rows in the order a streamed one gives them. The setting before the
    block is restored after it, also on an error."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    options.preserve_order, before = True, options.preserve_order
    try:
        yield
    finally:
        options.preserve_order = before


def train_files(config) -> list[Path]:
    """The files a run's ``data.train`` reads: a manifest file, a ``.parquet`` file, or every ``.parquet`` file under
    a folder (name order).

    Raises:
        FileNotFoundError: ``data.train`` is unset, missing, or a folder without a ``.parquet`` file.
    """
    folder = Path(config.data.train)
    if not config.data.train or not folder.exists():
        raise FileNotFoundError(
            f"data.train: no parquet folder or manifest file at {folder!s} (give data.train=DIR or a manifest)"
        )
    files = sorted(folder.rglob("*.parquet")) if folder.is_dir() else [folder]
    if not files:
        raise FileNotFoundError(f"data.train: {folder} holds no .parquet file")
    return files


def build_dataset(config, model_dir: str):
    """The training dataset of a :class:`~training.config.TrainConfig` (lazy Ray Data plan).

    Raises:
        FileNotFoundError: ``data.train`` is neither a folder nor a file (:func:`train_files`).
        ValueError: its columns are not those of the recipe's contract.
    """
    import pyarrow.parquet as pq
    import ray

    from vidlm.models.visual_tokens import feature_column

    d = config.data
    folder = Path(d.train)
    if config.recipe == "words" and (folder.is_dir() or folder.suffix.lower() == ".parquet"):
        raise ValueError(f"data.train: recipe 'words' decodes videos: give a manifest file, not {folder}")
    files = train_files(config)
    manifest = folder.is_file() and folder.suffix.lower() != ".parquet"
    if manifest and config.recipe in ("video", "words"):
        from vidlm.clips import clips_table

        if config.recipe == "words":
            fn, kwargs = word_samples, {"model_dir": model_dir}
        else:
            fn = frame_samples
            kwargs = {"model_dir": model_dir, "caption_prompt": d.caption_prompt, "max_length": d.max_length}
        return ray.data.from_arrow(clips_table(folder, config.data.manifest)).flat_map(fn, fn_kwargs=kwargs)
    columns = set(pq.read_schema(files[0]).names)
    if config.recipe == "topa":
        needed = {"frame_features", "global_video_caption", "QAs"}
        fn, kwargs = tideo_samples, {"model_dir": model_dir, "tasks": d.tasks, "max_length": d.max_length}
    else:
        column = feature_column(_model_config(model_dir))
        needed = {column, "caption"}
        fn = clip_samples
        kwargs = {
            "model_dir": model_dir,
            "feature_column": column,
            "caption_prompt": d.caption_prompt,
            "max_length": d.max_length,
        }
    if needed - columns:
        raise ValueError(
            f"data.train: recipe {config.recipe!r} needs columns {sorted(needed)}; {files[0].name} lacks "
            f"{sorted(needed - columns)}"
        )
    ds = ray.data.read_parquet([str(f) for f in files])
    return ds.flat_map(fn, fn_kwargs=kwargs)


def labelled_positions(labels):
    """Where the LM head has to run for ``labels (B, L) int64`` (``-100`` unlabelled): ``logits_to_keep (K,) int64``,
    the positions whose next token is labelled in some row, and ``shift_labels (B, K) int64``, those next tokens --
    transformers' ``logits_to_keep`` and ``ForCausalLMLoss``'s ``shift_labels``, the same mean loss as the whole
    sequence's logits."""
    import torch

    keep = torch.nonzero((labels[:, 1:] != IGNORE_INDEX).any(dim=0)).flatten()
    return {"logits_to_keep": keep, "shift_labels": labels[:, keep + 1]}


def collate(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, Any]:
    """A micro-batch of sample rows -> the model's inputs, right-padded.

    Logits are computed only where a label follows: ``logits_to_keep`` holds the positions whose next token is
    labelled in some row, ``shift_labels`` those next tokens (the causal LM's shifted labels at those positions), so
    the LM head and its softmax run on the answers' tokens instead of the whole sequence -- visual tokens and
    prompts included -- and the loss is the same mean over the labelled tokens (transformers' ``logits_to_keep`` and
    ``ForCausalLMLoss``'s ``shift_labels``).

    Returns:
        ``input_ids (B, L) int64``, ``attention_mask (B, L) int64``, ``labels (B, L) int64`` (``-100`` on
        padding), ``logits_to_keep (K,) int64``, ``shift_labels (B, K) int64``, and ``video_features``, a list of
        ``B`` float32 tensors, or for rows of decoded frames (:func:`frame_samples`) ``frames``, a list of ``B``
        ``(T, S, S, 3) uint8`` arrays. A micro-batch of :func:`word_samples` gives ``caption_words`` (``B``
        ``(W_i,) int64`` tensors), ``caption_sentences`` (``B`` lists of ``(W_s,) int64`` tensors), ``empty_words``
        (``(W_e,) int64``) and ``frames``.
    """
    import torch

    tasks = batch.get("task")
    if tasks is not None and len(tasks) and tasks[0] == WORDS_TASK:
        words = [torch.from_numpy(np.asarray(x, dtype=np.int64)) for x in batch["input_ids"]]
        sentences, empty = [], torch.zeros(0, dtype=torch.int64)
        for labels in batch["labels"]:
            labels = np.asarray(labels, dtype=np.int64)
            *parts, last = np.split(labels, np.flatnonzero(labels == SENTENCE_END) + 1)  # each part ends its sentence
            sentences.append([torch.from_numpy(p[:-1]) for p in parts])
            empty = torch.from_numpy(last)
        frames = [np.asarray(f) for f in batch["features"]]
        return {"caption_words": words, "caption_sentences": sentences, "empty_words": empty, "frames": frames}
    rows = [np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for i, (r, lab) in enumerate(zip(rows, batch["labels"], strict=True)):
        ids[i, : len(r)] = torch.from_numpy(r)
        labels[i, : len(r)] = torch.from_numpy(np.asarray(lab, dtype=np.int64))
        mask[i, : len(r)] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels} | labelled_positions(labels)
    features = [np.asarray(f) for f in batch["features"]]
    if features and features[0].dtype == np.uint8:  # frames (T, S, S, 3) of frame_samples
        return {**out, "frames": features}
    return {**out, "video_features": [torch.from_numpy(f.astype(np.float32, copy=False)) for f in features]}
