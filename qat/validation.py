"""Allowed values of config fields, declared once, on the field itself.

    rank: int = rule(16, ge=1)
    decay: str = rule("cosine", choices=("cosine", "linear", "constant"))
    max_grad_norm: Optional[float] = rule(1.0, gt=0, why="null disables clipping")

`check_fields` walks a loaded config (sections, and lists of sections such as data.sources) and
raises one UserError that names the first key whose value breaks its rule. It runs in
`load_config`, before any process group exists or any weight is read. A null in an Optional
field means "the documented default" and is never out of range. Cross-field rules (lora_merged
needs LoRA, warmup against steps) stay in qat.config.validate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from qat.errors import UserError


@dataclass(frozen=True)
class Rule:
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    choices: Optional[tuple] = None
    why: str = ""  # what the user should know to pick a value

    def violation(self, value: Any) -> Optional[str]:
        """Why `value` breaks the rule, or None. Lists are checked element by element."""
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return next((v for v in map(self.violation, value) if v), None)
        if self.choices is not None:
            return None if value in self.choices else f"is not one of {', '.join(map(str, self.choices))}"
        bounds = [(self.ge, lambda b: value >= b, "at least"), (self.gt, lambda b: value > b, "greater than"),
                  (self.le, lambda b: value <= b, "at most"), (self.lt, lambda b: value < b, "less than")]
        for bound, ok, words in bounds:
            if bound is not None and not ok(bound):
                return f"must be {words} {bound:g}"
        return None

    def out_of_range_example(self) -> Any:
        """A value that breaks the rule (for the generated test of every field)."""
        if self.choices is not None:
            return "not-a-choice"
        if self.ge is not None:
            return self.ge - 1
        if self.gt is not None:
            return self.gt
        if self.le is not None:
            return self.le + 1
        return self.lt


def rule(default: Any = dataclasses.MISSING, *, factory=None, ge=None, gt=None, le=None, lt=None,
         choices=None, why: str = ""):
    """A dataclass field with its allowed values in the field's metadata."""
    meta = {"rule": Rule(ge, gt, le, lt, tuple(choices) if choices else None, why)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def rule_of(f: dataclasses.Field) -> Optional[Rule]:
    return f.metadata.get("rule")


def check_fields(cfg: Any, prefix: str = "", as_flags: bool = False) -> None:
    """Raise UserError for the first field of `cfg` (recursively) whose value breaks its rule.
    as_flags: name the field as the command-line flag it came from (--batch-size)."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        r = rule_of(f)
        problem = r.violation(value) if r else None
        if problem:
            name = "--" + key.replace("_", "-") if as_flags else key
            raise UserError(f"{name}={value!r} {problem}" + (f" ({r.why})" if r.why else ""))
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.", as_flags)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_fields(item, f"{key}[{i}].", as_flags)
