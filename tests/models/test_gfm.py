"""Prithvi-EO-2.0 and TerraMind encoders built through TerraTorch's registry (the `gfm` extra) at their smallest
sizes with random weights: forward + backward in the Segmenter, band and modality mapping, strict weight loading
from files in the published formats (TerraTorch's own MAE / ViT modules write them), freezing and LR groups."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import subprocess
import sys
from typing import ClassVar

import pytest
import torch

from segplat.errors import CheckpointError, ConfigError
from segplat.models import Segmenter
from segplat.models.decoders import UNetDecoder
from segplat.models.encoders.gfm import PrithviEncoder, TerraMindEncoder
from segplat.models.encoders.gfm.encoders import import_terratorch
from segplat.optim import build_optimizer
from tests.conftest import REPO
from tests.models.base_tester import ModelTester

# the import itself (seconds) waits for the first test that builds a GFM: collection stays quick in every process
if importlib.util.find_spec("terratorch") is None:
    pytest.skip('the gfm extra is not installed (pip install -e ".[gfm]")', allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _terratorch() -> None:
    import_terratorch()  # through segplat's import: TerraTorch's own import changes torch's fp32 precision


S2 = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
S1 = ["VV", "VH"]
HLS_FROM_S2 = ["B2", "B3", "B4", "B8A", "B11", "B12"]
PRITHVI = functools.partial(PrithviEncoder, name="prithvi_eo_v2_tiny_tl")
TERRAMIND = functools.partial(TerraMindEncoder, name="terramind_v1_tiny", modality_map={"s2": "S2L1C", "s1": "S1GRD"})
DECODER = functools.partial(UNetDecoder, channels=(32, 16, 16))


def band_names(modalities) -> dict[str, list[str]]:
    """Real Sentinel band names where the channel count fits, made-up ones (all extras) otherwise."""
    real = {"s2": S2, "s1": S1}
    return {m: real[m] if len(real.get(m, ())) == c else [f"{m}_x{i}" for i in range(c)] for m, c in modalities.items()}


def segmenter(encoder, modalities, fusion=None, **kwargs):
    return Segmenter(modalities, 3, functools.partial(encoder, **kwargs), DECODER, fusion, bands=band_names(modalities))


class GFMTester(ModelTester):
    modalities: ClassVar[dict[str, int]] = {"s2": 13, "s1": 2}
    size = 32
    num_classes = 3
    fusions = ({"level": "early"}, {"level": "mid"})
    other_channels = (3,)
    require_groups = ("encoder", "decoder")
    encoder = None

    def build(self, modalities, num_classes, fusion=None):
        # made-up bands (other_channels) reach the GFM as learned extras; its pretrained ones are then zeros
        return Segmenter(modalities, num_classes, functools.partial(self.encoder, missing_bands="zero",
                                                                    extra_bands="learn"),
                         DECODER, fusion, bands=band_names(modalities))


class TestPrithviSegmenter(GFMTester):
    encoder = PRITHVI
    param_range = (5_000_000, 7_000_000)  # the 5.6M tiny ViT + neck + a small U-Net decoder


class TestTerraMindSegmenter(GFMTester):
    encoder = TERRAMIND
    param_range = (5_500_000, 7_500_000)  # the 6.1M tiny ViT + neck + a small U-Net decoder


def capture_inputs(model) -> list[dict[str, torch.Tensor]]:
    """Record what each GFM backbone is fed."""
    seen: list[dict[str, torch.Tensor]] = []
    for enc in model.encoders.values():
        run = enc.run_backbone

        def spy(inputs, run=run):
            seen.append({k: v.detach().clone() for k, v in inputs.items()})
            return run(inputs)
        enc.run_backbone = spy
    return seen


def channel_ids(c: int, size: int = 32) -> torch.Tensor:
    """A batch whose channel i holds the value i + 1 everywhere."""
    return (torch.arange(c, dtype=torch.float32) + 1).view(1, c, 1, 1).expand(1, c, size, size).clone()


def test_prithvi_gets_its_six_bands_from_the_matching_channels_in_any_order():
    shuffled = ["B12", "B8", "B3", "B8A", "B1", "B2", "B11", "B4"]
    model = Segmenter({"s2": 8}, 3, PRITHVI, DECODER, bands={"s2": shuffled}).eval()
    seen = capture_inputs(model)
    with torch.no_grad():
        model({"s2": channel_ids(8)})
    fed = seen[0]["image"][0, :, 0, 0].tolist()
    assert fed == [shuffled.index(b) + 1 for b in HLS_FROM_S2]  # BLUE GREEN RED NIR_NARROW SWIR_1 SWIR_2


def test_missing_and_extra_band_refused_then_zero_filled_and_dropped(caplog):
    """The issue's check: a band mapping with a missing (B12) and an extra (B9 ... and S1) band."""
    bands = {"s2": ["B2", "B3", "B4", "B8A", "B11", "B9"], "s1": S1}
    with pytest.raises(ConfigError, match=r"no band for SWIR_2 \(B12\)") as err:
        Segmenter({"s2": 6, "s1": 2}, 3, PRITHVI, DECODER, bands=bands)
    assert err.value.args[0].count(". ") == 0
    with caplog.at_level(logging.INFO, logger="segplat.models.encoders.gfm.bands"):
        model = Segmenter({"s2": 6, "s1": 2}, 3, functools.partial(PRITHVI, missing_bands="zero"), DECODER,
                          bands=bands).eval()
    drops = [r.getMessage() for r in caplog.records if "drops" in r.getMessage()]
    assert len(drops) == 1 and "s2.B9, s1.VV, s1.VH" in drops[0]
    seen = capture_inputs(model)
    with torch.no_grad():
        model({"s2": channel_ids(6), "s1": channel_ids(2) * 10})
    fed = seen[0]["image"][0, :, 0, 0].tolist()
    assert fed == [1, 2, 3, 4, 5, 0]  # B2 B3 B4 B8A B11, zeros for B12; B9 and S1 not fed


