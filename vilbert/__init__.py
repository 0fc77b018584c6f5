"""ViLBERT for referring expressions, in PaddlePaddle."""
from .compat import load_before_paddle, require_supported_paddle
from .runtime import set_cpu_defaults, set_paddle_threads

set_cpu_defaults()  # before anything below imports paddle
load_before_paddle()
require_supported_paddle()  # one line, not a traceback, when Paddle is missing or too old

from .config import ConfigError, ViLBertConfig  # noqa: E402
from .model import VILBertForVLTasks, ViLBertOutput  # noqa: E402

set_paddle_threads()

__all__ = ["ConfigError", "ViLBertConfig", "VILBertForVLTasks", "ViLBertOutput"]
