"""The study views, one file each, registered under kind ``"view"`` (see :mod:`kdlab.study.views.base`).

Importing this package registers them; ``kdlab.registry`` does so on the first lookup of a view.
A new view is one file here plus its import below.
"""
from kdlab.study.views import capacity, comparison, deviations, gkd_grid, qat, robustness  # noqa: F401