def test_an_input_of_zeros_only_is_refused():
    with pytest.raises(ConfigError, match=r"no dataset band reaches Prithvi prithvi_eo_v2_tiny_tl's image input"):
        Segmenter({"s1": 2}, 3, functools.partial(PRITHVI, missing_bands="zero"), DECODER, bands={"s1": S1})


def test_terramind_takes_each_modality_as_its_own_input_with_exact_bands():
    model = segmenter(TERRAMIND, {"s2": 13, "s1": 2}).eval()
    seen = capture_inputs(model)
    with torch.no_grad():
        model({"s2": channel_ids(13), "s1": channel_ids(2)})
    assert set(seen[0]) == {"S2L1C", "S1GRD"}
    assert seen[0]["S2L1C"][0, :, 0, 0].tolist() == list(range(1, 14))
    assert seen[0]["S1GRD"][0, :, 0, 0].tolist() == [1, 2]
    # mid fusion: one TerraMind per stream, each with its own input only
    mid = segmenter(TERRAMIND, {"s2": 13, "s1": 2}, {"level": "mid"})
    assert [list(e.input_bands) for e in mid.encoders.values()] == [["S2L1C"], ["S1GRD"]]


def test_terramind_modality_map_errors_name_the_modality():
    with pytest.raises(ConfigError, match="modality_map has no TerraMind input for dataset modality s1"):
        segmenter(TERRAMIND, {"s2": 13, "s1": 2}, modality_map={"s2": "S2L1C"})
    with pytest.raises(ConfigError, match="names S3OLCI, which are not TerraMind raw inputs"):
        segmenter(TERRAMIND, {"s2": 13, "s1": 2}, modality_map={"s2": "S3OLCI", "s1": "S1GRD"})
    with pytest.raises(ConfigError, match="sends several dataset modalities to S1GRD"):
        segmenter(TERRAMIND, {"s2": 13, "s1": 2}, modality_map={"s2": "S1GRD", "s1": "S1GRD"})
    no_cirrus = [b for b in S2 if b != "B10"]
    with pytest.raises(ConfigError, match=r"S2L1C input was pretrained on .* no band for CIRRUS \(B10\)"):
        Segmenter({"s2": 12}, 3, TERRAMIND, DECODER, bands={"s2": no_cirrus})
    l2a = Segmenter({"s2": 12}, 3, functools.partial(TERRAMIND, modality_map={"s2": "S2L2A"}), DECODER,
                    bands={"s2": no_cirrus})  # L2A products have no cirrus band: an exact match
    assert list(l2a.encoders["stack"].input_bands) == ["S2L2A"]


def test_unknown_model_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match=r"name='prithvi_eo_v9'.*prithvi_eo_v2_300"):
        segmenter(PrithviEncoder, {"s2": 13}, name="prithvi_eo_v9")
    with pytest.raises(ConfigError, match=r"name='terramind_v1_huge'.*terramind_v1_tiny"):
        segmenter(TERRAMIND, {"s2": 13}, name="terramind_v1_huge")


