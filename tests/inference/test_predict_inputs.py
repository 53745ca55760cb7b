"""What `input=` may name: a folder per modality, a folder of rasters, a list file, a dataset-layout folder (with
the clouds submission written through the same path), and the one-sentence refusals of what does not fit."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from omegaconf import OmegaConf
from rasterio.errors import NotGeoreferencedWarning

from segplat.data.fake import write_fake
from segplat.data.layouts.clouds import MODALITIES as CLOUDS_MODALITIES
from segplat.errors import ConfigError, DataError
from segplat.inference import load_for_inference
from segplat.predict import list_scenes, predict
from segplat.submission import CLOUDS_CLASSES, decode_colour_prediction, read_submission
from tests.inference.checkpoints import PALETTE, write_checkpoint
from tests.inference.scenes import SPECS, scene_arrays, two_grid_checkpoint, write_geotiffs
from tests.inference.test_predict_streaming import compose_predict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return two_grid_checkpoint(tmp_path_factory.mktemp("ckpt") / "two_grids.ckpt")


def stems(cfg_input, loaded) -> list[str]:
    return [s.stem for s in list_scenes(OmegaConf.create({"input": cfg_input, "split": None}), loaded)]


def test_folders_lists_and_mappings_name_the_same_scenes(checkpoint: Path, tmp_path: Path):
    loaded = load_for_inference(checkpoint)
    root = tmp_path / "scenes"
    for i, stem in enumerate(("b", "a", "c.v2")):
        write_geotiffs(root, scene_arrays(70 + 2 * i, 90), stem=stem, by_folder=True)
    assert stems(str(root), loaded) == ["a", "b", "c.v2"]
    assert stems({"rgb": str(root / "rgb"), "coarse": str(root / "coarse")}, loaded) == ["a", "b", "c.v2"]
    scenes = list_scenes(OmegaConf.create({"input": str(root), "split": None}), loaded)
    assert [s.size for s in scenes] == [(72, 90), (70, 90), (74, 90)]  # headers read at listing, pixels not
    listing = tmp_path / "scenes.csv"
    listing.write_text("# two scenes\nrgb,coarse\nscenes/rgb/c.v2.tif,scenes/coarse/c.v2.tif\n\n"
                       f"{root / 'rgb' / 'a.tif'},{root / 'coarse' / 'a.tif'}\n")
    assert stems(str(listing), loaded) == ["c.v2", "a"]
    for given in (str(root), str(listing)):  # split= picks nothing there: it was ignored without a word
        with pytest.raises(ConfigError, match=r"^split=val picks a split of a dataset-layout folder, but input=.* "
                                              r"names raster files, which are all predicted; drop split=\.$"):
            list_scenes(OmegaConf.create({"input": given, "split": "val"}), loaded)

    (root / "coarse" / "b.tif").unlink()
    with pytest.raises(DataError, match=r"b\.tif has no coarse file of the same name"):
        stems(str(root), loaded)
    bad = tmp_path / "bad.csv"
    bad.write_text("rgb,coarse\nscenes/rgb/a.tif\n")
    with pytest.raises(DataError, match=r"bad\.csv line 2 has 1 file"):
        stems(str(bad), loaded)
    bad.write_text("scenes/rgb/a.tif\n")
    with pytest.raises(DataError, match="first line must name the modalities"):
        stems(str(bad), loaded)
    bad.write_text(f"rgb,coarse\n{root / 'rgb' / 'a.tif'},{root / 'coarse' / 'a.tif'}\n"
                   f"{root / 'rgb' / 'a.tif'},{root / 'coarse' / 'a.tif'}\n")
    with pytest.raises(DataError, match=r"two scenes would write a_classes\.tif"):
        stems(str(bad), loaded)
    flat = tmp_path / "flat"
    write_geotiffs(flat, scene_arrays(70, 90), stem="x")
    with pytest.raises(ConfigError, match="holds raster files but the model takes"):
        stems(str(flat), loaded)
    with pytest.raises(ConfigError, match=r"has 3 bands but the model was trained on 2 for coarse .* order \(files "
                                          r"in the synthetic dataset.s own layout, .* input=<the dataset.s root> "):
        stems({"rgb": str(flat / "x_rgb.tif"), "coarse": str(flat / "x_rgb.tif")}, loaded)
    with rasterio.open(flat / "x_rgb.tif") as src:
        profile = {**src.profile, "count": 2}
    with rasterio.open(flat / "fine.tif", "w", **profile) as dst:  # the coarse bands at the fine grid
        dst.write(np.ones((2, 70, 90), np.uint16))  # 90 wide, 70 high: sizes are width x height
    with pytest.raises(DataError, match=r"fine\.tif is 90x70 pixels but the model expects 45x35 for coarse"):
        stems({"rgb": str(flat / "x_rgb.tif"), "coarse": str(flat / "fine.tif")}, loaded)


def test_a_folder_of_rasters_for_a_single_modality_model(tmp_path: Path):
    ckpt = write_checkpoint(tmp_path / "rgb.ckpt", {"rgb": SPECS["rgb"]})
    loaded = load_for_inference(ckpt)
    folder = tmp_path / "in"
    for stem in ("s2", "s1"):
        write_geotiffs(folder, {"rgb": scene_arrays(66, 80)["rgb"]}, stem=stem)
    (folder / "notes.txt").write_text("not a raster")
    assert stems(str(folder), loaded) == ["s1_rgb", "s2_rgb"]
    listing = tmp_path / "list.txt"
    listing.write_text("in/s2_rgb.tif\n")
    assert stems(str(listing), loaded) == ["s2_rgb"]


def test_clouds_layout_folder_and_submission_go_through_the_same_path(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture):
    root = write_fake("clouds", tmp_path / "clouds", num_train=2, num_test=3)
    layout = {"name": "clouds", "layout": {"_target_": "segplat.data.layouts.clouds.CloudsLayout"}}
    ckpt = write_checkpoint(tmp_path / "clouds.ckpt", dict(CLOUDS_MODALITIES), classes=CLOUDS_CLASSES,
                            palette=PALETTE, dataset=layout, patch_size=32)
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="segplat"):
        warnings.simplefilter("always")
        predict(compose_predict([f"ckpt={ckpt}", f"input={root}", "split=test", "submission=clouds",
                                 "progress=false"], out))
    # PNG scenes have no georeference: said once per scene in its log line, not as one GDAL warning per file read
    assert not [w for w in caught if issubclass(w.category, NotGeoreferencedWarning)]
    assert sum("has no georeference" in r.getMessage() for r in caplog.records) == 3
    table = read_submission(out / "submission.csv")
    assert list(table) == ["test_0000.png", "test_0001.png", "test_0002.png"]
    for name, encoded in table.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(out / f"{name[:-4]}_classes.tif") as src:
                classes = src.read(1)
                assert src.crs is None and src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert np.array_equal(decode_colour_prediction(encoded, *classes.shape), classes)
        assert (out / f"{name[:-4]}_overlay.png").is_file()
    per_class = tmp_path / "per_class"
    predict(compose_predict([f"ckpt={ckpt}", f"input={root}", "submission=clouds_per_class", "progress=false",
                             "output.preview_size=0"], per_class))
    assert len(read_submission(per_class / "submission.csv")) == 3 * 3
    assert not list(per_class.glob("*.png"))


def test_a_submission_needs_the_clouds_classes(checkpoint: Path, tmp_path: Path):
    other = write_checkpoint(tmp_path / "other.ckpt", SPECS, classes=("water", "land"), palette=PALETTE[:2])
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"submission=clouds needs a model of the clouds classes"):
        predict(compose_predict([f"ckpt={other}", f"input={tmp_path}", "submission=clouds"], out))
    with pytest.raises(ConfigError, match=r"^output\.blocksize=100 must be an integer of at least 16; a power of two"):
        predict(compose_predict([f"ckpt={checkpoint}", f"input={tmp_path}", "output.blocksize=100"], out))


def test_a_damaged_scene_is_named_and_leaves_no_work_files(checkpoint: Path, tmp_path: Path):
    root = tmp_path / "scenes"
    for stem in ("a", "b"):
        write_geotiffs(root, scene_arrays(202, 170), stem=stem, by_folder=True)
    damaged = root / "rgb" / "b.tif"
    with open(damaged, "r+b") as fh:  # the header stays readable, the last tiles are gone
        fh.truncate(damaged.stat().st_size // 2)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"b\.tif: rows \d+-\d+, columns \d+-\d+ could not be read .* damaged"):
        predict(compose_predict([f"ckpt={checkpoint}", f"input={root}", "window=64", "progress=false"], out))
    assert (out / "a_classes.tif").is_file() and not (out / "b_classes.tif").exists()
    assert not (out / ".partial" / "b").exists()
    first = tmp_path / "first"
    with pytest.raises(DataError, match="could not be read"):
        predict(compose_predict([f"ckpt={checkpoint}", f"input={{rgb: '{damaged}', coarse: "
                                 f"'{root / 'coarse' / 'b.tif'}'}}", "window=64", "progress=false"], first))
    assert not first.exists()  # nothing but Hydra's files would be left: no run folder


@pytest.mark.slow
def test_the_cli_names_a_damaged_file_once_without_gdal_lines(checkpoint: Path, tmp_path: Path):
    """rasterio logs GDAL's error lines at INFO: they were printed above segplat's own sentence, which quotes them."""
    import subprocess
    import sys

    root = tmp_path / "scenes"
    write_geotiffs(root, scene_arrays(202, 170), stem="b", by_folder=True)
    damaged = root / "rgb" / "b.tif"
    with open(damaged, "r+b") as fh:
        fh.truncate(damaged.stat().st_size // 2)
    res = subprocess.run([sys.executable, "-m", "segplat.predict", f"ckpt={checkpoint}", f"input={root}", "window=64",
                          "progress=false", f"paths.log_dir={tmp_path / 'logs'}"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    said = res.stdout + res.stderr
    assert res.returncode == 2 and said.count("error: ") == 1 and "could not be read" in said, said[-3000:]
    assert "GDAL signalled" not in said and "rasterio._err" not in said, said[-3000:]


def test_a_run_folder_resumes_only_the_prediction_it_holds(checkpoint: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch):
    """Complete scenes are skipped on a re-run: with another checkpoint or settings the old outputs would stay
    under a summary naming the new ones, so that is refused; the same command resumes."""
    root = tmp_path / "scenes"
    write_geotiffs(root, scene_arrays(70, 60), stem="a", by_folder=True)
    out = tmp_path / "out"
    base = [f"ckpt={checkpoint}", f"input={root}", "window=32", "progress=false"]
    predict(compose_predict(base, out))
    before = (out / "a_classes.tif").read_bytes()
    predict(compose_predict(base, out))  # the same prediction: resumed, nothing to do
    assert json.loads((out / "summary.json").read_text())["skipped_complete"] == 1
    monkeypatch.chdir(checkpoint.parent)  # a relative ckpt= is stored absolute: it means nothing from elsewhere
    predict(compose_predict([f"ckpt={checkpoint.name}", *base[1:]], out))
    assert json.loads((out / "summary.json").read_text())["checkpoint"] == str(checkpoint.resolve())
    for change in ("tta.flips=true", "overlap=0.5", "window=64"):
        with pytest.raises(ConfigError, match=rf"run folder {out} holds predictions made with other settings \("):
            predict(compose_predict([*base, change], out))
    other = write_checkpoint(tmp_path / "other.ckpt", SPECS, seed=3)
    with pytest.raises(ConfigError, match=r"other settings \(checkpoint: "):
        predict(compose_predict([f"ckpt={other}", *base[1:]], out))
    assert (out / "a_classes.tif").read_bytes() == before


def test_bands_are_read_by_their_descriptions(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A file whose band descriptions name the model's bands is read by name: in another order (blue, green, red
    for a red-green-blue model) or among more bands (all of a sensor's for a model trained on some)."""
    ckpt = write_checkpoint(tmp_path / "rgb.ckpt", {"rgb": SPECS["rgb"]})
    rgb = scene_arrays(66, 80)["rgb"]
    plain = write_geotiffs(tmp_path / "plain", {"rgb": rgb})["rgb"]
    files = {}
    for name, order, extra in (("swapped", [2, 1, 0], 0), ("more", [0, 1, 2], 2)):
        path = tmp_path / name / "scene_rgb.tif"
        path.parent.mkdir()
        with rasterio.open(plain) as src:
            profile = {**src.profile, "count": 3 + extra}
        stack = np.concatenate([rgb[order], np.full((extra, *rgb.shape[1:]), 7, rgb.dtype)]) if extra else rgb[order]
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(stack)
            dst.descriptions = (*[SPECS["rgb"].bands[i] for i in order], *[f"extra{k}" for k in range(extra)])
        files[name] = path
    outputs = {}
    for name, path in {"plain": plain, **files}.items():
        with caplog.at_level(logging.INFO, logger="segplat"):
            predict(compose_predict([f"ckpt={ckpt}", f"input={path}", "progress=false"], tmp_path / f"out_{name}"))
        with rasterio.open(tmp_path / f"out_{name}" / "scene_rgb_classes.tif") as src:
            outputs[name] = src.read(1)
    assert np.array_equal(outputs["swapped"], outputs["plain"]) and np.array_equal(outputs["more"], outputs["plain"])
    assert any("bands [3, 2, 1] by their descriptions" in r.getMessage() for r in caplog.records)


