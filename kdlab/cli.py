"""The ``kdlab`` command: parse, call, print. Bad input exits with code 2.

    kdlab [--import MODULE_OR_FILE.py ...] COMMAND ...   (the user's plugins, imported first: README "Plugins")
    kdlab run [CONFIG.yaml] [--set key.path=value ...] [--seeds 0,1,2] [--dry-run] [--no-resume]
              [--variant NAME] [--point key.path=value ...]
              [--workers N] [--retry-failed] [--executor local|ray] [--ray-address ADDR]
    torchrun --nproc_per_node N -m kdlab run CONFIG     (data-parallel runs; see README "Multi-GPU")
    kdlab list models|datasets|losses|methods|metrics [PATTERN]
    kdlab compare [RUN_OR_EXPERIMENT ...] [--metrics a,b] [--markdown] [--baseline LABEL] [--plot PNG]
    kdlab compare EXPERIMENT --view VIEW [--metrics test/acc] [--markdown]     (--capacity: --view capacity-gap)
    kdlab show RUN  ·  kdlab runs [EXPERIMENT]  ·  kdlab doctor [--fix]  ·  kdlab analyze deviations RUN [--out DIR]
    kdlab eval RUN [--attack pgd] [--eps 8/255] [--steps 20] [--norm linf] [--restarts N] [--subset N]
               [--faithfulness] [--no-sanity-checks]
    kdlab tune CONFIG [--trials N] [--seed S] [--metric val/acc] [--direction max|min] [--set k.path=v ...] [--seeds 0,1]
    kdlab plot VIEW EXPERIMENT [--out DIR] [--metric test/acc] [--method kd]
               (VIEW: a registered study view: capacity-gap, comparison, deviations, gkd-grid, qat, robustness)
    kdlab report [EXPERIMENT ...] [--out report.html] [--baseline LABEL] [--metrics a,b] [--no-eval]
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import sys
import time
from pathlib import Path

from kdlab.errors import KdlabError
from kdlab.plugins import add_import_flag, load_flag

DEFAULT_WORKSPACE = "kdlab-workspace"
KIND_PLURALS = {"models": "model", "datasets": "dataset", "losses": "loss", "methods": "method",
                "metrics": "metric", "attacks": "attack"}


def _workspace(args) -> Path:
    return Path(args.workspace or os.environ.get("KDLAB_WORKSPACE") or DEFAULT_WORKSPACE)


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise KdlabError(f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1,2") from None


def cmd_run(args) -> int:
    from kdlab.engine import distributed

    if not distributed.launched_by_torchrun():
        return _run_study(args)
    if (args.workers or 1) > 1 or args.executor != "local":
        raise KdlabError("--workers/--executor do not combine with torchrun: under torchrun the runs of a study "
                         "go one after another, each data-parallel over every process; drop the flag")
    if args.dry_run:
        raise KdlabError("--dry-run needs no torchrun; run it as plain `kdlab run --dry-run`")
    ctx = distributed.init_from_environment()
    finished = False
    try:
        # Rank 0 creates the workspace and its database before the others open them.
        if not ctx.is_main:
            with contextlib.redirect_stdout(io.StringIO()):  # rank 0 alone prints
                code = _run_study(args, before_open=lambda: distributed.barrier(ctx))
        else:
            code = _run_study(args, after_open=lambda: distributed.barrier(ctx))
        finished = True
        return code
    finally:
        distributed.shutdown(synchronize=finished)


def _run_study(args, before_open=None, after_open=None) -> int:
    from kdlab.runs import load_experiment
    from kdlab.study.compare import compare_table, render_table
    from kdlab.study.runner import Runner

    base, specs = load_experiment(args.config, args.set, _seeds(args.seeds) if args.seeds else None,
                                  variant=args.variant, points=args.point)
    if before_open is not None:
        before_open()
    runner = Runner(_workspace(args), resume=args.resume, progress=not args.quiet, retry_failed=args.retry_failed)
    if after_open is not None:
        after_open()
    if args.dry_run:
        print(f"experiment {base.name}: {len(specs)} runs (grid × seeds); nothing is trained in a dry run")
        for line in runner.dry_run(specs):
            print(line)
        return 0
    print(f"experiment {base.name}: {len(specs)} runs (grid × seeds), workspace {runner.workspace}")
    if args.executor == "local" and (args.workers or 1) == 1 and args.ray_address is None:
        summary = runner.run(base, specs)  # in this process, with this runner
    else:
        from kdlab.study.executors import make_executor

        executor = make_executor(args.executor, workers=args.workers or 1, ray_address=args.ray_address,
                                 ray_workers=args.workers)
        summary = executor.run(base, specs, workspace=runner.workspace, resume=args.resume,
                               retry_failed=args.retry_failed, progress=not args.quiet, out=print)
    records = [r for spec in specs for r in runner.store.find(spec.run_id)]
    print()
    print(render_table(compare_table(records)))
    rule = {"last": "the last epoch", "best_val": "the epoch with the best validation accuracy"}[base.train.selection]
    print(f"Test metrics are taken at {rule} (train.selection: {base.train.selection}); "
          f"mean ± 95% CI (Student t) over seeds {base.seeds}.")
    print(f"Run folders: {runner.workspace / 'runs'}   results database: {runner.workspace / 'kdlab.db'}")
    held = f", {len(summary.held)} held by another live process" if summary.held else ""
    print(f"ran {len(summary.ran)}, skipped {len(summary.skipped)} already finished{held}, failed {len(summary.failed)}")
    for run_id, message in summary.failed:
        print(f"failed {run_id}: {message}")
    return 1 if summary.failed else 0


def _read_store(args):
    """The workspace's store opened read-only: for commands that only read (runs, show, compare, report).

    Nothing is created (a missing workspace is a one-line error) and a read-only workspace can be read.
    """
    from kdlab.store import Store

    return Store(_workspace(args), readonly=True)


def cmd_list(args) -> int:
    import difflib

    from kdlab import registry

    kind = KIND_PLURALS.get(args.kind)
    if kind is None:
        close = difflib.get_close_matches(args.kind, list(KIND_PLURALS), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise KdlabError(f"kdlab list {args.kind}: unknown kind; {hint}choose one of {', '.join(KIND_PLURALS)}")
    names = registry.names(kind, args.pattern)
    if not names:
        every = registry.names(kind)
        bare = args.pattern.strip("*?[]") or args.pattern
        close = difflib.get_close_matches(bare, every, n=5, cutoff=0.5)
        close += [name for name in every if bare.lower() in name.lower() and name not in close][: 5 - len(close)]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise KdlabError(f"kdlab list {args.kind}: no {kind} matches {args.pattern!r}; {hint}"
                         f"`kdlab list {args.kind}` shows all {len(every)}")
    width = max((len(n) for n in names), default=0)
    for name in names:
        print(f"{name:<{width}}  {registry.summary(kind, name)}")
    return 0


class _ViewNames:
    """argparse ``choices`` of the registered study views, read from the registry only when a command
    needs them (parsing ``plot``/``compare``, or --help), so building the parser imports nothing."""

    def _names(self) -> list[str]:
        from kdlab.study.views.base import view_names

        return view_names()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.replace("_", "-") in self._names()

    def __iter__(self):
        return iter(self._names())


def _options(args, **extra):
    from kdlab.study.views.base import DEFAULT_METRICS, Options

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics else DEFAULT_METRICS
    return Options(metric=metrics[0], metrics=metrics, **extra)


def _print_view(view, result, fmt: str) -> None:
    from kdlab.report.table import render

    tables = view.tables(result)
    if tables:
        print(render(tables, fmt=fmt, title=view.title(result)), end="")


def cmd_compare(args) -> int:
    """A registered view's table (default: the comparison of configurations) of the named runs."""
    from kdlab.study.views.base import get_view, token_selection

    name = "capacity-gap" if args.capacity else args.view
    if args.capacity and args.view not in ("comparison", "capacity-gap"):
        raise KdlabError(f"--capacity is --view capacity-gap; it does not combine with --view {args.view}")
    if name != "comparison" and (args.baseline or args.plot):
        raise KdlabError(f"--view {name} does not combine with --baseline or --plot; they belong to the comparison "
                         f"view (`kdlab plot {name} EXPERIMENT` draws this view's figures)")
    view = get_view(name, key="--view")
    selection = token_selection(_read_store(args), args.runs)
    result = view.build(selection, _options(args, baseline=args.baseline))
    _print_view(view, result, "markdown" if args.markdown else "text")
    if args.plot:
        from kdlab.study.views.comparison import draw_bars

        print(f"plot: {draw_bars(result, Path(args.plot))}")
    return 0


