"""What the fake-data writers share: label maps of smooth blobs that imagery can be drawn from."""

from __future__ import annotations

import numpy as np


def fake_scene(rng: np.random.Generator, height: int, width: int, num_classes: int) -> np.ndarray:
    """A label map of smooth blobs (classes 0..K-1) that imagery can be drawn from."""
    import cv2

    noise = rng.standard_normal((height, width)).astype(np.float32)
    field = cv2.GaussianBlur(noise, (0, 0), sigmaX=max(height, width) / 10, borderType=cv2.BORDER_REFLECT)
    edges = np.quantile(field, np.linspace(0, 1, num_classes + 1)[1:-1])
    return np.digitize(field, edges).astype(np.uint8)