def test_a_window_of_gigabytes_is_refused_in_one_sentence(checkpoint: Path, tmp_path: Path):
    """window=100000 tried to allocate 74.5 GiB of blend weights (a numpy MemoryError traceback)."""
    from segplat.inference import MAX_WINDOW, SlidingWindowPredictor

    loaded = load_for_inference(checkpoint)
    with pytest.raises(ConfigError, match=r"^window=100000 is larger than 8192 px: one window's weights and logits "
                                          r"alone would take \d+\.\d GiB; .* patch size \(\d+\)\.$"):
        SlidingWindowPredictor(loaded, window=100000)
    assert MAX_WINDOW == 8192 and SlidingWindowPredictor(loaded, window=1024).window == 1024


def test_layout_scenes_are_named_after_the_sample_not_its_label_file(tmp_path: Path):
    """Sen1Floods11 through its layout wrote Spain_226704_LabelHand_classes.tif (the label file's name)."""
    from segplat.data.layouts.sen1floods11 import Sen1Floods11Layout

    root = write_fake("sen1floods11", tmp_path / "s1f")
    layout = Sen1Floods11Layout(str(root))
    layout_cfg = {"name": "sen1floods11",
                  "layout": {"_target_": "segplat.data.layouts.sen1floods11.Sen1Floods11Layout"}}
    ckpt = write_checkpoint(tmp_path / "s1f.ckpt", layout.modalities, classes=layout.classes, palette=PALETTE[:2],
                            dataset=layout_cfg, patch_size=32)
    split = next(iter(layout.scan()))
    out = tmp_path / "out"
    predict(compose_predict([f"ckpt={ckpt}", f"input={root}", f"split={split}", "progress=false", "limit=2",
                             "output.preview_size=0"], out))
    made = sorted(p.name for p in out.glob("*_classes.tif"))
    assert made and not [n for n in made if "LabelHand" in n]
    assert all(n[:-len("_classes.tif")] in {r.id for r in layout.scan()[split]} for n in made), made


