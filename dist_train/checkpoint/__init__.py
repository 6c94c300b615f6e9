"""Checkpoints: storage seam, serialization, manifest, commit protocol, catalog, retention."""
