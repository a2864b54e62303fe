"""Ray Data jobs that put core pieces together: ``features`` (decode + CLIP features)."""
