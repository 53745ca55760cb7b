"""The Python API: `segplat.create_model` builds what the CLI builds; `segplat.load_model` gives model,
preprocessing and classes; the notebook example of docs/api.md runs as written."""

from __future__ import annotations

import re

import pytest
import torch
from hydra.utils import instantiate

import segplat
from segplat.errors import ConfigError
from segplat.train import train
from tests.conftest import REPO, TINY, compose_train

RGB_NIR = {"rgb": 3, "nir": 1}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, overrides, cli", [
    ("segformer", {"backbone": "mit_b0"}, ["model=segformer", "model.backbone=mit_b0"]),
    ("unet", {"encoder": {"name": "resnet10t"}, "fusion": "mid"},
     ["model=unet", "model.encoder.name=resnet10t", "fusion=mid"]),
    ("cmx", {"backbone": "mit_b0", "decoder_embed_dim": 64, "fusion": {"stages": [2, 3]}},
     ["model=cmx", "model.backbone=mit_b0", "model.decoder_embed_dim=64", "fusion.stages=[2,3]"]),
])
def test_create_model_builds_what_the_cli_builds(name, overrides, cli, tmp_path):
    torch.manual_seed(0)
    api = segplat.create_model(name, RGB_NIR, 4, **overrides)
    torch.manual_seed(0)
    via_cli = instantiate(compose_train(cli, output_dir=tmp_path).model, modalities=RGB_NIR, num_classes=4)
    assert type(api) is type(via_cli) and n_params(api) == n_params(via_cli)
    assert all(torch.equal(a, b) for a, b in zip(api.state_dict().values(), via_cli.state_dict().values()))
    out = api.eval()({"rgb": torch.randn(1, 3, 64, 64), "nir": torch.randn(1, 1, 64, 64)})["out"]
    assert out.shape == (1, 4, 64, 64)


@pytest.mark.parametrize("call, message", [
    (lambda: segplat.create_model("unett", RGB_NIR, 4), r"model=unett is not known; did you mean model=unet\?"),
    (lambda: segplat.create_model("unet", RGB_NIR, 4, encoder={"nme": "x"}), r"model.encoder.nme is not a key of "
                                                                             r"model.encoder; did you mean "
                                                                             r"model.encoder.name\?"),
    (lambda: segplat.create_model("cmx", RGB_NIR, 4, backbon="mit_b0"), r"model.backbon is not a key of model; did "
                                                                        r"you mean model.backbone\?"),
    (lambda: segplat.create_model("unet", RGB_NIR, 4, fusion="sideways"), r"fusion=sideways is not known"),
    (lambda: segplat.create_model("cmx", RGB_NIR, 4, fusion="mid"), r"fusion.type=concat is not supported by CMX"),
    (lambda: segplat.create_model("unet", RGB_NIR, 0), r"num_classes=0 must be a positive integer"),
    (lambda: segplat.create_model("unet", RGB_NIR, 4, encoder={"name": 3}), r"^create_model: model.encoder.name=3 "
                                                                            r"must be a string"),
])
def test_create_model_refuses_what_would_not_take_effect(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def docs_api_example() -> str:
    text = (REPO / "docs" / "api.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.slow
def test_load_model_and_the_docs_example(tmp_path, monkeypatch):
    run = tmp_path / "logs" / "train" / "runs" / "exp1"
    train(compose_train([*TINY, "trainer.max_epochs=1", "callbacks.visuals=null", "callbacks.report=null"],
                        output_dir=run))
    loaded = segplat.load_model(run)
    assert loaded.classes == ["clear", "thick_cloud", "thin_cloud", "cloud_shadow"] and not loaded.model.training
    assert loaded.checkpoint == run / "checkpoints" / "best.ckpt"
    batch = {"rgb": torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8),
             "nir": torch.randint(0, 255, (2, 1, 32, 32), dtype=torch.uint8)}
    inputs = loaded.preprocessor(batch)
    assert inputs["rgb"].dtype == torch.float32 and loaded.model(inputs)["out"].shape == (2, 4, 32, 32)

    monkeypatch.chdir(tmp_path)  # the example names the run as the README's commands leave it
    namespace: dict = {}
    exec(compile(docs_api_example(), "docs/api.md", "exec"), namespace)
    assert namespace["probs"].shape[0] == 4 and namespace["classes"].shape == (300, 400)
