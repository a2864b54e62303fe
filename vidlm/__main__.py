"""``python -m vidlm ...``: the same command line as ``vidlm`` (used inside Ray Jobs)."""

from vidlm.cli import main

main()
