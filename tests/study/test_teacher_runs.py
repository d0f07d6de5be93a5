"""The views find a student's teacher run from the stored run graph (schema 2), through assistant chains."""
from __future__ import annotations

from kdlab.store import Store
from kdlab.study.teacher_runs import recipe_run_id, teacher_metric_values


def _claim(store, run_id, experiment, inputs=(), final=None):
    store.claim(run_id, experiment=experiment, role="student", label=run_id, seed=0, group_key=run_id, config={},
                inputs=inputs)
    if final is not None:
        store.finish(run_id, final)


def test_edges_lead_to_the_recipe_run(tmp_path):
    store = Store(tmp_path)
    for name in ("teachers", "exp"):
        store.ensure_experiment(name, {})
    _claim(store, "teachers-t", "teachers", final={"test/acc": 0.9})
    _claim(store, "teachers-a", "teachers", inputs=[("teachers-t", "teacher", None)], final={"test/acc": 0.8})
    _claim(store, "exp-chain", "exp", inputs=[("teachers-a", "assistant", None)], final={"test/acc": 0.7})
    _claim(store, "exp-epoch", "exp", inputs=[("teachers-t", "teacher", 3)], final={"test/acc": 0.6})
    _claim(store, "exp-traj", "exp", inputs=[("teachers-t", "trajectory", 1), ("teachers-t", "trajectory", 4)])
    _claim(store, "exp-ens", "exp", inputs=[("teachers-t", "member", None), ("teachers-a", "member", None)])
    assert recipe_run_id(store, "exp-chain") == "teachers-t"
    assert recipe_run_id(store, "exp-epoch") == "teachers-t"
    assert recipe_run_id(store, "exp-traj") == "teachers-t"
    assert recipe_run_id(store, "exp-ens") is None
    runs = [store.run(r) for r in ("exp-chain", "exp-epoch", "exp-traj", "exp-ens")]
    assert teacher_metric_values(store, runs, "test/acc") == [0.9]  # one teacher, counted once
