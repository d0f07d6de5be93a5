"""Teacher-assistant KD (Mirzadeh et al., AAAI 2020, "Improved Knowledge Distillation via Teacher Assistant").

The chain teacher → assistant(s) → student is declared in the teacher section:

    teacher: {model: cnn1d, width: 128, assistants: [{model: cnn1d, width: 32}]}
    method: {name: takd, temperature: 4, alpha: 0.9}

Every stage is trained by the same Hinton KD objective (the paper's eq. 1 at
each hop), each assistant as a run of its own in experiment "teachers", shared by
every student that uses the same chain. The student's step is plain KD against
the last assistant, so this method is KD; it exists to name the setting.
"""
from __future__ import annotations

from kdlab.methods.kd import KD
from kdlab.registry import register


@register("method", "takd")
class TAKD(KD):
    """Teacher-assistant KD: Hinton KD at every hop of the chain declared in teacher.assistants."""
