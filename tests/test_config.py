from pathlib import Path

import pytest

from qat.config import TrainConfig, load_config
from qat.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TRAIN_CONFIGS = [p for p in CONFIGS if p.name != "compare.yaml"]


def test_there_are_configs_for_every_model_and_mode():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    for model in ("llama3_2_1b", "llama3_1_8b", "qwen3_1_7b", "qwen3_8b"):
        for mode in ("full", "qat", "lora", "qat_lora"):
            assert f"{model}/{mode}.yaml" in names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_yaml_validates_and_has_a_launch_comment(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, TrainConfig)
    head = path.read_text().splitlines()[:6]
    assert any("recipes/train.py" in l and l.startswith("#") for l in head), "no launch command in header"


def test_overrides_win_and_are_typed():
    cfg = load_config(str(ROOT / "configs/tiny/full.yaml"), ["optimizer.lr=0.5", "qat.group_size=null"])
    assert cfg.optimizer.lr == 0.5 and cfg.qat.group_size is None


@pytest.mark.parametrize("override, needle", [
    ("optimizer.lrr=1", "unknown config key 'optimizer.lrr'"),
    ("training.steps=abc", "training.steps"),
    ("training.dtype=fp16", "training.dtype='fp16' is not one of bf16, fp32"),
    ("scheduler.decay=exp", "scheduler.decay"),
    ("training.batch_size=0", "training.batch_size=0 must be at least 1"),
    ("checkpoint.resume=/tmp/nowhere", "expected null, 'auto' or a step-NNNNNN folder"),
])
def test_bad_keys_and_values_name_the_key(override, needle):
    with pytest.raises(UserError, match=None) as e:
        load_config(str(ROOT / "configs/tiny/full.yaml"), [override])
    assert needle in str(e.value)


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name == "compare.yaml"],
                         ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_compare_configs_validate(path):
    from qat.config import CompareConfig

    cfg = load_config(str(path), schema=CompareConfig)
    assert (ROOT / cfg.train_config).is_file()
    load_config(str(ROOT / cfg.train_config), cfg.train_overrides)


def test_missing_config_file():
    with pytest.raises(UserError, match="config file not found"):
        load_config("configs/nope.yaml")
