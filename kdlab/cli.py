"""The ``kdlab`` command: parse, call, print. Bad input exits with code 2.

    kdlab run [CONFIG.yaml] [--set key.path=value ...] [--seeds 0,1,2] [--dry-run] [--no-resume]
              [--variant NAME] [--point key.path=value ...]
              [--workers N] [--retry-failed] [--executor local|ray] [--ray-address ADDR]
    torchrun --nproc_per_node N -m kdlab run CONFIG     (data-parallel runs; see README "Multi-GPU")
    kdlab list models|datasets|losses|methods|metrics [PATTERN]
    kdlab compare [RUN_OR_EXPERIMENT ...] [--metrics a,b] [--markdown]
    kdlab compare EXPERIMENT --capacity [--metrics test/acc] [--markdown]
    kdlab show RUN
    kdlab runs [EXPERIMENT]
    kdlab eval RUN [--attack pgd] [--eps 8/255] [--steps 20] [--norm linf] [--restarts N] [--subset N]
               [--faithfulness] [--no-sanity-checks]
    kdlab analyze deviations RUN [--out DIR]
    kdlab tune CONFIG [--trials N] [--seed S] [--metric val/acc] [--direction maximize|minimize]
               [--set key.path=value ...] [--seeds 0,1]
    kdlab plot capacity-gap EXPERIMENT [--out DIR] [--metric test/acc] [--method kd]
    kdlab plot gkd-grid EXPERIMENT [--out DIR] [--metric test/acc]
    kdlab plot qat EXPERIMENT [--out DIR] [--metric test/acc]
    kdlab report [EXPERIMENT ...] [--out report.html] [--baseline LABEL] [--metrics a,b] [--no-eval]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path

from kdlab.errors import KdlabError

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
    from kdlab.config import load_experiment
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
    if args.workers is not None and args.workers < 1:
        raise KdlabError(f"--workers {args.workers}: expected a whole number ≥ 1, e.g. --workers 2")
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
    print(f"ran {len(summary.ran)}, skipped {len(summary.skipped)} already finished, failed {len(summary.failed)}")
    for run_id, message in summary.failed:
        print(f"failed {run_id}: {message}")
    return 1 if summary.failed else 0


def cmd_list(args) -> int:
    from kdlab import registry

    kind = KIND_PLURALS.get(args.kind)
    if kind is None:
        raise KdlabError(f"kdlab list {args.kind}: unknown kind; choose one of {', '.join(KIND_PLURALS)}")
    names = registry.names(kind, args.pattern)
    width = max((len(n) for n in names), default=0)
    for name in names:
        print(f"{name:<{width}}  {registry.summary(kind, name)}")
    return 0


def _records(store, tokens: list[str]):
    if not tokens:
        return store.runs(role="student")
    out, seen = [], set()
    for token in tokens:
        found = store.find(token)
        if not found:
            raise KdlabError(f"{token!r} is neither a run id nor an experiment in {store.workspace}; "
                             "see `kdlab runs`")
        for record in found:
            if record.run_id not in seen:
                seen.add(record.run_id)
                out.append(record)
    return out


def cmd_compare(args) -> int:
    from kdlab.store import Store
    from kdlab.study.compare import DEFAULT_METRICS, compare_table, render_table

    store = Store(_workspace(args))
    metrics = tuple(m.strip() for m in args.metrics.split(",")) if args.metrics else DEFAULT_METRICS
    if args.capacity:
        return _compare_capacity(store, args)
    table = compare_table(_records(store, args.runs), metrics=metrics, baseline=args.baseline)
    print(render_table(table, fmt="markdown" if args.markdown else "text"))
    if args.plot:
        from kdlab.report.plots import comparison_bars

        metric = metrics[0]
        rows = [row for row in table.rows if row.summaries.get(metric) is not None]
        if not rows:
            raise KdlabError(f"--plot: no finished run has metric {metric!r}; choose one with --metrics")
        path = comparison_bars([row.label for row in rows], [row.summaries[metric].mean for row in rows],
                               [row.summaries[metric].half_width for row in rows], args.plot, metric=metric,
                               baseline=args.baseline)
        print(f"plot: {path}")
    return 0


def _compare_capacity(store, args) -> int:
    from kdlab.study.capacity import capacity_table, render_capacity

    if len(args.runs) != 1:
        raise KdlabError(f"--capacity takes exactly one experiment name, got {len(args.runs)}; "
                         "e.g. kdlab compare my-study --capacity")
    if args.baseline or args.plot:
        raise KdlabError("--capacity does not combine with --baseline or --plot; the gain is always over scratch, "
                         "and `kdlab plot capacity-gap EXPERIMENT` draws its figures")
    metric = args.metrics.split(",")[0].strip() if args.metrics else "test/acc"
    table = capacity_table(store, args.runs[0], metric=metric)
    print(render_capacity(table, fmt="markdown" if args.markdown else "text"), end="")
    return 0


def cmd_plot(args) -> int:
    from kdlab.store import Store
    from kdlab.study.capacity import capacity_table, plot_capacity, safe_name

    workspace = _workspace(args)
    out = Path(args.out) if args.out else workspace / "plots" / safe_name(args.experiment)
    tabled = {"qat": ("kdlab.study.qat_table", "qat_table", "render_qat_table", "plot_qat_table"),
              "gkd-grid": ("kdlab.study.gkd_grid", "gkd_grid", "render_gkd_grid", "plot_gkd_grid")}
    if args.what in tabled:  # a study table printed as Markdown, then its figures
        import importlib

        module_name, build, render, draw = tabled[args.what]
        module = importlib.import_module(module_name)
        result = getattr(module, build)(Store(workspace), args.experiment, metric=args.metric)
        print(getattr(module, render)(result, fmt="markdown"), end="")
        for path in getattr(module, draw)(result, out):
            print(path)
        return 0
    table = capacity_table(Store(workspace), args.experiment, metric=args.metric)
    for path in plot_capacity(table, out, method=args.method):
        print(path)
    return 0


def cmd_show(args) -> int:
    import yaml

    from kdlab.store import Store

    store = Store(_workspace(args))
    matches = store.find(args.run)
    if len(matches) != 1:
        ids = ", ".join(r.run_id for r in matches[:5])
        raise KdlabError(f"{args.run!r} matches {len(matches)} runs ({ids}); give a full run id")
    record = matches[0]
    print(f"run {record.run_id}  experiment {record.experiment}  role {record.role}  status {record.status}")
    print(f"label: {record.label}")
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
    return 0


def cmd_runs(args) -> int:
    from kdlab.store import Store

    store = Store(_workspace(args))
    store.mark_dead_runs_interrupted()
    for record in store.runs(experiment=args.experiment):
        acc = record.final.get("test/acc")
        shown = f"{acc:.4f}" if acc is not None else "-"
        print(f"{record.run_id:<32} {record.status:<11} {record.experiment:<16} acc {shown:<7} {record.label}")
    return 0


_EVAL_FLAGS = (("robust.attacks[0].eps", "--eps"), ("robust.eps", "--eps"), ("robust.attacks[0].steps", "--steps"),
               ("robust.attacks[0].step_size", "--step-size"), ("robust.attacks[0].restarts", "--restarts"),
               ("robust.attacks[0]", "--attack"), ("robust.subset", "--subset"),
               ("robust.faithfulness_steps", "--faithfulness-steps"), ("robust.delta", "--delta"))


def cmd_eval(args) -> int:
    """Attack a finished run's model on its test split; print, and keep the numbers with their settings."""
    import datetime

    from kdlab.config import AttackConfig, RobustConfig, _check_robust
    from kdlab.engine.build import load_model_file
    from kdlab.engine.optim import resolve_device
    from kdlab.store import Store, append_jsonl
    from kdlab.study.deviations import run_config
    from kdlab.study.robust_eval import EVALS_FILE, format_report, robust_report
    from kdlab.study.runner import MODEL_FILE, Runner

    eps = args.eps.strip()  # kept as written ("8/255"), parsed and range-checked by _check_robust below
    attack = AttackConfig(name=args.attack, eps=eps, norm=args.norm, steps=args.steps, step_size=args.step_size,
                          restarts=args.restarts, loss=args.loss, seed=args.seed)
    robust = RobustConfig(eps=eps, attacks=[attack], subset=args.subset if args.subset > 0 else None,
                          subset_seed=args.subset_seed, faithfulness=args.faithfulness,
                          faithfulness_steps=args.faithfulness_steps, delta=args.delta,
                          sanity_checks=args.sanity_checks)
    problems: list[str] = []
    if args.subset < 0:
        problems.append(f"--subset {args.subset}: give a number of test samples >= 1, or 0 for the whole split")
    _check_robust(robust, problems)
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
    from kdlab.store import Store
    from kdlab.study.deviations import analyze_deviations, format_report

    result = analyze_deviations(Store(_workspace(args)), args.run, out_dir=args.out)
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
    from kdlab.store import Store
    from kdlab.study.compare import DEFAULT_METRICS
    from kdlab.study.report import write_report

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics else DEFAULT_METRICS
    result = write_report(Store(_workspace(args)), args.experiments, args.out, baseline=args.baseline,
                          metrics=metrics, evaluate=args.eval)
    print(f"report: {result.html}")
    print(f"markdown: {result.markdown}")
    print(f"figures: {len(result.figures)} files in {result.html.with_name(result.html.stem + '_files')}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdlab", description="Knowledge distillation toolkit and laboratory.")
    parser.add_argument("--workspace", help=f"results folder (default $KDLAB_WORKSPACE or ./{DEFAULT_WORKSPACE})")
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

    cmp_ = sub.add_parser("compare", help="table of runs grouped by configuration, mean ± 95%% CI over seeds")
    cmp_.add_argument("runs", nargs="*", help="run ids, run-id prefixes or experiment names (default: all)")
    cmp_.add_argument("--metrics", help="comma-separated metric keys (default test/acc,test/nll,test/ece,test/agreement)")
    cmp_.add_argument("--markdown", action="store_true", help="print a Markdown table")
    cmp_.add_argument("--baseline", help="row label to compare every row against (paired by seed, first metric)")
    cmp_.add_argument("--plot", metavar="PNG", help="also draw the first metric per row with its CI as a bar chart")
    cmp_.add_argument("--capacity", action="store_true",
                      help="teacher × student table of one experiment: student accuracy, gain over scratch, "
                           "the teacher's own accuracy")
    cmp_.set_defaults(func=cmd_compare)

    show = sub.add_parser("show", help="one run's resolved config and metrics")
    show.add_argument("run", help="run id or unique prefix")
    show.set_defaults(func=cmd_show)

    runs = sub.add_parser("runs", help="list runs with their status")
    runs.add_argument("experiment", nargs="?", help="only this experiment")
    runs.set_defaults(func=cmd_runs)

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

    plot = sub.add_parser("plot", help="figures of a study (capacity-gap: heatmap and accuracy vs teacher size; "
                                       "gkd-grid: λ × divergence heatmap and table; qat: precision × signals table and bars)")
    plot.add_argument("what", choices=["capacity-gap", "gkd-grid", "qat"], help="which figure")
    plot.add_argument("experiment", help="experiment name")
    plot.add_argument("--out", help="folder for the PNG and SVG files (default: <workspace>/plots/<experiment>)")
    plot.add_argument("--metric", default="test/acc", help="final metric to plot (default test/acc)")
    plot.add_argument("--method", help="method block to plot (default kd when present, else the first)")
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


if __name__ == "__main__":
    sys.exit(main())
