"""QAT recipe suite: FSDP2 fine-tuning with torchao quantization-aware training and peft LoRA."""

import logging as _logging
import warnings as _warnings

# torchao logs a warning for each optional CUDA extension it cannot load on this host, and torch
# warns about torchao's pytree registrations; neither is actionable for a user of the recipes.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
_warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

__version__ = "0.1.0"
