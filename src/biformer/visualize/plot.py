"""Drawing routing panels with matplotlib (object-oriented API: no pyplot, no global state)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch.nn as nn
from PIL import Image

from .._optional import require
from .panels import Point, RoutingPanel, _load_image, explain_routing

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_routing", "show_routing"]

QUERY_STYLE = dict(fill=False, edgecolor="white", linestyle="--", linewidth=2.0)
ROUTED_STYLE = dict(fill=False, edgecolor="#00e5ff", linewidth=1.4)
RANK_STYLE = dict(color="black", fontsize=7, ha="left", va="top")
RANK_BOX = dict(boxstyle="square,pad=0.1", facecolor="#00e5ff", edgecolor="none", alpha=0.9)


def _matplotlib(module_name: str) -> ModuleType:
    return require(module_name, extra="cli", purpose="drawing routing pictures")


def _draw_panel(ax: Axes, image: np.ndarray, panel: RoutingPanel) -> None:
    rectangle = _matplotlib("matplotlib.patches").Rectangle
    width, height = panel.image_size
    extent = (0, width, height, 0)
    ax.imshow(image, extent=extent)
    heat = panel.heat.float().numpy()
    heat = np.ma.masked_where(heat <= 0, heat)  # tokens the query does not attend to stay uncoloured
    ax.imshow(heat, extent=extent, cmap="inferno", alpha=0.55, interpolation="nearest", vmin=0,
              vmax=max(float(panel.heat.max()), 1e-12)).set_gid("attention")
    query_box = panel.region_box(panel.query_region)
    x0, y0, x1, y1 = query_box
    ax.add_patch(rectangle((x0, y0), x1 - x0, y1 - y0, gid=f"query:{panel.query_region}", **QUERY_STYLE))
    for rank, region in enumerate(panel.routed_regions, 1):
        box = panel.region_box(region)
        if box is None:  # entirely in the padding: nothing of the image to outline
            continue
        x0, y0, x1, y1 = box
        ax.add_patch(rectangle((x0, y0), x1 - x0, y1 - y0, gid=f"routed:{rank}:{region}", **ROUTED_STYLE))
        ax.text(x0 + 1, y0 + 1, str(rank), bbox=RANK_BOX, gid=f"rank:{rank}:{region}", **RANK_STYLE)
    ax.plot([panel.point[0]], [panel.point[1]], marker="*", markersize=13, color="lime", markeredgecolor="black",
            gid="point")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    topk, regions = len(panel.routed_regions), panel.grid.num_regions
    note = f", {len(panel.padding_ranks)} in padding" if panel.padding_ranks else ""
    ax.set_title(
        f"{panel.layer}  point ({panel.point[0]:g}, {panel.point[1]:g})\n"
        f"top-{topk} of {regions} regions ({panel.grid.grid_h}x{panel.grid.grid_w}){note}",
        fontsize=8,
    )


def plot_routing(image: Image.Image | str | os.PathLike, panels: Sequence[Sequence[RoutingPanel]]) -> Figure:
    """A grid of pictures, one row per query point and one column per layer (see :func:`explain_routing`).

    Each picture shows the image, the query token's attention over its routed keys (colour, mean over heads),
    its region (white, dashed), its routed regions (cyan, numbered by rank: 1 = highest routing score;
    regions clipped to the image, regions entirely in the padding counted in the title) and the point (star).

    Artists carry ids for programmatic checks: ``"query:<region>"``, ``"routed:<rank>:<region>"``,
    ``"rank:<rank>:<region>"``, ``"attention"``, ``"point"`` (``artist.get_gid()``).
    """
    if not panels or not panels[0]:
        raise ValueError("panels: expected at least one row with one panel")
    figure_class = _matplotlib("matplotlib.figure").Figure  # before the image is read
    pixels = np.asarray(_load_image(image))
    rows, columns = len(panels), len(panels[0])
    width, height = panels[0][0].image_size
    panel_width = 3.2
    figure = figure_class(figsize=(columns * panel_width, rows * (panel_width * height / width + 0.5)),
                          layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for row_panels, row_axes in zip(panels, axes):
        for panel, ax in zip(row_panels, row_axes):
            _draw_panel(ax, pixels, panel)
    figure.suptitle(
        "BRA routing: query region dashed, routed regions numbered by rank (1 = highest score), "
        "colour = the query token's attention",
        fontsize=8,
    )
    return figure


def show_routing(
    model: nn.Module,
    image: Image.Image | str | os.PathLike,
    points: Sequence[Point],
    layers: Sequence[str] | None = None,
    image_size: int | None = None,
) -> Figure:
    """:func:`explain_routing` then :func:`plot_routing`: the routing picture of ``model`` on ``image``.

    Example::

        figure = biformer.visualize.show_routing(model, "cat.jpg", points=[(120, 80), (40, 200)])
        figure.savefig("routing.png", dpi=150)
    """
    image = _load_image(image)
    return plot_routing(image, explain_routing(model, image, points, layers=layers, image_size=image_size))
