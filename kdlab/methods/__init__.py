"""Distillation methods: one file each, registered under kind "method"."""
from kdlab.methods import dfad, distill, kd, miles, multi_teacher, route_constrained, scratch, takd  # noqa: F401
from kdlab.methods import adversarial_kd  # noqa: F401  (registration)
from kdlab.methods import aikd, pskd  # noqa: F401  (self-distillation: PS-KD, AI-KD)
from kdlab.methods import gkd, policy_gradient_kd  # noqa: F401  (sequence models)
from kdlab.methods import annealing_kd, continuation_kd, rl_multi_teacher, rl_schedule  # noqa: F401  (optimising KD over training)
from kdlab.methods import adversarial_training, ard, awr_kd, mtard, rslad, trades  # noqa: F401  (robustness)
from kdlab.methods import faithful_kd  # noqa: F401  (faithfulness)
from kdlab.methods.adapters import Adapter, make_adapter
from kdlab.methods.base import Batch, Method, NoHparams, Outputs

__all__ = ["Adapter", "Batch", "Method", "NoHparams", "Outputs", "make_adapter"]
from kdlab.methods import qat_kd  # noqa: F401  (quantization-aware training of transformer encoders)
from kdlab.methods import ab, cc, ctkd, ft, kdsvd, nst, ofd, vid  # noqa: F401  (the vision feature zoo, issue 21)
from kdlab.methods import crd, reviewkd  # noqa: F401  (the vision zoo, issue 21: CRD, ReviewKD)
from kdlab.methods import dot, mlkd  # noqa: F401  (the vision zoo: DOT, MLKD)
