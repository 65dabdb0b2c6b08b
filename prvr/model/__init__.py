"""The DL-DKD++ student network (pure torch)."""

from prvr.model.student import BRANCHES, DLDKDStudent

__all__ = ["BRANCHES", "DLDKDStudent"]
