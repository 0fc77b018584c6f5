"""vilbert/visualize.py: the picture explains its colours in a legend."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.figure  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vilbert.visualize import draw_prediction  # noqa: E402

BOXES = np.array([[10, 10, 60, 60], [20, 30, 90, 80], [0, 0, 40, 30], [50, 50, 99, 99]], np.float32)
SCORES = np.array([0.1, 2.0, 1.0, -1.0], np.float32)


@pytest.fixture
def legends(monkeypatch):
    """The legend of each figure draw_prediction saves: [(label, colour, line style), ...]."""
    saved, savefig = [], matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        legend = fig.axes[0].get_legend()
        saved.append(None if legend is None else
                     [(text.get_text(), handle.get_color(), handle.get_linestyle())
                      for text, handle in zip(legend.get_texts(), legend.legend_handles)])
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return saved


def test_the_legend_names_the_boxes_drawn(tmp_path, legends):
    draw_prediction(tmp_path / "a.png", "man in red", BOXES, SCORES, image_size=(100, 100),
                    target_box=[20, 30, 90, 80])
    assert (tmp_path / "a.png").stat().st_size > 0
    assert legends == [[("chosen (#1)", "lime", "-"), ("runners-up (#2-#3)", "orange", "-"),
                        ("referred box", "red", "--")]]


def test_only_what_is_drawn_is_in_the_legend(tmp_path, legends):
    draw_prediction(tmp_path / "b.png", "left dog", BOXES, SCORES, image_size=(100, 100), top_k=1)
    assert legends == [[("chosen (#1)", "lime", "-")]]
