"""ViLBERT for referring expressions, in PaddlePaddle."""
from .runtime import set_cpu_defaults, set_paddle_threads

set_cpu_defaults()  # before anything below imports paddle

from .config import ConfigError, ViLBertConfig  # noqa: E402
from .model import VILBertForVLTasks, ViLBertOutput  # noqa: E402

set_paddle_threads()

__all__ = ["ConfigError", "ViLBertConfig", "VILBertForVLTasks", "ViLBertOutput"]
