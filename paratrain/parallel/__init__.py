"""Parallel strategies, applied to a vanilla model from outside."""

from paratrain.parallel.data import DataParallel

__all__ = ["DataParallel"]
