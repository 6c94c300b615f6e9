"""dist_train: distributed PyTorch training with atomic, manifest-verified checkpoints.

The package is laid out along the data flow of a job:
config -> distributed -> data -> models -> training -> checkpoint -> resume -> inference.
"""

__version__ = "0.1.0"
