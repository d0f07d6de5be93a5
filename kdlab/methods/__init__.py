"""Distillation methods: one file each, registered under kind "method"."""
from kdlab.methods import kd, scratch  # noqa: F401  (registration)
from kdlab.methods.base import Batch, Method, NoHparams, Outputs

__all__ = ["Batch", "Method", "NoHparams", "Outputs"]
