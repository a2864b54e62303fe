"""vidlm: video LLMs (PLLaVA, LLaVA-Video, TOPA) on Ray.

The shared core: clips and manifests (:mod:`vidlm.clips`), frame sampling (:mod:`vidlm.sampling`),
decoding (:mod:`vidlm.decode`), the model family (:mod:`vidlm.models`), typed configs
(:mod:`vidlm.config`), the Ray cluster (:mod:`vidlm.cluster`), vLLM engine settings (:mod:`vidlm.engine`),
the job registry (:mod:`vidlm.jobs`) and the ``vidlm`` command line built from it (:mod:`vidlm.cli`).
"""

from vidlm import _torchvision

_torchvision.install()


def __getattr__(name: str):
    if name == "__version__":  # read on demand: this module is imported at every interpreter start (_torchvision)
        from importlib.metadata import version

        return version("vidlm")
    raise AttributeError(f"module 'vidlm' has no attribute {name!r}")
