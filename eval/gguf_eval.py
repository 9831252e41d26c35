"""llama.cpp's own bits per byte for compare's arms (compare config `gguf`): each export's gguf/
files evaluated on held-out text by llama.cpp itself (qat/convert/gguf_check.py), as rows of the
report next to lm-eval's.

    bf16 arm  gguf/model-<dtype>.gguf   the fine-tuned model, unquantized (f16 or f32)
              gguf/model-<scheme>.gguf  PTQ
    QAT arms  gguf/model-<scheme>.gguf  the trained codes
"""

from __future__ import annotations

import json
from pathlib import Path

from qat.atomic import write_text_atomic
from qat.errors import UserError


def gguf_models(export_dir: Path) -> dict[str, Path]:
    """{bf16, ptq} or {qat} -> the .gguf file convert wrote for it."""
    report = json.loads((export_dir / "verify.json").read_text())
    files = list(report.get("gguf", {}).get("files", {}))
    if not files:
        raise UserError(f"{export_dir} has no gguf/ files: delete it and rerun compare (it converts again with gguf on)")
    scheme = f"model-{report['scheme']['scheme']}.gguf"
    if report["training"] == "qat":
        return {"qat": export_dir / "gguf" / scheme}
    plain = next(f for f in files if f != scheme)
    return {"bf16": export_dir / "gguf" / plain, "ptq": export_dir / "gguf" / scheme}


def read_texts(path: Path) -> list[str]:
    """The `text` field of every line of a JSONL file."""
    if not Path(path).is_file():
        raise UserError(f"gguf_texts={path} is not a file: give a JSONL file of held-out {{\"text\": ...}} rows")
    texts = [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]
    if not texts:
        raise UserError(f"gguf_texts={path} has no rows")
    return texts


def evaluate_gguf(model: Path, texts: list[str], n_ctx: int, result_file: Path, log=print) -> dict:
    """llama.cpp's bits per byte of `model` on `texts`, computed once and kept in result_file."""
    if result_file.exists():
        log(f"llama.cpp {result_file.stem}: done already")
        return json.loads(result_file.read_text())
    from qat.convert.gguf_check import bits_per_byte, load

    log(f"llama.cpp {result_file.stem}: {model}")
    llm = load(model, n_ctx)
    result = {"model": str(model), **bits_per_byte(llm, texts, n_ctx)}
    llm.close()
    result_file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(result_file, json.dumps(result, indent=2))
    return result


LABELS = {"bf16": "bf16 (GGUF {dtype})", "ptq": "PTQ", "qat": "QAT", "qad": "QAD", "qat_ls": "QAT+LS",
          "qad_ls": "QAD+LS"}


def markdown(results: dict, scheme: str, dtype: str, texts: str) -> str:
    """The llama.cpp rows: bits per byte, and each arm's share of PTQ's loss recovered."""
    lines = ["", f"## llama.cpp (GGUF {scheme}): bits per byte of {texts}, from llama.cpp's own logits", "",
             "| | bits/byte | recovered |", "|---|---|---|"]
    base, ptq = results.get("bf16", {}).get("bits_per_byte"), results.get("ptq", {}).get("bits_per_byte")
    for arm, r in results.items():
        bpb = r["bits_per_byte"]
        rec = ""
        if arm not in ("bf16", "ptq") and base is not None and ptq is not None and ptq > base:
            rec = f"{100 * (ptq - bpb) / (ptq - base):.0f}%"
        lines.append(f"| {LABELS.get(arm, arm).format(dtype=dtype)} | {bpb:.4f} | {rec} |")
    return "\n".join(lines) + "\n"
