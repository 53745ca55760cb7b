"""The training prediction panels carry a legend: each class name with its palette colour."""

from __future__ import annotations

import matplotlib
import numpy as np

from segplat.engine.visuals import panel_figure

matplotlib.use("Agg")


def test_panels_have_a_legend_of_class_names_and_colours():
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    classes = ["clear", "thick_cloud", "thin_cloud", "cloud_shadow"]
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [255, 255, 0]]
    img = np.zeros((8, 8, 3), np.uint8)
    fig = panel_figure([[("rgb", img), ("label", img), ("prediction", img)]] * 2, classes, palette, "epoch 1")
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == classes
    colours = [to_rgb(h.get_facecolor()) for h in legend.legend_handles]
    assert np.allclose(np.array(colours) * 255, palette)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["rgb", "label", "prediction"]
    plt.close(fig)
