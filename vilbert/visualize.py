"""Pictures of a prediction: the expression, the chosen box and the next-best candidates.

Drawn on the COCO image when its path is given, else on a blank canvas of the image's size, so a
prediction can be looked at without the 13 GB of COCO images. matplotlib is imported here only.
"""

from typing import Optional, Sequence

import numpy as np

from .fileio import atomic_path

CHOSEN, RUNNER_UP, REFERRED = "lime", "orange", "red"  # the box colours; the legend names them


def draw_prediction(path, expression: str, boxes: np.ndarray, scores: np.ndarray, *, image_size,
                    image: Optional[str] = None, top_k: int = 3, target_box: Optional[Sequence[float]] = None,
                    title: str = "") -> None:
    """Write a PNG: the best-scoring box in green, the next `top_k - 1` in orange, the referred box dashed red,
    with a legend of the kinds drawn.

    boxes [R, 4] are pixel x1y1x2y2 of the valid candidates and scores [R] their logits.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.lines as lines
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    width, height = image_size
    fig, ax = plt.subplots(figsize=(8, 8 * height / width))
    if image:
        ax.imshow(plt.imread(image), extent=(0, width, height, 0))  # a resized photo is scaled to the boxes
    else:
        ax.add_patch(patches.Rectangle((0, 0), width, height, color="0.92"))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    order = np.argsort(-scores)[:top_k]
    for rank, index in reversed(list(enumerate(order))):
        x1, y1, x2, y2 = boxes[index]
        color = CHOSEN if rank == 0 else RUNNER_UP
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=3 if rank == 0 else 1.5,
                                       edgecolor=color))
        ax.text(x1 + 2, y1 + 2, f"#{rank + 1} {scores[index]:.2f}", color="black", fontsize=9, va="top",
                bbox=dict(facecolor=color, alpha=0.8, pad=1, lw=0))
    if target_box is not None:
        x1, y1, x2, y2 = target_box
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2, ls="--", edgecolor=REFERRED))
    legend = [lines.Line2D([], [], color=CHOSEN, lw=3, label="chosen (#1)")]
    if len(order) > 1:
        legend.append(lines.Line2D([], [], color=RUNNER_UP, lw=1.5, label=f"runners-up (#2-#{len(order)})"))
    if target_box is not None:
        legend.append(lines.Line2D([], [], color=REFERRED, lw=2, ls="--", label="referred box"))
    ax.legend(handles=legend, loc="lower right", fontsize=8, framealpha=0.85)
    ax.set_title(f"{title}\n\"{expression}\"" if title else f"\"{expression}\"", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