def test_out_indices_and_interpolate_neck():
    model = segmenter(PRITHVI, {"s2": 13}, out_indices=[3, 7, 11, -1], neck="interpolate", neck_channels=16)
    enc = model.encoders["stack"]
    assert enc.out_indices == [3, 7, 11, 11] and enc.out_channels == [16] * 4 and enc.reductions == [4, 8, 16, 32]
    with pytest.raises(ConfigError, match="out_indices=\\[1, 2\\] must name 4 blocks"):
        segmenter(PRITHVI, {"s2": 13}, out_indices=[1, 2])


@pytest.mark.parametrize("encoder, fusion", [
    (PRITHVI, {"level": "early"}),  # a _tl variant: its time/location encodings would get no gradient
    (functools.partial(TERRAMIND, merge="concat"), {"level": "early"}),  # concat's missing-input token neither
    (TERRAMIND, {"level": "late"}),
], ids=["prithvi_tl", "terramind_concat", "terramind_late"])
def test_every_parameter_gets_a_gradient(encoder, fusion):
    """DDP runs with find_unused_parameters=False: a parameter the forward never uses would stall it."""
    model = segmenter(encoder, {"s2": 13, "s1": 2}, fusion)
    model({"s2": torch.randn(1, 13, 32, 32), "s1": torch.randn(1, 2, 32, 32)})["out"].sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# -- weights --------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # over a second: in the full run, not the local loop
def test_prithvi_loads_the_encoder_of_a_prithvi_mae_checkpoint(tmp_path):
    from terratorch.registry import FULL_MODEL_REGISTRY

    torch.manual_seed(1)
    mae = FULL_MODEL_REGISTRY.build("terratorch_prithvi_eo_v2_tiny_tl_mae", pretrained=False, num_frames=1)
    path = tmp_path / "Prithvi_EO_V2_tiny_TL.pt"
    torch.save(mae.state_dict(), path)
    ref = mae.state_dict()
    # S1 bands learned as new channels beside the six pretrained ones
    model = segmenter(PRITHVI, {"s2": 13, "s1": 2}, pretrained=str(path), extra_bands=S1)
    vit = model.encoders["stack"].backbone.state_dict()
    assert torch.equal(vit["blocks.3.attn.qkv.weight"], ref["encoder.blocks.3.attn.qkv.weight"])
    assert torch.equal(vit["norm.weight"], ref["encoder.norm.weight"])
    proj = vit["patch_embed.proj.weight"]
    assert proj.shape[1] == 8 and torch.equal(proj[:, :6], ref["encoder.patch_embed.proj.weight"])
    assert not torch.equal(proj[:, 6], proj[:, 0])
    # the same file through a folder named as the Hugging Face cache would hold it
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "Prithvi_EO_V2_tiny_TL.pt").write_bytes(path.read_bytes())
    again = segmenter(PRITHVI, {"s2": 13}, pretrained=str(folder))
    assert torch.equal(again.encoders["stack"].backbone.state_dict()["blocks.0.mlp.fc1.weight"],
                       ref["encoder.blocks.0.mlp.fc1.weight"])


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    from terratorch.registry import BACKBONE_REGISTRY

    other = BACKBONE_REGISTRY.build("terratorch_prithvi_eo_tiny", pretrained=False, num_frames=1)  # 4 blocks, dim 256
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"is not a Prithvi prithvi_eo_v2_tiny_tl .* checkpoint: it lacks "
                                              r"blocks\.10.*has other shapes"):
        segmenter(PRITHVI, {"s2": 13}, pretrained=str(path))


def terramind_file(tmp_path, modalities) -> tuple:
    """A TerraMind file as published: the encoder of every raw input plus any-to-any parts this encoder lacks."""
    from terratorch.registry import BACKBONE_REGISTRY

    torch.manual_seed(2)
    full = BACKBONE_REGISTRY.build("terratorch_terramind_v1_tiny", pretrained=False, modalities=modalities)
    state = dict(full.state_dict())
    state["decoder.0.mlp.fc1.weight"] = torch.randn(4, 4)
    state["decoder_embeddings.tok_lulc@224.emb"] = torch.randn(2)
    state["mask_token"] = torch.randn(1, 1, 192)
    path = tmp_path / "TerraMind_v1_tiny.pt"
    torch.save(state, path)
    return path, state


