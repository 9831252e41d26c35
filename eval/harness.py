"""Run lm-eval's built-in hellaswag and wikitext logic on a model folder or an in-memory model.

Two task modes:
- "hub": the registered tasks as they are (data from the HF hub or the HF cache, on clusters);
- "local": the same built-in task logic on local files in the real schemas, through a group
  YAML that overrides only the dataset fields (lm-eval's `tasks=["hellaswag"]` would try the Hub).
A comma list of other lm-eval task names also works.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Optional, Union

from qat.convert.experts import register_expert_ops
from qat.errors import UserError, boundary
from qat.model import load_tokenizer

LOCAL_FILES = {
    "hellaswag": ["train", "validation"],
    "wikitext": ["train", "validation", "test"],
}
# The fields lm-eval's built-in tasks read from each row (lm_eval/tasks/{hellaswag/utils.py,wikitext}).
LOCAL_FIELDS = {"hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"), "wikitext": ("page",)}
GROUP = "qat_local"


def local_group_yaml(data_dir: Optional[Path]) -> str:
    """The group override: built-in hellaswag/wikitext, dataset fields pointed at local jsonl."""
    if data_dir is None:
        raise UserError("tasks=local needs a data folder (--data-dir) with hellaswag/ and wikitext/ jsonl files")
    lines = [f"group: {GROUP}", "task:"]
    for task, splits in LOCAL_FILES.items():
        files = {}
        for split in splits:
            f = Path(data_dir) / task / f"{split}.jsonl"
            if not f.is_file():
                raise UserError(f"local eval data missing: {f} (expected {task}/{{{','.join(splits)}}}.jsonl)")
            check_local_file(f, LOCAL_FIELDS[task])
            files[split] = str(f.resolve())
        data_files = ", ".join(f"{k}: {v}" for k, v in files.items())
        lines += [f"  - task: {task}", "    dataset_path: json", "    dataset_name: null",
                  f"    dataset_kwargs: {{data_files: {{{data_files}}}}}"]
    lines += ["aggregate_metric_list: []", "metadata: {version: 1.0}"]
    return "\n".join(lines) + "\n"


def check_local_file(f: Path, fields: tuple) -> None:
    """Each line a JSON object with the task's fields: a bad file is one line naming file and line,
    here, rather than an Arrow cast error from inside lm-eval."""
    with open(f) as fh:
        n = 0
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UserError(f"local eval data {f}, line {n}: does not parse ({e})") from None
            missing = [k for k in fields if not isinstance(row, dict) or k not in row]
            if missing:
                raise UserError(f"local eval data {f}, line {n}: lacks {', '.join(missing)} (each row needs "
                                f"{', '.join(fields)}, as in the Hub dataset)")
    if n == 0:
        raise UserError(f"local eval data {f} is empty")


# The task folders inside lm-eval that hellaswag and wikitext come from (config and utils.py).
BUILTIN_FOLDERS = ("hellaswag", "wikitext")


@functools.lru_cache(maxsize=4)
def task_manager(include_path: Optional[str], builtin_only: bool = False):
    """lm-eval's task index, once per process. The whole index parses every built-in task's YAML
    (about 14,700 tasks, 13-17 s on a 2-core CPU machine); hellaswag and wikitext need only their
    own two folders of it (the same files, so the same task logic), which index in milliseconds."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    folders = [Path(lm_eval.__file__).parent / "tasks" / name for name in BUILTIN_FOLDERS]
    if builtin_only and all(f.is_dir() for f in folders):  # else an lm-eval laid out otherwise
        extra = [include_path] if include_path else []
        return TaskManager(include_path=[*map(str, folders), *extra], include_defaults=False)
    return TaskManager(include_path=include_path)


def check_tasks(tasks: str, data_dir: Optional[Path]) -> None:
    """Fail now on what resolve_tasks would refuse later: local files are checked as they are (fast);
    task names are looked up in lm-eval's index (cached for the evaluation itself; milliseconds for
    hellaswag and wikitext, 13-17 s for any other name, which needs the whole index)."""
    if tasks == "local":
        local_group_yaml(data_dir)
    else:
        resolve_tasks(tasks, data_dir)


def resolve_tasks(tasks: str, data_dir: Optional[Path]):
    """(task names, TaskManager) for 'local', 'hub' or a comma list; unknown names are errors."""
    if tasks == "local":
        text = local_group_yaml(data_dir)
        # One folder per distinct group file, so the cached TaskManager stays valid.
        folder = Path(tempfile.gettempdir()) / f"qat_lm_eval_{hashlib.sha1(text.encode()).hexdigest()[:12]}"
        folder.mkdir(exist_ok=True)
        (folder / f"{GROUP}.yaml").write_text(text)
        return [GROUP], task_manager(str(folder), builtin_only=True)
    names = ["hellaswag", "wikitext"] if tasks == "hub" else [t.strip() for t in tasks.split(",") if t.strip()]
    tm = task_manager(None, builtin_only=set(names) <= set(BUILTIN_FOLDERS))
    unknown = [t for t in names if t not in tm.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)} (use local, hub, or names from `lm_eval ls tasks`)")
    return names, tm


def load_lm(model: Union[str, Path, object], tokenizer=None, batch_size: int = 8, device: str = "cpu",
            dtype: str = "auto"):
    from lm_eval.models.huggingface import HFLM

    if isinstance(model, (str, Path)):
        if not (Path(model) / "config.json").is_file():
            raise UserError(f"{model} is not an HF model folder (no config.json)")
        tokenizer = load_tokenizer(str(model), key="--model", need_pad=True)
        register_expert_ops()  # a quantized/ folder's MoE experts select one expert at a time
        with boundary(f"--model {model}: lm-eval cannot load it",
                      "the folder needs config.json, complete weights (*.safetensors) and its tokenizer; "
                      "convert or copy it again"):
            return HFLM(pretrained=str(model), tokenizer=tokenizer, batch_size=batch_size, device=device,
                        dtype=dtype)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)


def evaluate(model, tokenizer=None, tasks: str = "local", data_dir: Optional[Path] = None,
             limit: Optional[float] = None, batch_size: int = 8, num_fewshot: Optional[int] = None,
             device: str = "cpu", dtype: str = "auto") -> dict:
    """lm-eval results reduced to {task: {metric: value, metric_stderr: value}}."""
    import lm_eval

    from datasets.exceptions import DatasetGenerationError

    names, tm = resolve_tasks(tasks, data_dir)
    lm = load_lm(model, tokenizer, batch_size, device, dtype)
    # the task data does not load (a malformed file), or its rows lack a field the task reads
    with boundary(f"lm-eval could not read the data of tasks={tasks}" + (f" in {data_dir}" if data_dir else ""),
                  "fix or replace those files" + (f" (expected {sorted(LOCAL_FILES)} jsonl in lm-eval's schema)"
                                                   if tasks == "local" else ""),
                  errors=(DatasetGenerationError, KeyError)):
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=1000)
    return flatten(out["results"])


def flatten(results: dict) -> dict:
    """{"hellaswag": {"acc,none": .., "acc_stderr,none": ..}} -> {"hellaswag": {"acc": .., "acc_stderr": ..}}."""
    flat = {}
    for task, metrics in results.items():
        if task == GROUP:
            continue
        row = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            name = key.split(",")[0]
            row[name] = float(value)
        flat[task] = row
    return flat
