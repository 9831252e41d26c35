"""The metrics we report, defined once: task, lm-eval metric name, label, and direction.

The report (recovery arithmetic, table, plot), the W&B comparison and the sweep summary all read
these; degradation is measured in each metric's bad direction.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    task: str
    name: str
    label: str
    higher_is_better: bool

    @property
    def key(self) -> str:
        """The flat key used in W&B summaries and sweep tables."""
        return f"eval/{self.task}/{self.name}"


METRICS = [
    Metric("hellaswag", "acc", "hellaswag acc", True),
    Metric("hellaswag", "acc_norm", "hellaswag acc_norm", True),
    Metric("wikitext", "word_perplexity", "wikitext word ppl", False),
    Metric("wikitext", "byte_perplexity", "wikitext byte ppl", False),
    Metric("wikitext", "bits_per_byte", "wikitext bits/byte", False),
]
# compare with pte_text: bits per byte of held-out text from the .pte's own logits in ExecuTorch's
# runtime (PTQ and QAT; the bf16 row is the unquantized model in PyTorch over the same windows).
PTE_METRIC = Metric("executorch", "bits_per_byte", "ExecuTorch bits/byte", False)
BY_KEY = {m.key: m for m in METRICS + [PTE_METRIC]}


def reported(results: dict) -> list[Metric]:
    """The table's columns: the lm-eval metrics, and ExecuTorch's bits/byte where it was measured."""
    return METRICS + ([PTE_METRIC] if any(PTE_METRIC.task in r for r in results.values()) else [])


def higher_is_better(key: str) -> bool:
    """For a flat key (eval/<task>/<metric>); other columns (losses) are lower-is-better."""
    m = BY_KEY.get(key)
    return m is not None and m.higher_is_better


def flat(results: dict) -> dict:
    """{task: {metric: v}} -> {"eval/<task>/<metric>": v}, standard errors left out."""
    return {f"eval/{t}/{k}": v for t, row in results.items() for k, v in row.items() if not k.endswith("_stderr")}
