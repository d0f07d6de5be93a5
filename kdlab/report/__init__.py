"""Figures of analyses (matplotlib is imported only when a figure is drawn, with the Agg backend)."""
from kdlab.report.plots import deviation_scatter

__all__ = ["deviation_scatter"]
