"""Sharded students under torchrun (``train.sharding: fsdp``): PyTorch's FSDP2, ``fully_shard``.

Each process holds 1/world of every student parameter, gradient and optimiser buffer (DTensors sharded
on dim 0); a forward all-gathers one block's parameters at a time and the backward reduce-scatters
the gradients, averaged over ranks as DDP's are, so the data-parallel semantics of
``kdlab.engine.distributed`` (shares of the global batch, shard weights) carry over unchanged.

Choices (docs/methods.md, "Sharded students (FSDP2)"):

* blocks: every child of an ``nn.ModuleList`` (a transformer's layers) is its own FSDP unit, the
  rest (embeddings, head, a small MLP) the root unit;
* the teacher is not sharded: it is frozen and forward-only, replicated on every rank (in bf16 with
  ``teacher.dtype: bf16``, in inference mode), so rank 0 can run it alone (agreement targets, the
  teacher cache) and no collective depends on the teacher;
* forwards of a sharded student are collective: evaluation runs on every rank (rank 0's metrics are
  broadcast and recorded) and a sampling loop stops only when every rank's rows are done (``all_done``);
* checkpoints are gathered: every rank joins the all-gather of each tensor (``gathered``), rank 0 writes
  the same single-file checkpoint as a one-process run; a resume distributes the full tensors over the
  current ranks (``shard_like``), so a run resumes with any number of processes, or none.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from kdlab.config.checks import config_rule
from kdlab.config.schema import TeacherConfig
from kdlab.errors import KdlabError


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:  # the launcher's own error (distributed.launched_by_torchrun) names it
        return 1


@config_rule
def check_sharding(cfg, errors: list[str]) -> None:
    """Known before any work: under torchrun every global batch splits over the processes; ``train.sharding:
    fsdp`` needs torchrun and a student and method that train sharded."""
    world = _world_size()
    trains = [("train", cfg.train)]
    if isinstance(cfg.teacher, TeacherConfig) and cfg.teacher.train is not None:
        trains.append(("teacher.train", cfg.teacher.train))
    for path, train in trains:
        if world > 1 and isinstance(train.batch_size, int) and train.batch_size % world:
            errors.append(f"{path}.batch_size: {train.batch_size} does not split over {world} processes; the global "
                          f"batch must be a multiple of torchrun's --nproc_per_node")
        if train.sharding != "fsdp":
            continue
        if world <= 1:
            errors.append(f"{path}.sharding: fsdp needs several processes: start the run with torchrun "
                          f"--nproc_per_node N -m kdlab run, or set {path}.sharding: ddp")
        if train.compile:
            errors.append(f"{path}.compile does not combine with {path}.sharding: fsdp; drop one of them")
    if cfg.train.sharding == "fsdp":
        if getattr(cfg.student, "peft", None) is not None:
            errors.append("train.sharding: fsdp does not take a LoRA student (student.peft): its adapter is small, "
                          "replicate it with train.sharding: ddp")
        method = getattr(cfg.method, "name", None)
        if isinstance(method, str):
            from kdlab import registry

            problem = _method_problem(registry.get("method", method), method)
            if problem:
                errors.append(problem)


def _method_problem(cls, name: str) -> str | None:
    """Why method class ``cls`` cannot train a sharded student (None: it can)."""
    from kdlab.methods.base import Method

    if not isinstance(cls, type) or not issubclass(cls, Method):
        return None
    if cls.adversary_parameters is not Method.adversary_parameters:
        return (f"train.sharding: fsdp does not take method {name} (its adversary's step runs its own forwards "
                "and optimiser beside the sharded student); use train.sharding: ddp")
    if cls.make_optimizer is not Method.make_optimizer:
        return (f"train.sharding: fsdp does not take method {name} (its own optimiser takes each loss term's "
                "gradient apart, which sharded gradients do not allow); use train.sharding: ddp")
    if cls.per_sample_state:
        return (f"train.sharding: fsdp does not take method {name} (it keeps per-sample state that the processes "
                "would split); run it in one process")
    return None


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` was sharded by ``fully_shard`` (its forwards are collective)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def check(method, train, dist_ctx) -> None:
    """Refuse, in one line, what cannot train sharded (before any work)."""
    if dist_ctx is None:
        raise KdlabError("train.sharding: fsdp needs several processes: start the run with torchrun "
                         "--nproc_per_node N -m kdlab run, or set train.sharding: ddp")
    problem = _method_problem(type(method), type(method).__name__)
    if problem:
        raise KdlabError(problem)
    if train.compile:
        raise KdlabError("train.compile does not combine with train.sharding: fsdp; drop one of them")


# Methods of a student that run its submodules without entering its ``forward`` (an HF model's own ``generate``
# calls the wrapped model directly): FSDP runs the root unit's pre/post-forward hooks (lazy init, all-gather of
# the embeddings and head) around them as around ``forward``.
FORWARD_METHODS = ("kdlab_generate",)


def shard_student(student: nn.Module, device: torch.device, *, method, train, dist_ctx) -> nn.Module:
    """``student`` sharded in place over all ranks (FSDP2), after ``check``; the same object is returned."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    check(method, train, dist_ctx)

    if getattr(student, "kdlab_adapter", None) is not None:
        raise KdlabError("train.sharding: fsdp does not take a LoRA student (student.peft): its adapter is small, "
                         "replicate it with train.sharding: ddp")
    from torch.distributed.device_mesh import init_device_mesh
    import torch.distributed as dist

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = [block for module in student.modules() if isinstance(module, nn.ModuleList) for block in module
              if any(True for _ in block.parameters())]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(student, mesh=mesh)
    for name in FORWARD_METHODS:
        if callable(getattr(student, name, None)):
            register_fsdp_forward_method(student, name)
    return student


