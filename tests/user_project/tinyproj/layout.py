"""The user's own on-disk format: per sample `<split>/<id>.image.npy` (3 uint16 bands), `<id>.elevation.npy`
(1 float32 band) and `<id>.label.npy` (uint8 classes, 255 = no label)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segplat.data.layouts.base import Layout, ModalitySpec, Sample, SampleRef
from segplat.errors import DataError

CLASSES = ("ground", "roof", "tree")


class TinyLayout(Layout):
    name = "tinydata"
    classes = CLASSES
    palette = ((80, 80, 80), (220, 60, 60), (40, 160, 40))
    ignore_index = 255

    def __init__(self, root: str | None = None, elevation_nodata: float = -9999.0) -> None:
        super().__init__(root)
        self.elevation_nodata = float(elevation_nodata)

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return {"image": ModalitySpec(("red", "green", "blue"), nodata=0, dtype="uint16"),
                "elevation": ModalitySpec(("height",), nodata=self.elevation_nodata, dtype="float32", optical=False)}

    def scan(self) -> dict[str, list[SampleRef]]:
        found = {}
        for split in self.splits:
            folder = Path(str(self.root)) / split
            labels = sorted(folder.glob("*.label.npy"))
            if not labels:
                raise DataError(f"{folder} holds no *.label.npy files; write the {split} split there.")
            found[split] = [SampleRef(p.name.removesuffix(".label.npy"),
                                      {k: str(p.with_name(p.name.replace(".label.", f".{k}.")))
                                       for k in ("image", "elevation", "label")}) for p in labels]
        return found

    def read(self, ref: SampleRef) -> Sample:
        arrays = {m: np.load(ref.files[m]) for m in ("image", "elevation")}
        return Sample(arrays=arrays, label=np.load(ref.files["label"]), source=ref.files["label"])

    def fingerprint_params(self) -> dict:
        return {**super().fingerprint_params(), "elevation_nodata": self.elevation_nodata}


def write_fake(root: str | Path, scenes: int = 6, size: int = 64, seed: int = 0) -> Path:
    """Scenes where roofs are bright and high, trees green and mid-high: learnable from both modalities."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (("train", scenes), ("val", max(2, scenes // 3))):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            label = np.zeros((size, size), np.uint8)
            for cls in (1, 2):
                for _ in range(3):
                    y, x = rng.integers(0, size - 12, 2)
                    label[y:y + 12, x:x + 12] = cls
            label[:2] = 255  # a strip without labels
            image = rng.integers(200, 400, (3, size, size)).astype(np.uint16)
            image[:, label == 1] += 2000
            image[1, label == 2] += 1500
            height = rng.normal(0, 0.5, (1, size, size)).astype(np.float32) + 8 * (label == 1) + 4 * (label == 2)
            np.save(root / split / f"s{i:02d}.image.npy", image)
            np.save(root / split / f"s{i:02d}.elevation.npy", height)
            np.save(root / split / f"s{i:02d}.label.npy", label)
    return root
