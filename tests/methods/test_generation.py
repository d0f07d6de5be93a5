"""The generation base shared by GKD and policy-gradient KD (``kdlab.methods.generation``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlab.losses import policy_gradient
from kdlab.losses.divergences import reduce_positions
from kdlab.methods.base import Batch
from kdlab.methods.generation import GenerationMethod
from kdlab.methods.gkd import GKD
from kdlab.methods.policy_gradient_kd import PolicyGradientKD


@dataclass
class _Hparams:
    sft_steps: int = 2


def _method(step=0):
    method = GenerationMethod(_Hparams(), student=torch.nn.Linear(2, 2), teacher=torch.nn.Linear(2, 2))
    method.step = step
    return method


def test_gkd_and_policy_gradient_kd_share_one_generation_base():
    for cls in (GKD, PolicyGradientKD):
        assert issubclass(cls, GenerationMethod)
        for name in ("prompts", "step_generator", "generate", "generation_options", "in_sft", "sft_loss"):
            assert getattr(cls, name) is getattr(GenerationMethod, name), (cls.__name__, name)
        assert cls.data_kinds == ("sequence",)


def test_sft_warm_up_gates_the_teacher():
    assert [_method(step).in_sft() for step in range(4)] == [True, True, False, False]
    assert [_method(step).teacher_needed() for step in range(4)] == [False, False, True, True]


def test_step_generators_depend_on_seed_step_and_stream_only():
    def draw(method, stream):
        return torch.rand(3, generator=method.step_generator(torch.device("cpu"), stream))

    a, b = _method(5), _method(5)
    torch.rand(100)  # the global stream does not matter
    assert torch.equal(draw(a, 1), draw(b, 1))
    assert not torch.equal(draw(a, 1), draw(a, 2))
    assert not torch.equal(draw(a, 1), draw(_method(6), 1))
    b.schedule_seed += 1
    assert not torch.equal(draw(a, 1), draw(b, 1))


def test_batches_name_their_source():
    batch = Batch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), torch.arange(2))
    assert GenerationMethod.data_batch(batch).extras == {"source": "data"}

    class _Generation:
        tokens = torch.ones(2, 4, dtype=torch.long)
        labels = torch.ones(2, 4, dtype=torch.long)

    out = GenerationMethod.generated_batch(batch, _Generation, "mixed")
    assert out.extras == {"source": "mixed"} and out.inputs.shape == (2, 4) and torch.equal(out.indices, batch.indices)


def test_policy_gradient_reductions_are_the_divergence_familys():
    values = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    family = {"token": "batchmean", "sequence": "sequence", "sum": "sequence_sum"}
    assert set(policy_gradient.REDUCTIONS) == set(family)
    for spelling, name in family.items():
        assert torch.equal(policy_gradient._reduce(values, mask, spelling), reduce_positions(values, mask, name))
    # "sum": per-sequence sums averaged over the two sequences with a response
    want = (values[0, :2].sum() + values[2].sum()) / 2
    torch.testing.assert_close(policy_gradient._reduce(values, mask, "sum"), want, rtol=1e-15, atol=0)
