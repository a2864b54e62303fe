"""The video endpoint on Ray Serve LLM: ``vidlm serve`` (this machine's or ``RAY_ADDRESS``'s Ray) and
``vidlm deploy`` (a running cluster's Serve, declaratively).

This module declares the two jobs for the command line (:mod:`vidlm.jobs`; registered in ``pyproject.toml``).
"""

from vidlm.jobs import Job, Param

SERVE = Job(
    "serve",
    "Start the OpenAI-compatible video endpoint (Ray Serve + vLLM) and keep it up until Ctrl-C.",
    run="serving.app:serve_job",
    config="serving.app:ServeConfig",
    model_option=True,
)
DEPLOY = Job(
    "deploy",
    "Push the endpoint's config to a running Ray cluster (Serve's declarative API, as ``serve deploy``).",
    run="serving.app:deploy_job",
    config="serving.app:ServeConfig",
    params=(
        Param(
            "address",
            str | None,
            "Ray dashboard address (http://HEAD:8265)",
            flags=("--address",),
            default=None,
            envvar="RAY_ADDRESS",
        ),
        Param(
            "working_dir",
            str | None,
            "runtime_env working_dir URL for the app; default: the image's vidlm",
            flags=("--working-dir",),
            default=None,
        ),
        Param("dry_run", bool, "print the Serve config instead of sending it", flags=("--dry-run",), default=False),
    ),
    model_option=True,
)
