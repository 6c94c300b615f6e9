"""Transfer learning through import paths: see model.py."""