def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every DTensor of ``tensors`` as its full tensor (collective: every rank calls it, same keys, same order)."""
    DTensor = _dtensor()
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}


def shard_like(tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors laid out as ``own``'s DTensors (this rank keeps its slice; no communication)."""
    from torch.distributed.tensor import distribute_tensor

    DTensor = _dtensor()
    out = {}
    for k, v in tensors.items():
        like = own.get(k)
        if isinstance(like, DTensor) and not isinstance(v, DTensor):
            v = distribute_tensor(v.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)
        out[k] = v
    return out


def shard_optimizer_state(state_dict: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A full ``optimizer.state_dict()`` with each per-parameter buffer laid out as its parameter."""
    DTensor = _dtensor()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, buffers in state_dict["state"].items():
        param = params[int(index)] if int(index) < len(params) else None
        if isinstance(param, DTensor):  # exp_avg & co. have the parameter's shape; "step" stays a plain scalar
            own = {name: param for name, value in buffers.items() if tuple(value.shape) == tuple(param.shape)}
            buffers = shard_like(buffers, own)
        state[index] = buffers
    return {**state_dict, "state": state}


def all_done(done: torch.Tensor, model: nn.Module) -> bool:
    """Whether every row is done — on every rank when ``model`` is sharded, so that all ranks take the same
    number of (collective) decoding steps; this rank's rows alone otherwise."""
    finished = done.all()
    if not is_sharded(model):
        return bool(finished)
    import torch.distributed as dist

    flag = finished.to(torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def unshard_for_good(student: nn.Module) -> None:
    """Turn a sharded ``student`` back into a plain module holding its full weights, on every rank (collective).

    After ``fit`` the runner saves, exports and evaluates the student on rank 0 alone, which a sharded
    module cannot (its forwards and state_dict are collective): each FSDP unit gets its own class, hooks
    and plain full parameters back. FSDP2 has no public inverse of ``fully_shard``; this undoes what it
    does to a module (class swap, forward hooks, DTensor parameters)."""
    from torch.distributed.fsdp import FSDPModule

    DTensor = _dtensor()
    for module in student.modules():  # the root stays unsharded after an (eval) forward: its DTensors back first
        if isinstance(module, FSDPModule):
            module.reshard()
    whole: dict[int, nn.Parameter] = {}  # one full parameter per sharded one: tied weights stay tied
    for module in student.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                if id(param) not in whole:
                    whole[id(param)] = nn.Parameter(param.full_tensor().detach(), requires_grad=param.requires_grad)
                module._parameters[name] = whole[id(param)]
        if isinstance(module, FSDPModule):
            for name in FORWARD_METHODS:  # register_fsdp_forward_method's instance attribute
                module.__dict__.pop(name, None)
            module.__class__ = next(c for c in type(module).__bases__ if not issubclass(c, FSDPModule))
            module._forward_pre_hooks.clear()
            module._forward_pre_hooks_with_kwargs.clear()
            module._forward_hooks.clear()
            module._forward_hooks_with_kwargs.clear()
            module._forward_hooks_always_called.clear()
            module._state_dict_pre_hooks.clear()
            module._state_dict_hooks.clear()
            module._load_state_dict_pre_hooks.clear()
            module._load_state_dict_post_hooks.clear()


def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``nn.utils.clip_grad_norm_`` over sharded and plain parameters together (a method's own parameters
    beside a sharded student: torch's version refuses the mix). The norm is the global one, over every rank's
    shard; the gradients are scaled as torch scales them, by min(1, max_norm / (norm + 1e-6))."""
    DTensor = _dtensor()
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if not sharded:
        return nn.utils.clip_grad_norm_(parameters, max_norm)
    plain = [g for g in grads if not isinstance(g, DTensor)]
    squares = nn.utils.get_total_norm(sharded).full_tensor().double() ** 2  # all-reduced over the shards
    if plain:
        squares = squares + nn.utils.get_total_norm(plain).double() ** 2
    total = squares.sqrt()
    coefficient = min(1.0, max_norm / (float(total) + 1e-6))
    for g in grads:
        g.mul_(coefficient)
    return total.float()
