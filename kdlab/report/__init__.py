"""Tables (:mod:`kdlab.report.table`), figures (:mod:`kdlab.report.plots`) and the report document.

``deviation_scatter`` is re-exported lazily: importing the table renderer must not import torch
and matplotlib.
"""


def __getattr__(name: str):
    if name == "deviation_scatter":
        from kdlab.report.plots import deviation_scatter

        return deviation_scatter
    raise AttributeError(f"module 'kdlab.report' has no attribute {name!r}")


__all__ = ["deviation_scatter"]