def test_an_input_georeferenced_by_gcps_gives_outputs_with_them(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Raw S1 GRD and L1 products ship with GCPs only: the outputs had no georeference at all."""
    from rasterio.control import GroundControlPoint

    ckpt = write_checkpoint(tmp_path / "rgb.ckpt", {"rgb": SPECS["rgb"]})
    rgb = scene_arrays(66, 80)["rgb"]
    gcps = [GroundControlPoint(r, c, 10.0 + c / 800, 50.0 - r / 660) for r in (0, 66) for c in (0, 80)]
    path = tmp_path / "grd.tif"
    with rasterio.open(path, "w", driver="GTiff", height=66, width=80, count=3, dtype="uint16", gcps=gcps,
                       crs="EPSG:4326") as dst:
        dst.write(rgb)
    with caplog.at_level(logging.INFO, logger="segplat"):
        predict(compose_predict([f"ckpt={ckpt}", f"input={path}", "progress=false", "probabilities=uint8"],
                                tmp_path / "out"))
    assert any("georeferenced by 4 ground control points, which the outputs carry too" in r.getMessage()
               for r in caplog.records)
    for name in ("grd_classes.tif", "grd_probs.tif"):
        with rasterio.open(tmp_path / "out" / name) as out:
            points, crs = out.gcps
            assert crs == "EPSG:4326" and out.crs is None
            assert [(g.row, g.col, g.x, g.y) for g in points] == [(g.row, g.col, g.x, g.y) for g in gcps]


def test_folders_named_per_modality_pair_by_the_names_without_their_shared_affixes(checkpoint: Path, tmp_path: Path):
    """Sen1Floods11's S1Hand/S2Hand files differ by suffix (`X_S1Hand.tif`, `X_S2Hand.tif`): refused as unmatched."""
    loaded = load_for_inference(checkpoint)
    root = tmp_path / "scenes"
    for stem in ("Bolivia_103757", "Spain_226704"):
        write_geotiffs(root, scene_arrays(40, 50), stem=stem, by_folder=True)
    for folder, tag in (("rgb", "S1Hand"), ("coarse", "S2Hand")):
        for p in sorted((root / folder).glob("*.tif")):
            p.rename(p.with_name(f"{p.stem}_{tag}.tif"))
    pair = {"rgb": str(root / "rgb"), "coarse": str(root / "coarse")}
    assert stems(pair, loaded) == ["Bolivia_103757", "Spain_226704"]  # the outputs are named after the scene
    (root / "coarse" / "Spain_226704_S2Hand.tif").rename(root / "coarse" / "Spain_999999_S2Hand.tif")
    with pytest.raises(DataError, match=r"Spain_226704_S1Hand\.tif has no coarse file of the same name in .*, nor one "
                                        r"that differs only by a prefix or suffix"):
        stems(pair, loaded)
