"""QAT recipe suite: FSDP2 fine-tuning with torchao quantization-aware training and peft LoRA."""

import warnings as _warnings

from qat import logfilters as _logfilters

# torchao's harmless start-up messages on CPU-only hosts, and only those (qat/logfilters.py)
_logfilters.install()
_warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

__version__ = "0.1.0"
