"""configs/losslab/zoo_*.yaml (issue 21's loss-laboratory arms): parsed and validated in-process (fast), so the
study's configs cannot rot; the protocol they share with configs/losslab/mnist1d.yaml is asserted."""
from pathlib import Path

from kdlab.config import load_experiment

LOSSLAB = Path(__file__).resolve().parents[1] / "configs" / "losslab"
ZOO = {"nst", "vid", "cc", "kdsvd", "ab", "ft", "ofd", "ctkd", "crd", "reviewkd", "dot", "mlkd"}
ONE_D = {"cc", "crd", "ctkd", "dot", "mlkd"}  # run on cnn1d; nst, vid, kdsvd, ab, ft, ofd, reviewkd need (C, H, W) maps


def _arms(specs):
    """{arm label: [specs]} and the registered method each arm runs."""
    arms, methods = {}, {}
    for spec in specs:
        label = spec.point_names["method"]
        arms.setdefault(label, []).append(spec)
        methods[label] = spec.config.method.name
    return arms, methods


def _train_size(data):
    if data.dataset == "digits":
        assert data.drop_unlabelled
        return 10 * data.labels_per_class  # the labelled samples only
    assert data.dataset == "mnist1d"
    return 3600


def _check_common(specs):
    arms, methods = _arms(specs)
    assert all(len(runs) == 5 and sorted(s.seed for s in runs) == [0, 1, 2, 3, 4] for runs in arms.values())
    assert {"scratch", "kd"} <= set(arms) and methods["kd"] == "kd" and methods["scratch"] == "scratch"
    for spec in specs:
        assert spec.config.train.selection == "last"
        if spec.config.method.name == "crd":  # the default 16,384 negatives exceed the train split
            assert spec.config.method.options["nce_k"] < _train_size(spec.config.data) - 1
        if spec.config.method.name == "dot":  # DOT is SGD only: its baseline is a kd arm with the same train section
            kd_sgd = [s.config.train for s in specs if s.point_names["method"] == "kd_sgd"]
            assert kd_sgd and all(t == spec.config.train for t in kd_sgd) and spec.config.train.optimizer == "sgd"
    return arms, methods


def test_zoo_mnist1d_shares_the_losslab_protocol_and_teacher():
    _, base = load_experiment(LOSSLAB / "mnist1d.yaml")
    _, specs = load_experiment(LOSSLAB / "zoo_mnist1d.yaml")
    arms, methods = _check_common(specs)
    assert set(methods.values()) - {"scratch", "kd"} == ONE_D
    reference = base[0].config
    for spec in specs:
        cfg = spec.config
        assert cfg.data == reference.data and cfg.teacher == reference.teacher  # one teacher run for both studies
        assert cfg.student == reference.student and cfg.train.epochs == 30 and cfg.train.batch_size == 128
        if cfg.method.name != "dot" and spec.point_names["method"] != "kd_sgd":
            assert cfg.train == reference.train
    assert arms["mlkd"][0].config.method.options["kd_weight"] == 0.9  # the default arm keeps MLKD's weight
    assert all(spec.config.method.options["strong_view"] == "weak"  # RandAugment needs images
               for spec in specs if spec.config.method.name == "mlkd")
    assert arms["crd"][0].config.method.options["nce_k"] == 1024  # below the 3,600-sample split


def test_zoo_resnet_runs_every_zoo_method_on_the_cifar_shaped_pair():
    _, specs = load_experiment(LOSSLAB / "zoo_resnet.yaml")
    _, methods = _check_common(specs)
    assert set(methods.values()) - {"scratch", "kd"} == ZOO
    for spec in specs:
        cfg = spec.config
        assert (cfg.teacher.model, cfg.student.model) == ("resnet20", "resnet8")
        assert cfg.data.dataset == "digits" and cfg.data.labels_per_class == 30
