"""An experiment as a graph of runs: who trains before whom, written down once.

``load_experiment`` expands a config into student runs (grid × seeds). A student's
teacher section may itself need runs: a recipe teacher is a run of its own, an
assistant chain is one run per stage, an ensemble has one run per member, a
trajectory reads several kept epochs of one run. ``build_plan`` turns the student
runs into nodes and those needs into edges, so every executor (in-process,
``--workers``, Ray, torchrun) runs them in dependency order, and the store keeps the
edges (``run_inputs``) for the views that need a student's teacher.

Edge kinds: ``teacher`` (a recipe run, optionally at a kept ``epoch``), ``assistant``
(the last stage of a TAKD chain), ``member`` (one teacher of an ensemble) and
``trajectory`` (one kept epoch of a recipe run; the final weights carry the last epoch).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable

from kdlab import registry
from kdlab.config import DataConfig, ExperimentConfig, MethodConfig, StudentConfig, TeacherConfig, TrainConfig
from kdlab.config.entries import pretrained_teacher
from kdlab.runs import RunSpec

TEACHER_EXPERIMENT = "teachers"  # the experiment that holds every teacher and assistant run of a workspace
EDGE_KINDS = ("teacher", "assistant", "member", "trajectory")


@dataclass(frozen=True)
class RunInput:
    """One edge: the run ``run_id`` whose weights (after ``epoch``; None = final) a run reads."""

    run_id: str
    kind: str
    epoch: int | None = None


@dataclass
class RunNode:
    """One run of the plan with the runs it reads."""

    spec: RunSpec
    role: str  # student | teacher | assistant
    experiment: str
    inputs: tuple[RunInput, ...] = ()

    @property
    def run_id(self) -> str:
        return self.spec.run_id


@dataclass
class Plan:
    """The runs of an experiment in dependency order (a run comes after every run it reads)."""

    experiment: str
    nodes: dict[str, RunNode]

    def order(self) -> list[RunNode]:
        return list(self.nodes.values())

    def students(self) -> list[RunNode]:
        return [node for node in self.nodes.values() if node.role == "student"]

    def upstream(self) -> list[RunNode]:
        """The teacher and assistant runs, in dependency order."""
        return [node for node in self.nodes.values() if node.role != "student"]

    def reads(self, run_id: str) -> set[str]:
        """Every run ``run_id`` reads, directly or through the runs it reads."""
        out: set[str] = set()
        stack = [edge.run_id for edge in self.nodes[run_id].inputs]
        while stack:
            current = stack.pop()
            if current not in out:
                out.add(current)
                stack.extend(edge.run_id for edge in self.nodes[current].inputs)
        return out

    def shared_upstream(self) -> list[RunNode]:
        """The teacher and assistant runs that every student reads (in dependency order): what a parallel
        executor trains first, before it splits the students between workers."""
        students = self.students()
        if not students:
            return []
        shared = set.intersection(*(self.reads(node.run_id) for node in students))
        return [node for node in self.upstream() if node.run_id in shared]

    def waves(self) -> list[list[RunNode]]:
        """Nodes grouped by depth: every node of a wave depends only on earlier waves (parallel executors)."""
        depth: dict[str, int] = {}
        for node in self.nodes.values():
            depth[node.run_id] = 1 + max((depth[i.run_id] for i in node.inputs), default=-1)
        out: list[list[RunNode]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
        for node in self.nodes.values():
            out[depth[node.run_id]].append(node)
        return out


# --------------------------------------------------------------------------- teacher and assistant runs


def recipe_run_spec(t: TeacherConfig, data: DataConfig) -> RunSpec | None:
    """A recipe teacher (or assistant-chain base) as a run of its own, or None.

    Trained by ``t.method`` (default ``scratch``; e.g. ``adversarial_training`` for
    a robust teacher). With ``data.labels_per_class`` the teacher trains on the
    labelled samples only (``drop_unlabelled``), unless its method uses unlabelled ones.
    Its identity depends only on what shapes the network — its model, recipe,
    method, seed and the data — so every student of a study shares one teacher run.
    (``epoch``/``trajectory`` pick files of this run; they do not change it.)
    """
    if t is None or t.checkpoint is not None or t.model is None or pretrained_teacher(t):
        return None  # a file, or a pretrained model used as it is: no run of its own
    method = copy.deepcopy(t.method) if t.method is not None else MethodConfig(name="scratch")
    data = copy.deepcopy(data)
    if data.labels_per_class is not None and not data.drop_unlabelled and \
            not getattr(registry.get("method", method.name), "uses_unlabelled", False):
        data.drop_unlabelled = True  # the teacher sees the student's labels only: the labelled samples
    teacher_cfg = ExperimentConfig(
        name="teacher",
        data=data,
        teacher=None,
        student=StudentConfig(model=t.model, options=dict(t.options)),
        method=method,
        train=copy.deepcopy(t.train) if t.train is not None else TrainConfig(),
        seeds=[t.seed],
    )
    return RunSpec(config=teacher_cfg, seed=t.seed, point={})


def assistant_run_spec(t: TeacherConfig, data: DataConfig, method: MethodConfig) -> RunSpec:
    """The last assistant of ``t``'s chain as a run: distilled from the chain before it.

    Mirzadeh et al. (2020) train every stage with the same KD objective: each
    assistant uses the experiment's ``kd`` hyperparameters when the method declares
    it trains through assistants with them (``assistant_hparams``), KD defaults
    otherwise. Recursion through ``teacher`` gives the chain.
    """
    last = t.assistants[-1]
    previous = copy.deepcopy(t)
    previous.assistants = list(t.assistants[:-1])
    shared = getattr(registry.get("method", method.name), "assistant_hparams", ())
    options = {k: v for k, v in method.options.items() if k in shared}
    stage_cfg = ExperimentConfig(
        name="assistant",
        data=copy.deepcopy(data),
        teacher=previous,
        student=StudentConfig(model=last.model, checkpoint=last.checkpoint, options=dict(last.options)),
        method=MethodConfig(name="kd", options=options),
        train=copy.deepcopy(last.train) if last.train is not None else TrainConfig(),
        seeds=[last.seed],
    )
    return RunSpec(config=stage_cfg, seed=last.seed, point={})


def teacher_run_spec(cfg: ExperimentConfig) -> RunSpec | None:
    """The run that produces ``cfg``'s teacher network: the recipe run, or the last assistant's run."""
    t = cfg.teacher
    if t is None:
        return None
    if t.assistants:
        return assistant_run_spec(t, cfg.data, cfg.method)
    return recipe_run_spec(t, cfg.data)


def teacher_inputs(t: TeacherConfig | None, cfg: ExperimentConfig) -> list[tuple[RunInput, RunSpec, str]]:
    """The runs a teacher section reads, as (edge, run spec, role of that run); a file reads none."""
    if t is None or t.checkpoint is not None:
        return []
    if t.members:
        out = []
        for member in t.members:
            for edge, spec, role in teacher_inputs(member, cfg):
                out.append((RunInput(edge.run_id, "member", edge.epoch), spec, role))
        return out
    if t.assistants:
        spec = assistant_run_spec(t, cfg.data, cfg.method)
        return [(RunInput(spec.run_id, "assistant"), spec, "assistant")]
    spec = recipe_run_spec(t, cfg.data)
    if spec is None:
        return []
    if t.trajectory:  # the kept checkpoints in order, then the final weights
        final = t.train.epochs
        epochs = sorted(e for e in t.train.keep_epochs if e < final) + [final]
        return [(RunInput(spec.run_id, "trajectory", e), spec, "teacher") for e in epochs]
    return [(RunInput(spec.run_id, "teacher", t.epoch), spec, "teacher")]


def build_plan(base: ExperimentConfig, specs: Iterable[RunSpec]) -> Plan:
    """The student runs ``specs`` and every run they read, each once, inputs before readers."""
    nodes: dict[str, RunNode] = {}

    def visit(spec: RunSpec, role: str, experiment: str) -> None:
        if spec.run_id in nodes:
            return
        inputs = teacher_inputs(spec.config.teacher, spec.config)
        for _, upstream, upstream_role in inputs:
            visit(upstream, upstream_role, TEACHER_EXPERIMENT)
        edges = tuple(dict.fromkeys(edge for edge, _, _ in inputs))
        nodes[spec.run_id] = RunNode(spec=spec, role=role, experiment=experiment, inputs=edges)

    for spec in specs:
        visit(spec, "student", base.name)
    return Plan(experiment=base.name, nodes=nodes)
