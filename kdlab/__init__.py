"""kdlab: a PyTorch toolkit and laboratory for knowledge distillation."""
__version__ = "0.1.0"


def distill(*args, **kwargs):
    """Distil a teacher into a student in place; see :func:`kdlab.api.distill`."""
    from kdlab.api import distill as _distill

    return _distill(*args, **kwargs)


def run(*args, **kwargs):
    """Run an experiment config; see :func:`kdlab.api.run`."""
    from kdlab.api import run as _run

    return _run(*args, **kwargs)


__all__ = ["distill", "run", "__version__"]
