"""vidlm: video LLMs (PLLaVA, LLaVA-Video, TOPA) on Ray.

The shared core: clips and manifests (:mod:`vidlm.clips`), frame sampling (:mod:`vidlm.sampling`),
decoding (:mod:`vidlm.decode`), the model family (:mod:`vidlm.models`), typed configs
(:mod:`vidlm.config`) and the ``vidlm`` command line (:mod:`vidlm.cli`).
"""

__version__ = "0.1.0"
