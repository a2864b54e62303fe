"""The tutorial's learning loop (``make tutorial``, README "Tutorial"), small enough for CI: ``examples/tutorial.py``
as a user runs it -- ``vidlm planted`` -> ``vidlm train`` (Ray Train, DeepSpeed) -> the export scored by ``vidlm eval
mc --option-text`` and captioning the held-out videos through vLLM (``vidlm recaption --model EXPORT``).

One object per video (``--max-objects 1``), 100 videos (20 held out) and 8 epochs (400 steps) instead of 200
videos and 11 (1,243 steps).
Asserted: colour, the attribute this budget teaches, with lower thresholds than the issue's goals (0.9 for the
questions, 0.8 for the captions) that sit far above chance (0.2): held-out colour questions >= 0.7 and vLLM captions
naming the true colour >= 0.6, against <= 0.45 for the untrained model. Shape and motion are not learnt in this
budget (README "Tutorial"), so they are not asserted. The captions come from the vLLM engine and the answers from
transformers, both reading the same export: a mismatch of frames, pooling, centring or merge scale between training
and serving loses the captions' colour while the answers keep it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def test_the_tutorial_loop_learns_colour_and_vllm_captions_name_it(tmp_path):
    out = tmp_path / "tutorial"
    argv = ["--out", str(out), "--seed", "0", "--num", "100", "--max-objects", "1", "optim.epochs=8"]
    run = subprocess.run(
        [sys.executable, "examples/tutorial.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=1800
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())

    assert report["test_questions"] == 20 * 4  # one object: colour, shape, count and direction, no order
    assert set(report["mc_accuracy"]) == {"colour", "shape", "count", "direction"}
    assert report["mc_accuracy"]["colour"] >= 0.7, report
    assert report["untrained_mc_accuracy"]["colour"] <= 0.45, report
    assert report["caption_attribute_accuracy"]["colour"] >= 0.6, report
    assert "colour" in run.stdout and str(out / "report.json") in run.stdout  # the printed table
