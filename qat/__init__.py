"""QAT recipe suite: FSDP2 fine-tuning with torchao quantization-aware training and peft LoRA."""

import warnings as _warnings

from qat import logfilters as _logfilters
from qat import progress as _progress

# torchao's harmless start-up messages on CPU-only hosts, and only those (qat/logfilters.py)
_logfilters.install()
# datasets', transformers' and lm-eval's tqdm bars: plain lines when not on a terminal (qat/progress.py)
_progress.plain_library_bars()
_warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

__version__ = "0.1.0"
