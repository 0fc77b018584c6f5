"""The Paddle version shims: the start-up check's one line, and each shim's branch for the other versions."""

import paddle
import pytest

from vilbert import compat


@pytest.mark.parametrize("version, parsed", [("2.6.2", (2, 6, 2)), ("3.3.1", (3, 3, 1)), ("3.0.0rc1", (3, 0, 0)),
                                             ("0.0.0", (99,))])
def test_version_tuple(version, parsed):
    assert compat.version_tuple(version) == parsed


def test_an_older_paddle_stops_with_one_line_naming_both_versions_and_the_fix(monkeypatch):
    monkeypatch.setattr(paddle, "__version__", "2.5.2")
    with pytest.raises(SystemExit) as stop:
        compat.require_supported_paddle()
    message = str(stop.value)
    assert "\n" not in message and message.startswith("error: PaddlePaddle 2.5.2 is too old")
    assert "needs 2.6 or newer" in message and "pip install paddlepaddle-gpu==2.6.2" in message


def test_this_paddle_is_supported():
    compat.require_supported_paddle()  # no SystemExit


def test_autocast_test_without_paddle_is_autocast_enabled(monkeypatch):
    """2.6, 3.0 and 3.1 have no paddle.is_autocast_enabled: the tracer's AMP level answers."""
    monkeypatch.delattr(paddle, "is_autocast_enabled", raising=False)
    from paddle.base import core, framework

    assert compat.is_autocast_enabled() is False
    tracer = framework._dygraph_tracer()
    level = tracer._amp_level
    tracer._amp_level = core.AmpLevel.O1
    try:
        assert compat.is_autocast_enabled() is True
    finally:
        tracer._amp_level = level