def cmd_plot(args) -> int:
    """A registered view's table (Markdown) and its figures for one experiment."""
    from kdlab.study.capacity import safe_name
    from kdlab.study.views.base import experiment_selection, get_view

    workspace = _workspace(args)
    view = get_view(args.what)
    selection = experiment_selection(_read_store(args), args.experiment)
    result = view.build(selection, _options(args, method=args.method))
    out = Path(args.out) if args.out else workspace / "plots" / safe_name(args.experiment)
    _print_view(view, result, "markdown")
    for figure in view.figures(result, out):
        for path in figure.paths:
            print(path)
    return 0


def cmd_show(args) -> int:
    import yaml

    store = _read_store(args)
    matches = store.find(args.run, skip_damaged=False)  # asked for by name: a damaged row says why
    if len(matches) != 1:
        ids = ", ".join(r.run_id for r in matches[:5])
        raise KdlabError(f"{args.run!r} matches {len(matches)} runs ({ids}); give a full run id")
    record = matches[0]
    print(f"run {record.run_id}  experiment {record.experiment}  role {record.role}  status {record.status}")
    print(f"label: {record.label}")
    if record.started_at is not None:
        print(f"time: {_duration(record, time.time())}")
    print(f"folder: {record.run_dir}")
    if record.error:
        print(f"error: {record.error}")
    print("config:")
    print("  " + yaml.safe_dump(record.config, sort_keys=False).rstrip().replace("\n", "\n  "))
    print("final metrics:")
    for key in sorted(record.final):
        print(f"  {key}: {record.final[key]:.6g}")
    epochs = store.epoch_metrics(record.run_id)
    if epochs:
        last = max(epochs)
        print(f"epochs logged: {len(epochs)} (last {last}); last epoch: "
              + json.dumps({k: round(v, 6) for k, v in sorted(epochs[last].items())}))
    if getattr(args, "samples", 0):  # a language-model run's generations on held-out prompts
        from kdlab.study.llm_outputs import show_samples
        show_samples(Path(record.run_dir), args.samples)
    return 0


