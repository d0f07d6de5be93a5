"""The config rule of ``teacher.device`` / ``teacher.dtype`` (applied by ``kdlab.engine.teacher.place_teacher``).

Apart from ``teacher.py`` so that registering it (the registry loads this module with the built-ins) pulls in
no model building.
"""
from __future__ import annotations

import torch

from kdlab.config.checks import config_rule
from kdlab.config.schema import TeacherConfig


@config_rule
def check_teacher_placement(cfg, errors: list[str]) -> None:
    """``teacher.device``/``teacher.dtype`` rules known before any work: a device this machine has, no fp16 teacher
    on the CPU, agreement with ``train.teacher_dtype``, and placement only on the whole teacher."""
    from kdlab.config.checks import device_problem

    t, train = cfg.teacher, cfg.train
    if not isinstance(t, TeacherConfig):
        return
    for kind, members in (("members", t.members), ("assistants", t.assistants)):
        for i, member in enumerate(members or []):
            for key in ("device", "dtype"):
                if getattr(member, key, None) is not None:
                    errors.append(f"teacher.{kind}[{i}].{key}: placement applies to the whole teacher; set "
                                  f"teacher.{key} instead")
    device = t.device if isinstance(t.device, str) else None
    if device is not None:
        problem = device_problem(device, "fp32", "teacher")
        if problem:
            errors.append(problem)
            return
    if t.dtype == "fp16":
        where = device if device is not None else (train.device if isinstance(train.device, str) else "auto")
        on_cpu = where == "cpu" or (where == "auto" and not torch.cuda.is_available() and not (
            getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()))
        if on_cpu:
            errors.append("teacher.dtype: fp16 on the CPU is not supported (slow or missing kernels); use bf16 or "
                          "fp32, or put the teacher on a GPU (teacher.device: cuda)")
    if t.dtype is not None and train.teacher_dtype == "bf16" and t.dtype != "bf16":
        errors.append(f"train.teacher_dtype: bf16 disagrees with teacher.dtype: {t.dtype}; keep teacher.dtype "
                      "(train.teacher_dtype is its older spelling)")
    mixed = cfg.method.options.get("teacher_mix_alpha", 0) if isinstance(cfg.method.options, dict) else 0
    if device is not None and device != train.device and cfg.method.name == "policy_gradient_kd" and mixed:
        errors.append("teacher.device: policy_gradient_kd's teacher-mixed sampling (teacher_mix_alpha > 0) runs "
                      "the teacher beside the student; leave teacher.device unset or set teacher_mix_alpha: 0")
