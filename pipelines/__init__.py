"""The Ray Data jobs: ``features``, ``recaption``, ``synth-captions``, ``textvid`` and ``synth-qa``.

This module declares them for the command line (:mod:`vidlm.jobs`; registered in ``pyproject.toml``) and imports
nothing heavy: each job's module loads when the job runs.
"""

from pathlib import Path

from vidlm.jobs import Job, Param
from vidlm.plan import DEFAULT_GPU_TYPE, GPU_TYPES

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
    params=(
        STORED_MANIFEST,
        STORED_OUT,
        Param(
            "serve",
            str | None,
            "caption through this running Serve app (vidlm serve's name) instead of engines of the job's own",
            flags=("--serve",),
            default=None,
        ),
    ),
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

PLAN_PARAMS = (
    Param("manifest", str | None, "the corpus's manifest (or a sample of it, with --clips)", default=None),
    Param("clips", int | None, "clips of the corpus (default: the manifest's)", flags=("--clips",), default=None),
    Param(
        "mean_clip_s",
        float | None,
        "mean clip length in seconds (default: the manifest's windows)",
        flags=("--mean-clip-s",),
        default=None,
    ),
    Param(
        "gpu_type",
        str | None,
        f"{', '.join(GPU_TYPES)} or cpu [default: {DEFAULT_GPU_TYPE}; calibrated: this cluster's]",
        flags=("--gpu-type",),
        default=None,
    ),
    Param(
        "gpus",
        int | None,
        "GPUs to plan on (default: one node; with --deadline-h: as needed)",
        flags=("--gpus",),
        default=None,
    ),
    Param(
        "deadline_h",
        float | None,
        "hours the job must end within: plan the GPUs",
        flags=("--deadline-h",),
        default=None,
    ),
    Param(
        "calibrate",
        bool,
        "measure the rates on the connected Ray cluster (the real job on a sample)",
        flags=("--calibrate",),
        default=False,
    ),
    Param(
        "sample",
        int | None,
        "--calibrate: clips of the probe (default: one engine's in-flight clips, at most 64)",
        flags=("--sample",),
        default=None,
    ),
    Param(
        "probe_out",
        str | None,
        "--calibrate: the probe's output folder or URI (default: a temporary folder)",
        flags=("--probe-out",),
        default=None,
    ),
    Param("as_json", bool, "print one JSON object instead of a table", flags=("--json",), default=False),
)
PLAN_RECAPTION = Job(
    "plan recaption",
    "Plan a recaption run: visual and text tokens, engine memory, GPUs for a deadline, decode CPUs, bottleneck.",
    run="pipelines.plan:plan_recaption_job",
    config="pipelines.recaption:RecaptionConfig",
    params=(
        *PLAN_PARAMS[:6],
        Param(
            "output_tokens",
            int | None,
            "mean output tokens per caption (default: generation.max_tokens, an upper bound)",
            flags=("--output-tokens",),
            default=None,
        ),
        *PLAN_PARAMS[6:],
    ),
    model_option=True,
)
PLAN_FEATURES = Job(
    "plan features",
    "Plan a feature run: encode GPUs for a deadline, decode CPUs, output bytes, bottleneck.",
    run="pipelines.plan:plan_features_job",
    config="pipelines.features:FeaturesConfig",
    params=PLAN_PARAMS,
)
PLANTED = Job(
    "planted",
    "Render videos of simple scenes whose content is known (shapes, colours, motion, order), with Panda-70M "
    "manifests of their true captions and multiple-choice questions, split into train and test.",
    run="pipelines.planted:planted_job",
    config="pipelines.planted:PlantedConfig",
    params=(
        Param("out", Path, "output folder (videos/, train.csv, test.csv, *_mc.jsonl)", flags=("--out", "-o")),
        Param("num", int, "videos to render", flags=("--num", "-n"), default=200),
        Param("seed", int, "seed of every scene", flags=("--seed",), default=0),
    ),
)
