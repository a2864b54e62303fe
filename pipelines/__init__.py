"""The Ray Data jobs: ``features``, ``recaption``, ``synth-captions``, ``textvid`` and ``synth-qa``.

This module declares them for the command line (:mod:`vidlm.jobs`; registered in ``pyproject.toml``) and imports
nothing heavy: each job's module loads when the job runs.
"""

from pathlib import Path

from vidlm.jobs import Job, Param

MANIFEST = Param(
    "manifest", Path, "Panda-70M CSV, video2dataset folder, list of paths, or folder of videos", must_exist=True
)
OUT = Param("out", Path, "output folder; rerun with the same folder to resume", flags=("--out", "-o"))
STORED_MANIFEST = Param(
    "manifest",
    str,
    "Panda-70M CSV, video2dataset folder, list of paths, or folder of videos (a path, or s3:// / gs:// URI)",
    must_exist=True,
)
STORED_OUT = Param(
    "out", str, "output folder (a path, or s3:// / gs:// URI); rerun with the same one to resume", flags=("--out", "-o")
)

FEATURES = Job(
    "features",
    "Decode clips and extract CLIP embeddings (and patch features) to sharded parquet with Ray Data.",
    run="pipelines.features:features_job",
    config="pipelines.features:FeaturesConfig",
    params=(STORED_MANIFEST, STORED_OUT),
)
RECAPTION = Job(
    "recaption",
    "Dense captions for every clip with a vidlm video LLM on vLLM, as sharded parquet (Ray Data).",
    run="pipelines.recaption:recaption_job",
    config="pipelines.recaption:RecaptionConfig",
    params=(STORED_MANIFEST, STORED_OUT),
    model_option=True,
)
SYNTH_CAPTIONS = Job(
    "synth-captions",
    "LLaVA-Video captions: each time window captioned with the earlier windows' captions, then a summary.",
    run="pipelines.synth_captions:synth_captions_job",
    config="pipelines.synth_captions:SynthCaptionsConfig",
    params=(MANIFEST, OUT),
    model_option=True,
)
TEXTVID = Job(
    "textvid",
    "TOPA TextVid: an LLM on vLLM (ray.data.llm) writes Tideos; CLIP text features and a memory follow.",
    run="pipelines.textvid:textvid_job",
    config="pipelines.textvid:TextVidConfig",
    params=(Param("num", int, "Tideos to generate (before near-duplicates are dropped)", flags=("--num", "-n")), OUT),
    model_option=True,
)
SYNTH_QA = Job(
    "synth-qa",
    "LLaVA-Video QA: question-answer pairs of the 16 question types from captions, with an LLM on vLLM.",
    run="pipelines.synth_qa:synth_qa_job",
    config="pipelines.synth_qa:SynthQAConfig",
    params=(
        Param(
            "captions", Path, "captions parquet (file or folder), e.g. RUN/captions of vidlm recaption", must_exist=True
        ),
        OUT,
    ),
    model_option=True,
)
