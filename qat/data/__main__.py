"""Build the tokenized cache of a training config ahead of the job (on a CPU node):

    python -m qat.data prepare --config configs/llama3_2_1b/qat.yaml [key=value ...]
    qat data prepare --config ...

It builds every missing entry of `data.sources` under `data.cache_dir` (default $QAT_DATA_CACHE
or ~/.cache/qat-recipes/data) with `data.num_proc` tokenizer processes, showing datasets' progress
bar and the tokens/s of each build; the training job then finds every entry and tokenizes nothing.
"""

from __future__ import annotations

import argparse
import sys

from qat.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m qat.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="tokenize and cache every source of a training config")
    prep.add_argument("--config", required=True)
    prep.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from qat.config import load_config
    from qat.data import StreamData, build_dataset
    from qat.model import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    tok = load_tokenizer(cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code)
    data = build_dataset(cfg.data, tok, builder=True)
    if isinstance(data, StreamData):  # tokenized on the fly by each rank: nothing to prepare
        print(f"data.sources stream ({len(data.sources)} source(s)): nothing to prepare")
        return
    for i, (src, n) in enumerate(zip(cfg.data.sources, data.sizes)):
        print(f"sources[{i}] {src.path}: {n:,} rows of {cfg.data.seq_len} tokens ({cfg.data.packing})")


if __name__ == "__main__":
    sys.exit(main())