def test_terramind_loads_its_inputs_from_a_full_checkpoint_and_refuses_a_missing_input(tmp_path):
    path, state = terramind_file(tmp_path, ["S2L1C", "S2L2A", "S1GRD", "S1RTC", "DEM"])
    model = segmenter(TERRAMIND, {"s2": 13, "s1": 2}, pretrained=str(path))
    mine = model.encoders["stack"].backbone.state_dict()
    for key in ("encoder.5.attn.qkv.weight", "encoder_embeddings.untok_sen2l1c@224.proj.weight",
                "encoder_embeddings.untok_sen1grd@224.proj.weight", "encoder_norm.weight"):
        assert torch.equal(mine[key], state[key]), key
    without_s1, _ = terramind_file(tmp_path, ["S2L1C"])
    with pytest.raises(CheckpointError, match=r"lacks encoder_embeddings\.untok_sen1grd@224"):
        segmenter(TERRAMIND, {"s2": 13, "s1": 2}, pretrained=str(without_s1))


def test_terramind_learned_extra_band_keeps_the_pretrained_patch_weights(tmp_path):
    path, state = terramind_file(tmp_path, ["S1GRD"])
    model = Segmenter({"s1": 3}, 3, functools.partial(TERRAMIND, pretrained=str(path), extra_bands="learn",
                                                      modality_map={"s1": "S1GRD"}),
                      DECODER, bands={"s1": ["VV", "VH", "ratio"]})
    proj = model.encoders["stack"].backbone.encoder_embeddings["untok_sen1grd@224"].proj.weight
    old = state["encoder_embeddings.untok_sen1grd@224.proj.weight"]
    assert proj.shape == (192, 16 * 16 * 3)
    assert torch.equal(proj.view(192, 256, 3)[..., :2], old.view(192, 256, 2))
    with torch.no_grad():
        assert model({"s1": torch.randn(1, 3, 32, 32)})["out"].shape == (1, 3, 32, 32)


# -- freezing and learning rates --------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", [PRITHVI, TERRAMIND], ids=["prithvi", "terramind"])
def test_vit_is_the_encoder_group_and_the_neck_trains_with_the_decoder(encoder):
    model = segmenter(encoder, {"s2": 13, "s1": 2})
    groups = {g: [n for n, _ in ps] for g, ps in model.grouped_parameters().items()}
    assert groups["encoder"] and all(n.startswith("encoders.stack.backbone.") for n in groups["encoder"])
    assert any(n.startswith("encoders.stack.neck.") for n in groups["decoder"])
    opt = build_optimizer(model, lr=1e-3, encoder_lr=1e-5)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["encoder"] == lrs["encoder_no_decay"] == 1e-5 and lrs["decoder"] == 1e-3
    vit = {id(p) for _, p in model.grouped_parameters()["encoder"]}
    assert {id(p) for g in opt.param_groups if g["name"].startswith("encoder") for p in g["params"]} == vit


@pytest.mark.parametrize("encoder", [PRITHVI, TERRAMIND], ids=["prithvi", "terramind"])
def test_frozen_encoder_stays_fixed_while_the_neck_learns_then_unfreezes(encoder):
    torch.manual_seed(0)
    model = segmenter(encoder, {"s2": 13, "s1": 2}).train()
    vit = [p for _, p in model.grouped_parameters()["encoder"]]
    neck = [p for n, p in model.named_parameters() if ".neck." in n]
    for p in vit:  # what callbacks=finetune does before the switch
        p.requires_grad_(False)
    opt = build_optimizer(model, lr=1e-2, frozen=("encoder",))
    before_vit = [p.detach().clone() for p in vit]
    before_neck = [p.detach().clone() for p in neck]
    x = {"s2": torch.randn(2, 13, 32, 32), "s1": torch.randn(2, 2, 32, 32)}
    model(x)["out"].mean().backward()
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before_vit, vit))
    assert any(not torch.equal(a, p) for a, p in zip(before_neck, neck))
    for p in vit:  # the switch
        p.requires_grad_(True)
    opt = build_optimizer(model, lr=1e-2)
    opt.zero_grad()
    model(x)["out"].mean().backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before_vit, vit))


