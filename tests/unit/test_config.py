from pathlib import Path

import pytest

from qat.config import TrainConfig, load_config
from qat.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
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


# --- every field of every schema, generated: a future field is covered without a new test -----

def leaf_fields(schema, prefix=""):
    """(dotted key, type, rule) of every scalar or list-of-scalar field, through nested sections."""
    import dataclasses
    import typing

    from qat.validation import rule_of

    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        base = args[0] if typing.get_origin(t) is typing.Union else t
        if dataclasses.is_dataclass(base):
            yield from leaf_fields(base, f"{prefix}{f.name}.")
        elif not (typing.get_origin(base) is list and dataclasses.is_dataclass(typing.get_args(base)[0])):
            yield f"{prefix}{f.name}", base, rule_of(f)


def schema_cases():
    from qat.config import CompareConfig

    for schema, cfg in ((TrainConfig, "configs/tiny/full.yaml"), (CompareConfig, "configs/tiny/compare.yaml")):
        for key, typ, rule in leaf_fields(schema):
            yield pytest.param(schema, cfg, key, typ, rule, id=f"{schema.__name__}.{key}")


def run_entry_point(schema, cfg, override, capsys, *, recipe) -> list[str]:
    """The real entry point, in process: its exit status and the lines it printed on stderr."""
    import sys

    compare, train = recipe("compare"), recipe("train")

    main = train.main if schema is TrainConfig else compare.main
    with pytest.raises(SystemExit) as e:
        main(["--config", str(ROOT / cfg), override])
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("schema, cfg, key, typ, rule", list(schema_cases()))
def test_every_field_rejects_a_wrong_type_and_an_out_of_range_value_in_one_line(schema, cfg, key, typ, rule,
                                                                                 capsys, recipe):
    import typing

    # free-form fields (a path, a name) take any string: only a value of another type is wrong there
    numeric = typ in (int, float)
    assert not numeric or rule is not None, f"{key} is a number without an allowed range: declare rule(...)"
    bad_type = "[1, 2]" if typing.get_origin(typ) is not list else "abc"
    cases = [f"{key}=not-a-number" if numeric or typ is bool else f"{key}={bad_type}"]
    if rule is not None:
        cases.append(f"{key}={rule.out_of_range_example()}")
    for override in cases:
        err = run_entry_point(schema, cfg, override, capsys, recipe=recipe)
        assert len(err) == 1 and err[0].startswith("error: ") and key in err[0], (override, err)


def test_legal_but_surely_unintended_values_warn_in_one_line_and_go_on(capsys):
    cfg = load_config(str(ROOT / "configs/tiny/full.yaml"),
                      ["scheduler.warmup_steps=50", "training.steps=20", "qat.enabled=true",
                       "qat.fake_quant_after_n_steps=20"])
    assert cfg.scheduler.warmup_steps == 50
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: scheduler.warmup_steps=50 >= training.steps=20: the learning rate never reaches "
                   "optimizer.lr",
                   "warning: qat.fake_quant_after_n_steps=20 >= training.steps=20: no step trains with fake "
                   "quantization"]


def test_bf16_master_weights_need_bf16_compute():
    from qat.errors import UserError

    with pytest.raises(UserError, match="training.master_dtype=bf16 needs training.dtype=bf16"):
        load_config(str(ROOT / "configs/tiny/full.yaml"), ["training.master_dtype=bf16", "training.dtype=fp32"])
