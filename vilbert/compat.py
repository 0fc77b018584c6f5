"""Every difference between the Paddle versions this project supports (2.6.x and 3.0 to 3.3), in one place.

`pip install paddlepaddle-gpu` gives 2.6.2 (the newest GPU wheel on PyPI); 3.x GPU wheels come from Paddle's own
index, so users have both. Each shim below names the versions it is for and goes when they are dropped. The
facts were read from the wheels' own sources (paddle/amp/auto_cast.py).
"""

import functools
import re

MIN_VERSION = (2, 6)
INSTALL_HINT = ("install a supported one: `pip install paddlepaddle-gpu==2.6.2` (PyPI) or a 3.x GPU wheel "
                "from Paddle's own index (README, 'On a GPU machine'); on CPU `pip install paddlepaddle==3.3.1`")


def version_tuple(version: str) -> tuple:
    """'3.3.1' -> (3, 3, 1); a source build's '0.0.0' counts as the newest."""
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    return (99,) if numbers in ((), (0, 0, 0)) else numbers


def load_before_paddle() -> None:
    """2.6: after `init_parallel_env` (gloo), writing a PNG crashed in zlib's `deflateReset` (SIGSEGV) unless Pillow's
    imaging library was loaded before Paddle's. Harmless on 3.x, so it is done for every version."""
    import PIL.Image  # noqa: F401


def require_supported_paddle() -> None:
    """Stop with one line when Paddle is missing or older than `MIN_VERSION` (called when `vilbert` is imported)."""
    try:
        import paddle
    except ImportError as err:
        raise SystemExit(f"error: PaddlePaddle cannot be imported ({err}); {INSTALL_HINT}") from None
    if version_tuple(paddle.__version__) < MIN_VERSION:
        minimum = ".".join(map(str, MIN_VERSION))
        raise SystemExit(f"error: PaddlePaddle {paddle.__version__} is too old: this project needs {minimum} or newer; "
                         f"{INSTALL_HINT}")


@functools.lru_cache(maxsize=None)
def paddle_version() -> tuple:
    import paddle

    return version_tuple(paddle.__version__)


def is_autocast_enabled() -> bool:
    """Whether an enabled `paddle.amp.auto_cast` is active. `paddle.is_autocast_enabled` exists from 3.2 on; before
    that (2.6, 3.0, 3.1) the same test is made on the dygraph tracer, as 3.2's function does it."""
    import paddle

    if hasattr(paddle, "is_autocast_enabled"):
        return paddle.is_autocast_enabled()
    from paddle.base import core, framework

    tracer = framework._dygraph_tracer()
    return bool(tracer) and tracer._amp_level != core.AmpLevel.O0
