"""DOT's optimiser (Zhao et al., ICCV 2023): its update against a float64 reference written from the paper's
equations, mdistiller's rule for parameters reached by one loss only, accumulation, checkpoint round trip."""
from __future__ import annotations

import pytest
import torch

from kdlab.engine.checkpoint import flatten_optimizer, unflatten_optimizer
from kdlab.engine.optim import DistillationOrientedTrainer, SplitGradientOptimizer
from kdlab.errors import KdlabError

LR, BETA, DELTA, WD = 0.1, 0.9, 0.075, 5e-4


def problem(seed=0):
    """float64 weights W (reached by both losses), b_task (CE only), b_kd (KD only) and a batch."""
    g = torch.Generator().manual_seed(seed)
    params = {"W": torch.randn(4, 3, generator=g, dtype=torch.float64),
              "b_task": torch.randn(3, generator=g, dtype=torch.float64),
              "b_kd": torch.randn(3, generator=g, dtype=torch.float64)}
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    teacher = torch.randn(5, 3, generator=g, dtype=torch.float64)
    return params, x, y, teacher


def losses(p, x, y, teacher):
    z = x @ p["W"]
    ce = torch.nn.functional.cross_entropy(z + p["b_task"], y)
    log_q = torch.log_softmax((z + p["b_kd"]) / 4, dim=1)
    log_t = torch.log_softmax(teacher / 4, dim=1)
    kd = (log_t.exp() * (log_t - log_q)).sum(1).mean() * 16
    return {"ce": ce, "kd": kd}


def reference(steps, batches):
    """The paper's update, v ← βv + g, θ ← θ − lr(v_task + v_kd) with β_task = β − Δ, β_kd = β + Δ, weight decay on
    the task gradient; for a parameter reached by one loss only, mdistiller's rule (engine/dot.py): that loss's
    buffer at the mean momentum β, and the weight decay joins it."""
    p = {k: v.clone() for k, v in problem()[0].items()}
    v_task = {k: torch.zeros_like(v) for k, v in p.items()}
    v_kd = {k: torch.zeros_like(v) for k, v in p.items()}
    for step in range(steps):
        g_task = {k: torch.zeros_like(v) for k, v in p.items()}
        g_kd = {k: torch.zeros_like(v) for k, v in p.items()}
        for x, y, t in batches[step]:
            leaf = {k: v.clone().requires_grad_() for k, v in p.items()}
            terms = losses(leaf, x, y, t)
            for name, grads in (("ce", g_task), ("kd", g_kd)):
                got = torch.autograd.grad(terms[name], list(leaf.values()), allow_unused=True, retain_graph=True)
                for k, g in zip(leaf, got):
                    if g is not None:
                        grads[k] += g
        for k in p:
            if k == "W":  # both losses
                v_task[k] = (BETA - DELTA) * v_task[k] + g_task[k] + WD * p[k]
                v_kd[k] = (BETA + DELTA) * v_kd[k] + g_kd[k]
            elif k == "b_task":
                v_task[k] = BETA * v_task[k] + g_task[k] + WD * p[k]
            else:  # b_kd; its first buffer is the plain gradient (mdistiller clones it before the decay)
                v_kd[k] = BETA * v_kd[k] + g_kd[k] + (WD * p[k] if step else 0)
            p[k] = p[k] - LR * (v_task[k] + v_kd[k])
    return p


def ours(steps, batches):
    p = {k: torch.nn.Parameter(v.clone()) for k, v in problem()[0].items()}
    opt = DistillationOrientedTrainer(list(p.values()), lr=LR, momentum=BETA, delta=DELTA, weight_decay=WD,
                                      distill_terms=("kd",))
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        for x, y, t in batches[step]:
            opt.backward(losses(p, x, y, t))
        opt.step()
    return p, opt


def _batches(steps, micro):
    out = []
    for step in range(steps):
        out.append([problem(seed=1 + 10 * step + m)[1:] for m in range(micro)])
    return out


@pytest.mark.parametrize("micro", [1, 2])  # one batch, or two accumulated micro-batches per step
def test_two_steps_equal_the_papers_update_in_float64(micro):
    batches = _batches(2, micro)
    got, opt = ours(2, batches)
    expected = reference(2, batches)
    for k in expected:
        torch.testing.assert_close(got[k].detach(), expected[k], rtol=1e-12, atol=1e-14, msg=k)
    group = opt.param_groups[0]
    assert (group["momentum"], group["momentum_kd"]) == pytest.approx((0.825, 0.975))
    assert not opt.distill_grads  # consumed by the step
    # the two momenta really differ: plain SGD at β with the summed gradient lands elsewhere
    sgd_p = {k: torch.nn.Parameter(v.clone()) for k, v in problem()[0].items()}
    sgd = torch.optim.SGD(list(sgd_p.values()), lr=LR, momentum=BETA, weight_decay=WD)
    for step in range(2):
        sgd.zero_grad()
        for x, y, t in batches[step]:
            sum(losses(sgd_p, x, y, t).values()).backward()
        sgd.step()
    assert not torch.allclose(sgd_p["W"], got["W"])


def test_state_round_trips_through_a_checkpoint_and_continues_exactly():
    batches = _batches(3, 1)
    full, _ = ours(3, batches)
    two, opt = ours(2, batches)
    tensors, meta = flatten_optimizer(opt.state_dict())
    assert {name.split(".", 2)[2] for name in tensors} == {"momentum_buffer", "distill_momentum_buffer"}
    fresh = {k: torch.nn.Parameter(v.detach().clone()) for k, v in two.items()}
    again = DistillationOrientedTrainer(list(fresh.values()), lr=LR, momentum=BETA, delta=DELTA, weight_decay=WD,
                                        distill_terms=("kd",))
    again.load_state_dict(unflatten_optimizer({k: v.clone() for k, v in tensors.items()}, meta))
    again.zero_grad()
    for x, y, t in batches[2]:
        again.backward(losses(fresh, x, y, t))
    again.step()
    for k in full:
        assert torch.equal(fresh[k], full[k]), k


def test_a_missing_distillation_term_and_impossible_momenta_are_refused():
    p = torch.nn.Parameter(torch.ones(2))
    opt = DistillationOrientedTrainer([p], lr=0.1, momentum=0.9, delta=0.075, weight_decay=0.0, distill_terms=("kd",))
    assert isinstance(opt, SplitGradientOptimizer)
    with pytest.raises(KdlabError, match="'kd' is not among the method's terms"):
        opt.backward({"ce": p.sum()})
    with pytest.raises(KdlabError, match="method.delta"):
        DistillationOrientedTrainer([p], lr=0.1, momentum=0.95, delta=0.075, weight_decay=0.0, distill_terms=("kd",))