# -- end to end: the comparison preset on fake Sen1Floods11, then prediction from the checkpoint -------------------
@pytest.mark.slow
def test_comparison_preset_trains_on_fake_sen1floods11_and_predicts_from_its_checkpoint(tmp_path):
    import subprocess
    import sys

    from segplat.data.fake.sen1floods11 import write_fake
    from segplat.inference import load_for_inference
    from segplat.train import train
    from tests.conftest import REPO, compose_train

    root = write_fake(tmp_path / "s1f11")
    common = ["experiment=sen1floods11_gfm", f"dataset.root={root}", "debug=fast", "logger=none",
              "dataset.tile_size=64", "dataset.patch_size=64", "dataset.batch_size=4", "dataset.val_batch_size=4",
              "trainer=cpu", "callbacks.visuals=null", "callbacks.report=null"]
    from tests.test_finetune import Probe

    runs = {
        # encoder frozen for 2 epochs, then fine-tuned (callbacks=finetune, as for timm encoders)
        "terramind": ["model=terramind", "model.encoder.name=terramind_v1_tiny", "callbacks=finetune",
                      "trainer.max_epochs=3", "callbacks.finetune.patience=null", "callbacks.finetune.unfreeze_epoch=3",
                      "callbacks.finetune.encoder_lr=1e-5", "+callbacks.probe._target_=tests.test_finetune.Probe"],
        "prithvi_s1": ["model=prithvi", "model.encoder.name=prithvi_eo_v2_tiny_tl", "dataset.modalities=[s1]",
                       "model.encoder.missing_bands=zero", "model.encoder.extra_bands=[VV,VH]"],
    }
    Probe.log.clear()
    for name, overrides in runs.items():
        score = train(compose_train([*common, *overrides], output_dir=tmp_path / name))
        assert score == score  # a number, not NaN
        loaded = load_for_inference(tmp_path / name)  # rebuilt from the checkpoint with the stored band names
        encoder = loaded.model.encoders["stack"]
        x = {m: torch.randn(1, len(loaded.specs[m].bands), 40, 40) for m in loaded.modalities}
        with torch.no_grad():
            assert loaded.model(x)["out"].shape == (1, 2, 40, 40)
        if name == "terramind":
            assert list(encoder.input_bands) == ["S2L1C", "S1GRD"]
            log = list(Probe.log)
            assert [e["enc_in_opt"] for e in log] == [False, False, True]
            assert log[0]["enc_sum"] == log[1]["enc_sum"] != log[2]["enc_sum"]  # frozen, frozen, fine-tuned
            assert "encoder" not in log[1]["lrs"] and {"encoder", "encoder_no_decay"} <= set(log[2]["lrs"])
        else:
            assert encoder.input_bands["image"][-2:] == ("s1.VV", "s1.VH")
    script = REPO / "benchmarks" / "gfm_comparison.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "terramind"), str(tmp_path / "prithvi_s1"),
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "comparison.md").read_text()
    assert "| Prithvi prithvi_eo_v2_tiny_tl | s1 |" in table and "| TerraMind terramind_v1_tiny | s2+s1 |" in table
    assert "IoU water | IoU dry" in table


@pytest.mark.slow
def test_importing_terratorch_leaves_the_process_as_it_was() -> None:
    """TerraTorch's import calls torch.set_float32_matmul_precision("medium") (bf16 matmuls on CPU), sets
    TORCH_CUDNN_V8_API_DISABLED and hides warnings; segplat's import puts all back. In a fresh process, since
    this one has imported TerraTorch already."""
    code = ("import torch, importlib\n"
            "from segplat.models.encoders.gfm.encoders import terratorch_registry\n"
            "terratorch_registry()\n"
            "import terratorch\n"
            "print(torch.get_float32_matmul_precision(), torch.backends.mkldnn.matmul.fp32_precision)\n"
            "import os, warnings\n"
            "print(os.environ.get('TORCH_CUDNN_V8_API_DISABLED'), "
            "any(f[2].__name__ == 'NotGeoreferencedWarning' for f in warnings.filters))\n"
            "importlib.reload(importlib.import_module('terratorch.models.backbones.clay_v15.model'))\n"
            "print(torch.get_float32_matmul_precision())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split("\n")
    assert out[0] == "highest none"
    assert out[1] == "None False"  # no environment variable and no warning filter left behind
    assert out[2] == "medium"  # what TerraTorch's module does without segplat's guard: the guard is needed


def test_bands_a_gfm_cannot_map_stop_training_before_the_store_is_prepared(tmp_path, monkeypatch):
    """The model is built from the layout's description (band names) before any data work: Prithvi on the synthetic
    RGB + NIR data with missing_bands=error (no SWIR) is refused in one sentence and no store is written."""
    from segplat.train import train
    from tests.conftest import compose_train

    monkeypatch.setenv("SEGPLAT_CACHE", str(tmp_path / "cache"))
    cfg = compose_train(["model=prithvi", "model.encoder.name=prithvi_eo_v2_tiny_tl",
                         "model.encoder.band_map={nir: NIR_NARROW}", f"paths.store_dir={tmp_path / 'stores'}",
                         "logger=none"], output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="SWIR_1") as err:
        train(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").iterdir())
