from pathlib import Path

import pytest

from detection.config import (
    ConfigKeyError,
    ConfigTypeError,
    get_cfg,
    load_config,
    resolve_config_path,
    save_config,
)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_are_fresh_copies():
    a = get_cfg()
    a.SOLVER.BASE_LR = 1.0
    b = get_cfg()
    assert b.SOLVER.BASE_LR == 0.02
    assert b.SOLVER.IMS_PER_BATCH == 16
    assert b.SOLVER.STEPS == (60000, 80000)
    assert b.INPUT.HFLIP_PROB == 0.5


def test_base_inheritance_two_levels(tmp_path):
    _write(tmp_path / "base" / "root.yaml", "SOLVER:\n  BASE_LR: 0.1\n  MAX_ITER: 10\n")
    _write(
        tmp_path / "base" / "mid.yaml",
        "_BASE_: root.yaml\nSOLVER:\n  MAX_ITER: 20\n  STEPS: [5, 8]\n",
    )
    leaf = _write(
        tmp_path / "exp" / "leaf.yaml",
        "_BASE_: ../base/mid.yaml\nSOLVER:\n  STEPS: [6, 9]\nOUTPUT_DIR: out\n",
    )
    cfg = get_cfg()
    cfg.merge_from_file(str(leaf))
    assert cfg.SOLVER.BASE_LR == 0.1
    assert cfg.SOLVER.MAX_ITER == 20
    assert cfg.SOLVER.STEPS == (6, 9)  # list in yaml -> tuple, as the default
    assert isinstance(cfg.SOLVER.STEPS, tuple)
    assert cfg.OUTPUT_DIR == "out"
    assert cfg.SOLVER.MOMENTUM == 0.9  # untouched default


def test_overrides_from_list():
    cfg = get_cfg()
    cfg.merge_from_list(
        [
            "SOLVER.BASE_LR",
            "0.01",
            "DATASETS.TRAIN",
            "('shapes_train',)",
            "SOLVER.OPTIMIZER",
            "AdamW",
            "SOLVER.AMP.ENABLED",
            "True",
        ]
    )
    assert cfg.SOLVER.BASE_LR == 0.01
    assert cfg.DATASETS.TRAIN == ("shapes_train",)
    assert cfg.SOLVER.OPTIMIZER == "AdamW"
    assert cfg.SOLVER.AMP.ENABLED is True


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    base = _write(tmp_path / "base.yaml", "SOLVER:\n  BASE_LRR: 0.1\n")
    leaf = _write(tmp_path / "leaf.yaml", "_BASE_: base.yaml\nSEED: 3\n")
    cfg = get_cfg()
    with pytest.raises(ConfigKeyError) as e:
        cfg.merge_from_file(str(leaf))
    msg = str(e.value)
    assert "SOLVER.BASE_LRR" in msg
    assert str(base) in msg  # the file the bad key came from, not the leaf
    assert "SOLVER.BASE_LR'" in msg
    with pytest.raises(KeyError, match="Did you mean 'SOLVER.MAX_ITER'"):
        cfg.merge_from_list(["SOLVER.MAX_ITERS", "5"])


def test_wrong_type_names_key_type_and_value(tmp_path):
    f = _write(tmp_path / "bad.yaml", "SOLVER:\n  MAX_ITER: lots\n")
    cfg = get_cfg()
    with pytest.raises(ConfigTypeError) as e:
        cfg.merge_from_file(str(f))
    msg = str(e.value)
    assert "SOLVER.MAX_ITER" in msg and "int" in msg and "'lots'" in msg and str(f) in msg
    with pytest.raises(ConfigTypeError, match="SOLVER.BASE_LR"):
        cfg.merge_from_list(["SOLVER.BASE_LR", "fast"])
    with pytest.raises(ConfigTypeError, match=r"SOLVER.STEPS\[1\]"):
        cfg.merge_from_list(["SOLVER.STEPS", "[1, 'x']"])


def test_int_accepted_for_float(tmp_path):
    f = _write(tmp_path / "c.yaml", "SOLVER:\n  BASE_LR: 1\n  GAMMA: 0\n")
    cfg = get_cfg()
    cfg.merge_from_file(str(f))
    assert cfg.SOLVER.BASE_LR == 1.0 and isinstance(cfg.SOLVER.BASE_LR, float)
    cfg.merge_from_list(["SOLVER.WARMUP_FACTOR", "1"])
    assert isinstance(cfg.SOLVER.WARMUP_FACTOR, float)


def test_save_load_round_trip(tmp_path):
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.BASE_LR", "0.005", "DATASETS.TEST", "('shapes_val',)"])
    path = save_config(cfg, tmp_path / "run")
    assert path.name == "config.yaml"
    again = load_config(path)
    assert again == cfg


def test_resolve_config_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "configs" / "torchvision" / "frcnn_tv.yaml", "SEED: 1\n")
    _write(tmp_path / "configs" / "frcnn_r50.yaml", "SEED: 2\n")
    assert resolve_config_path("torchvision/frcnn_tv.yaml").read_text() == "SEED: 1\n"
    assert resolve_config_path("frcnn_r50").name == "frcnn_r50.yaml"
    direct = _write(tmp_path / "elsewhere.yaml", "SEED: 4\n")
    assert resolve_config_path(str(direct)) == direct.resolve()
    with pytest.raises(FileNotFoundError, match="frcnn_r50.yaml"):
        resolve_config_path("frcnn_r5O.yaml")


def test_yaml_strings_read_as_literals(tmp_path):
    f = _write(
        tmp_path / "c.yaml",
        'INPUT:\n  MIN_SIZE_TRAIN: (160, 192)\nSOLVER:\n  WEIGHT_DECAY: 1e-4\nOUTPUT_DIR: "(x)"\n',
    )
    cfg = get_cfg()
    cfg.merge_from_file(str(f))
    assert cfg.INPUT.MIN_SIZE_TRAIN == (160, 192)
    assert cfg.SOLVER.WEIGHT_DECAY == 1e-4
    assert cfg.OUTPUT_DIR == "(x)"  # a string key keeps its string
