"""configs/cifar100/: the mdistiller protocol in every run of every recipe (validated here, fast), and a dry run of
each file on a tiny CIFAR-100 archive in the real pickle format, written by the test (integration)."""
import pickle
from pathlib import Path

import numpy as np
import pytest

from kdlab.cli import main
from kdlab.config import load_experiment

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "cifar100"
FILES = sorted(p.name for p in CONFIGS.glob("*.yaml"))
PAIRS = {"res32x4_res8x4.yaml": ("resnet32x4", "resnet8x4"), "res56_res20.yaml": ("resnet56", "resnet20"),
         "wrn40_2_wrn16_2.yaml": ("wrn_40_2", "wrn_16_2"), "res32x4_mv2.yaml": ("resnet32x4", "mobilenetv2")}
REQUIRED = {"scratch", "kd", "dkd", "dist", "fitnet", "at", "rkd", "pkt", "sp", "logit_std", "nst", "vid", "cc",
            "ab", "ft", "ctkd"}  # + ofd and kdsvd where the student has the teacher's residual stages


def _protocol(train, lr):
    assert (train.epochs, train.batch_size, train.optimizer, train.lr, train.momentum) == (240, 64, "sgd", lr, 0.9)
    assert train.weight_decay == 5e-4 and train.schedule == "step" and train.gamma == 0.1
    # ×0.1 at epochs 150, 180 and 210 of 240
    assert [round(m * 240, 6) for m in train.milestones] == [150, 180, 210] and train.selection == "last"


def test_every_recipe_is_the_mdistiller_protocol():
    assert set(PAIRS) | {"fast_res32x4_res8x4.yaml"} == set(FILES)
    for name in FILES:
        _, specs = load_experiment(CONFIGS / name, ["data.root=/nowhere"])
        arms = set()
        for spec in specs:
            cfg = spec.config
            assert cfg.data.dataset == "cifar100" and cfg.data.augment == "crop_flip" and cfg.data.val_fraction == 0
            assert cfg.data.options["download"] is True and cfg.seeds == [0, 1, 2]
            _protocol(cfg.teacher.train, 0.05)
            _protocol(cfg.train, 0.01 if name == "res32x4_mv2.yaml" else 0.05)  # MobileNet students: lr 0.01
            if name in PAIRS:
                assert (cfg.teacher.model, cfg.student.model) == PAIRS[name]
            arms.add(spec.point_names.get("method"))
        if name == "fast_res32x4_res8x4.yaml":
            assert arms == {"kd", "dkd"}
            assert (cfg.train.precision, cfg.train.channels_last, cfg.train.compile) == ("bf16", True, True)
        else:
            assert REQUIRED <= arms and (("ofd" in arms) == (name != "res32x4_mv2.yaml")), name
            assert ("kdsvd" in arms) == (name != "res32x4_mv2.yaml"), name  # kdsvd pairs equal channel counts
            assert len(specs) == 3 * len(arms)


def _tiny_cifar100(root: Path) -> None:
    """cifar-100-python/{train,test}: pickled dicts of uint8 (N, 3072) rows and fine/coarse labels, as the archive."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", 200), ("test", 100)):
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 b"fine_labels": [i % 100 for i in range(count)], b"coarse_labels": [i % 20 for i in range(count)],
                 b"filenames": [b"x.png"] * count, b"batch_label": split.encode()}
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))


@pytest.mark.integration
@pytest.mark.parametrize("name", FILES)
def test_dry_run_builds_every_arm(tmp_path, capsys, name):
    _tiny_cifar100(tmp_path / "data")
    args = ["--workspace", str(tmp_path / "ws"), "run", str(CONFIGS / name), "--dry-run",
            "--set", f"data.root={tmp_path / 'data'}"]
    if "crd:" in (CONFIGS / name).read_text():  # CRD's 16,384 negatives need a real training split; 200 images take 64
        args += ["--set", "grid.method.crd.nce_k=64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "data cifar100: train 200, val 0, test 100, input (3, 32, 32), 100 classes" in out
    _, specs = load_experiment(CONFIGS / name, [f"data.root={tmp_path / 'data'}"])
    for arm in {spec.point_names.get("method") for spec in specs}:
        assert f"[method={arm} seed=0]" in out, arm