def _format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours < 48 else f"{hours // 24}d{hours % 24:02d}h"


def _duration(record, now: float) -> str:
    seconds = record.wall_seconds(now)
    return "-" if seconds is None else _format_seconds(seconds) + ("+" if record.status == "running" else "")


def cmd_runs(args) -> int:
    store = _read_store(args)  # status is read with its liveness check: nothing to write
    records = store.runs(experiment=args.experiment)
    if not records:
        known = store.experiments()
        if args.experiment is not None and args.experiment not in known:
            import difflib

            close = difflib.get_close_matches(args.experiment, known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise KdlabError(f"no experiment {args.experiment!r} in {store.database_path}; {hint}"
                             "`kdlab runs` lists every run")
        print(f"no runs in {store.workspace} yet; start one with `kdlab run CONFIG`")
        return 0
    now = time.time()
    id_width = max(32, *(len(r.run_id) for r in records))
    experiment_width = max(16, *(len(r.experiment) for r in records))
    print(f"{'RUN':<{id_width}} {'STATUS':<11} {'EXPERIMENT':<{experiment_width}} {'TIME':>9}  "
          f"{'TEST/ACC':<8} LABEL")
    for record in records:
        acc = record.final.get("test/acc")
        shown = f"{acc:.4f}" if acc is not None else "-"
        print(f"{record.run_id:<{id_width}} {record.status:<11} {record.experiment:<{experiment_width}} "
              f"{_duration(record, now):>9}  {shown:<8} {record.label}")
    return 0


def cmd_doctor(args) -> int:
    """Check the workspace's database and run folders; exit 0 when clean, 1 when something is wrong."""
    from kdlab.store.doctor import check_workspace

    workspace = _workspace(args).expanduser().absolute()
    findings = check_workspace(workspace, fix=args.fix)
    print("\n".join(findings.lines(workspace, fixing=args.fix)))
    return 1 if findings.problems else 0


_EVAL_FLAGS = (("robust.attacks[0].eps", "--eps"), ("robust.eps", "--eps"), ("robust.attacks[0].steps", "--steps"),
               ("robust.attacks[0].step_size", "--step-size"), ("robust.attacks[0].restarts", "--restarts"),
               ("robust.attacks[0]", "--attack"), ("robust.subset", "--subset"),
               ("robust.faithfulness_steps", "--faithfulness-steps"), ("robust.delta", "--delta"))


def cmd_eval(args) -> int:
    """Attack a finished run's model on its test split; print, and keep the numbers with their settings."""
    import datetime

    from kdlab.config import AttackConfig, RobustConfig
    from kdlab.engine.build import load_model_file
    from kdlab.engine.optim import resolve_device
    from kdlab.robust.section import check_robust
    from kdlab.store import Store, append_jsonl
    from kdlab.study.deviations import run_config
    from kdlab.study.robust_eval import EVALS_FILE, format_report, robust_report
    from kdlab.study.runner import MODEL_FILE, Runner

    eps = args.eps.strip()  # kept as written ("8/255"), parsed and range-checked by check_robust below
    attack = AttackConfig(name=args.attack, eps=eps, norm=args.norm, steps=args.steps, step_size=args.step_size,
                          restarts=args.restarts, loss=args.loss, seed=args.seed)
    robust = RobustConfig(eps=eps, attacks=[attack], subset=args.subset if args.subset > 0 else None,
                          subset_seed=args.subset_seed, faithfulness=args.faithfulness,
                          faithfulness_steps=args.faithfulness_steps, delta=args.delta,
                          sanity_checks=args.sanity_checks)
    problems: list[str] = []  # the flags' own bounds were checked (kdlab.cli_flags); these tie them together
    check_robust(robust, problems)
    if problems:
        first = problems[0]
        for key, flag in _EVAL_FLAGS:
            if first.startswith(key):
                first = flag + first[len(key):]
                break
        for setting in ("steps", "restarts", "step_size", "seed"):  # "--attack: steps=0 ..." names its own flag
            if first.startswith(f"--attack: {setting}="):
                first = f"--{setting.replace('_', '-')}: " + first[len("--attack: "):]
        raise KdlabError(first)

    workspace = _workspace(args)
    store = Store(workspace)
    matches = store.find(args.run)
    if len(matches) != 1:
        ids = ", ".join(r.run_id for r in matches[:5])
        raise KdlabError(f"{args.run!r} matches {len(matches)} runs ({ids}); give one run id")
    record = matches[0]
    if record.status != "finished":
        raise KdlabError(f"run {record.run_id} is {record.status}, not finished; finish it with `kdlab run` first")
    cfg = run_config(record)
    runner = Runner(workspace, out=lambda text: None, train_teachers=False)
    splits = runner.splits(cfg)
    model_file = record.run_dir / MODEL_FILE
    if not model_file.is_file():
        raise KdlabError(f"run {record.run_id}: {model_file} is missing; re-run it with `kdlab run --no-resume`")
    student, _ = load_model_file(model_file, splits, key=f"run {record.run_id}")
    teacher = runner.teacher(cfg, splits) if (args.faithfulness and cfg.teacher is not None) else None
    report = robust_report(student, teacher, splits, robust, device=resolve_device(cfg.train.device))
    report["run_id"] = record.run_id
    report["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    label = next(iter(report["attacks"]))
    append_jsonl(record.run_dir / EVALS_FILE, report)  # written before printing: a closed pipe loses nothing
    keep = {f"eval/{key.removeprefix('robust/')}": value for key, value in report["metrics"].items()
            if key.startswith((f"robust/{label}/", "robust/clean/", "robust/faith/"))}
    store.add_final(record.run_id, keep)
    print(f"run {record.run_id}  [{record.label}]  experiment {record.experiment}")
    for line in format_report(report):
        print(line)
    print(f"written: {record.run_dir / EVALS_FILE} (settings and numbers); final metrics eval/{label}/... "
          "in the store (`kdlab compare --metrics`)")
    return 0


def cmd_analyze(args) -> int:
    from kdlab.study.deviations import analyze_deviations, format_report

    result = analyze_deviations(_read_store(args), args.run, out_dir=args.out)
    for line in format_report(result):
        print(line)
    return 0


def cmd_tune(args) -> int:
    """Run or resume a config's Optuna study (its tune: section) up to --trials finished trials."""
    from kdlab.study.tune import format_params, import_optuna, render_trials, tune

    import_optuna()  # exit 2 with the install hint before reading anything
    try:
        result = tune(args.config, workspace=_workspace(args), trials=args.trials, seed=args.seed,
                      metric=args.metric, direction=args.direction, overrides=args.set,
                      seeds=_seeds(args.seeds) if args.seeds else None, progress=not args.quiet)
    except KeyboardInterrupt:
        print("kdlab: interrupted; the stopped trial is retried and its run resumes on the next `kdlab tune`",
              file=sys.stderr)
        return 130
    print()
    print(f"study {result.study} ({result.direction} {result.metric}, mean over seeds; on the validation split, "
          f"never test): {len(result.rows)} trials in {result.database}")
    print(render_trials(result))
    if result.best is None:
        print("no completed trial yet")
        return 1 if result.rows else 0
    print(f"best: trial {result.best.number}  {result.metric} {result.best.value:.4f}  "
          f"{format_params(result.best.params)}")
    print(f"best config: {result.best_config}  (`kdlab run {result.best_config}` trains it and reports test metrics)")
    return 0


def cmd_report(args) -> int:
    """One self-contained HTML report (and its Markdown twin) of the named experiments."""
    from kdlab.study.report import write_report

    options = _options(args)
    result = write_report(_read_store(args), args.experiments, args.out, baseline=args.baseline,
                          metrics=options.metrics, evaluate=args.eval)
    print(f"report: {result.html}")
    print(f"markdown: {result.markdown}")
    print(f"figures: {len(result.figures)} files in {result.html.with_name(result.html.stem + '_files')}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdlab", description="Knowledge distillation toolkit and laboratory.")
    parser.add_argument("--workspace", help=f"results folder (default $KDLAB_WORKSPACE or ./{DEFAULT_WORKSPACE})")
    add_import_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment (the quickstart when no config is given)")
    run.add_argument("config", nargs="?", help="YAML experiment config; omitted: the built-in quickstart")
    run.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config key")
    run.add_argument("--seeds", help="comma-separated seeds, replacing the config's seeds")
    run.add_argument("--variant", metavar="NAME", help="run one document of a multi-document study: the later "
                     "document with variant: NAME, or base for the first")
    run.add_argument("--point", action="append", default=[], metavar="KEY=VALUE",
                     help="run only the grid points with this grid value (or grid name); repeatable")
    run.add_argument("--dry-run", action="store_true", help="print data, parameter counts and tap shapes; train nothing")
    run.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                     help="continue unfinished runs from their last checkpoint (default) or restart them")
    run.add_argument("--quiet", action="store_true", help="no progress line")
    run.add_argument("--retry-failed", action="store_true", help="run again the runs that failed before")
    run.add_argument("--workers", type=int, default=None, metavar="N",
                     help="run the runs in N parallel processes (default 1: in this process); with "
                          "--executor ray, N Ray tasks (default: one per cluster CPU, at most one per run)")
    run.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="local: this machine's processes (default); ray: tasks on a Ray cluster "
                          "(pip install 'kdlab[ray]'), runs still claimed in the store")
    run.add_argument("--ray-address", metavar="ADDR",
                     help="Ray cluster to join (default $RAY_ADDRESS, else a local Ray instance is started)")
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="list registered names with their one-line summaries")
    lst.add_argument("kind", help=", ".join(KIND_PLURALS))
    lst.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'resnet*'")
    lst.set_defaults(func=cmd_list)

    cmp_ = sub.add_parser("compare", help="a study view's table of runs (default: runs grouped by configuration, "
                                          "mean ± 95%% CI over seeds)")
    cmp_.add_argument("runs", nargs="*", help="run ids, run-id prefixes or experiment names (default: all)")
    cmp_.add_argument("--metrics", help="comma-separated metric keys (default test/acc,test/nll,test/ece,test/agreement)")
    cmp_.add_argument("--markdown", action="store_true", help="print a Markdown table")
    cmp_.add_argument("--baseline", help="row label to compare every row against (paired by seed, first metric)")
    cmp_.add_argument("--plot", metavar="PNG", help="also draw the first metric per row with its CI as a bar chart")
    cmp_.add_argument("--view", default="comparison", choices=_ViewNames(), metavar="VIEW",
                      help="registered study view whose table to print: %(choices)s (default comparison; the "
                           "others take one experiment name and the first of --metrics)")
    cmp_.add_argument("--capacity", action="store_true",
                      help="same as --view capacity-gap: teacher × student table of one experiment: student "
                           "accuracy, gain over scratch, the teacher's own accuracy")
    cmp_.set_defaults(func=cmd_compare)

    show = sub.add_parser("show", help="one run's resolved config and metrics")
    show.add_argument("run", help="run id or unique prefix")
    show.set_defaults(func=cmd_show)
    from kdlab.study.llm_outputs import add_llm_commands  # show --samples N, export RUN DIR
    add_llm_commands(sub, show, _read_store)

    runs = sub.add_parser("runs", help="list runs with their status and wall time")
    runs.add_argument("experiment", nargs="?", help="only this experiment")
    runs.set_defaults(func=cmd_runs)

    doctor = sub.add_parser("doctor", help="check a workspace: database integrity, every run folder against its "
                                           "row, dead 'running' runs, leftover temporary files (exit 1 if any)")
    doctor.add_argument("--fix", action="store_true", help="mark dead 'running' runs interrupted and remove "
                                                           "temporary files no live process can own; nothing else")
    doctor.set_defaults(func=cmd_doctor)

    ev = sub.add_parser("eval", help="attack a finished run's model on its test split (robust accuracy, "
                                     "faithfulness to its teacher)")
    ev.add_argument("run", help="run id or unique prefix of a finished run (student or teacher)")
    ev.add_argument("--workspace", default=argparse.SUPPRESS,
                    help="results folder (as the global --workspace, which it overrides)")
    ev.add_argument("--attack", choices=["fgsm", "pgd", "apgd", "autoattack"], default="pgd",
                    help="attack (default pgd); autoattack: the standard AutoAttack, per-component accuracies "
                         "(needs the autoattack extra)")
    ev.add_argument("--eps", default="8/255", help="radius in [0, 1] input units, as a fraction or a decimal: "
                                                    "8/255 or 0.031 (default 8/255)")
    ev.add_argument("--norm", choices=["linf", "l2"], default="linf", help="threat model (default linf)")
    ev.add_argument("--steps", type=int, help="iterations (default: pgd 10, apgd 100; fgsm, autoattack take none)")
    ev.add_argument("--step-size", type=float, help="pgd step (default 2.5·eps/steps)")
    ev.add_argument("--restarts", type=int, default=1, help="random restarts, the strongest kept (default 1)")
    ev.add_argument("--loss", choices=["ce", "cw"], default="ce", help="attack loss (default ce)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the random starts (default 0)")
    ev.add_argument("--subset", type=int, default=500, help="test samples attacked, a fixed random subset; "
                                                            "0 = all (default 500)")
    ev.add_argument("--subset-seed", type=int, default=0, help="which subset (default 0)")
    ev.add_argument("--faithfulness", action="store_true", help="also agreement, adversarial disagreement and "
                                                                "relative calibration against the run's teacher")
    ev.add_argument("--faithfulness-steps", type=int, default=20, help="PGD steps of the faithfulness attacks")
    ev.add_argument("--delta", type=float, default=0.1, help="relative-calibration tolerance (default 0.1)")
    ev.add_argument("--sanity-checks", action=argparse.BooleanOptionalAction, default=True,
                    help="gradient-masking checks (more steps, FGSM, eps curve, large eps, transfer); default on")
    ev.set_defaults(func=cmd_eval)

    analyze = sub.add_parser("analyze", help="analyses of a finished run (deviations: does the student "
                                             "exaggerate its teacher's confidence?)")
    analyze.add_argument("what", choices=["deviations"], help="which analysis")
    analyze.add_argument("run", help="run id or unique prefix of a finished student run with a teacher")
    analyze.add_argument("--out", help="folder for deviations.json and deviations.png (default: the run folder)")
    analyze.set_defaults(func=cmd_analyze)

    plot = sub.add_parser("plot", help="a study view's table (Markdown) and figures for one experiment, e.g. "
                                       "capacity-gap, gkd-grid, qat (see `kdlab plot --help`)")
    plot.add_argument("what", choices=_ViewNames(), metavar="VIEW", help="registered study view: %(choices)s")
    plot.add_argument("experiment", help="experiment name")
    plot.add_argument("--out", help="folder for the PNG and SVG files (default: <workspace>/plots/<experiment>)")
    plot.add_argument("--metric", "--metrics", dest="metrics", metavar="METRIC",
                      help="final metric of the view (default test/acc; the comparison view takes a list)")
    plot.add_argument("--method", help="capacity-gap: method block to plot (default kd when present, else the first)")
    plot.set_defaults(func=cmd_plot)

    rep = sub.add_parser("report", help="one self-contained HTML report (plus Markdown and PNG/SVG figures) of "
                                        "experiments: config diff, results with CIs, curves, reliability, study plots")
    rep.add_argument("experiments", nargs="*", help="experiment names (default: every experiment with student runs)")
    rep.add_argument("--out", default="report.html", help="HTML file (default report.html); report.md and the "
                                                          "report_files/ folder go beside it")
    rep.add_argument("--baseline", help="configuration label for the paired comparison (default: the scratch "
                                        "configuration, else the first)")
    rep.add_argument("--metrics", help="comma-separated metric keys (default test/acc,test/nll,test/ece,test/agreement)")
    rep.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                     help="evaluate the saved models for reliability diagrams and the deviation scatter (default on)")
    rep.set_defaults(func=cmd_report)

    tn = sub.add_parser("tune", help="hyperparameter search over a config's tune: space with Optuna "
                                     "(pip install 'kdlab[tune]'); resumable, the study kept in the results database")
    tn.add_argument("config", help="YAML experiment config with a tune: section (metric, direction, space)")
    tn.add_argument("--trials", type=int, help="total number of finished trials of the study (re-running continues "
                                               "to this total); default tune.trials")
    tn.add_argument("--seed", type=int, help="seed of the TPE sampler (default tune.seed, else 0)")
    tn.add_argument("--metric", help="final metric to optimise, on validation (default tune.metric, else val/acc)")
    tn.add_argument("--direction", choices=["maximize", "minimize"],
                    help="default tune.direction, else by metric (acc: maximize; nll, ece, loss: minimize)")
    tn.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config key")
    tn.add_argument("--seeds", help="comma-separated run seeds of every trial (objective: their mean)")
    tn.add_argument("--quiet", action="store_true", help="no progress line")
    tn.set_defaults(func=cmd_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from kdlab.cli_flags import check_flags  # the numeric flags, bounded like config keys
        check_flags(args)
        load_flag(args.imports)  # before the command, so its registrations serve validation and workers
        return args.func(args)
    except KdlabError as exc:
        for line in str(exc).splitlines():
            print(f"kdlab: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdlab: interrupted; finished runs are kept and `kdlab run` resumes the rest", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`kdlab ... | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (MemoryError, ImportError, OSError) as exc:
        if not _out_of_memory(exc):
            raise
        # The message is built from constants: formatting the error could itself need memory.
        print("kdlab: error: out of memory (a memory limit such as `ulimit -v`, or the machine's RAM); raise the "
              "limit, or lower train.batch_size, the model size or --workers", file=sys.stderr)
        return 2


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means running out of memory (a failed allocation, or a library that could not be mapped)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return ("failed to map segment" in text or "Cannot allocate memory" in text
            or getattr(exc, "errno", None) == errno.ENOMEM)


if __name__ == "__main__":
    sys.exit(main())
