"""`python -m segplat.models.summary model=NAME [dataset=NAME] [input_size=256]`: a model's size and shapes.

Builds the model exactly as `segplat.train` would (`build_model(cfg.model, modalities, num_classes,
bands)`) but without reading any data: the band counts, scales and time lengths come from
the dataset layout's `modalities` (the layout is built with root=None), or from `channels={rgb:3,...}`
when a layout needs its files for that. Prints the parameters (total and per optimiser group
encoder / fusion / decoder), the forward FLOPs at `input_size` (torch's FlopCounterMode; one
multiply-add = 2 FLOPs) and the output shapes of the model's top-level parts (forward hooks).
`model=all` runs a random-tensor forward of every preset in conf/model/ and says which fail.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from segplat.config import CONF_DIR, check_config, check_task_keys, register_resolvers
from segplat.errors import ConfigError, SegplatError
from segplat.models.build import PlainModel, build_model
from segplat.schema import Hint, PositiveInt, section
from segplat.utils.searchpath import check_command_configs

register_resolvers()
DEFAULT_TIME_STEPS = 6
aten = torch.ops.aten
# the attention kernels torch's flop table lacks (it has the CUDA flash / efficient / cuDNN ones)
ATTENTION_KERNELS = tuple(getattr(aten, name) for name in ("_scaled_dot_product_flash_attention_for_cpu",
                                                            "_scaled_dot_product_fused_attention_overrideable")
                          if hasattr(aten, name))


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@dataclass(frozen=True)
class OpCount:
    """The forward cost of one call: multiply-adds per operator (torch's counter reports 2 FLOPs per multiply-add;
    halved here)."""

    by_op: dict[str, int]

    @property
    def macs(self) -> int:
        """Multiply-adds: what papers print as "FLOPs" (SegFormer-B0 8.4 G at 512²)."""
        return sum(self.by_op.values())

    @property
    def flops(self) -> int:
        """2 per multiply-add: the figure MFU divides by a device's peak FLOP/s."""
        return 2 * self.macs

    @property
    def attention_macs(self) -> int:
        """Products of two activations: scaled-dot-product attention and batched matmuls (CMX's cross-attention);
        what module-hook counters (thop) leave out."""
        return sum(v for k, v in self.by_op.items() if "attention" in k or k == "aten.bmm")


def count_macs(model: nn.Module, inputs: Any) -> OpCount:
    """Multiply-adds of `model(inputs)` (no gradients), attention included."""
    mapping = {k: _sdpa_flops for k in ATTENTION_KERNELS}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(inputs)
    return OpCount({str(k): v // 2 for k, v in counter.get_flop_counts()["Global"].items()})


@section
class SummaryTask:
    """The summary's own keys (conf/summary.yaml) beside the train config's, checked first by `run`."""

    input_size: Annotated[PositiveInt, Hint("the primary modality's square size")] = 256
    batch_size: PositiveInt = 1
    channels: Mapping[str, PositiveInt] | None = None
    num_classes: PositiveInt | None = None
    time_steps: PositiveInt | None = None
    demo: bool = False


def stream_specs(cfg: DictConfig) -> tuple[dict[str, dict[str, Any]], int]:
    """name -> {channels, scale, time} for the configured modalities, and the class count; no data read."""
    names = list(cfg.dataset.get("modalities") or [])
    channels = OmegaConf.to_container(cfg.channels, resolve=True) if cfg.get("channels") else None
    time_steps = cfg.get("time_steps")
    layout, layout_err = None, None
    try:
        layout_cfg = OmegaConf.to_container(cfg.dataset.layout, resolve=True)
        layout = instantiate(layout_cfg, root=None)
        specs = layout.modalities
    except Exception as err:  # a layout that needs its files to describe itself
        specs, layout_err = None, err
    if channels is not None:
        names = names or list(channels)
        missing = [m for m in names if m not in channels]
        if missing:
            raise ConfigError(f"channels={channels} lacks {missing} of dataset.modalities={names}; give every "
                              "modality's band count.")
        streams = {}
        for m in names:
            spec = specs.get(m) if specs else None
            temporal = bool(time_steps) or bool(spec is not None and spec.temporal)
            t = int(time_steps or (spec.max_time if spec is not None and spec.max_time else DEFAULT_TIME_STEPS))
            streams[m] = {"channels": int(channels[m]), "scale": spec.scale if spec is not None else 1.0,
                          "time": t if temporal else None,
                          "bands": spec.bands if spec is not None and len(spec.bands) == int(channels[m]) else None}
    elif specs is None:
        raise ConfigError(f"dataset.layout of {cfg.dataset.get('name')} cannot describe its modalities without "
                          f"its data ({layout_err}); pass channels={{name:bands,...}} (and time_steps=T for series), "
                          "or set the layout keys it would read from the data (e.g. dataset.layout.max_time).")
    else:
        names = names or list(specs)
        unknown = [m for m in names if m not in specs]
        if unknown:
            raise ConfigError(f"dataset.modalities names {unknown}, which the layout does not have; choose from "
                              f"{list(specs)}.")
        streams = {m: {"channels": len(specs[m].bands), "scale": specs[m].scale, "bands": specs[m].bands,
                       "time": (int(time_steps or specs[m].max_time or DEFAULT_TIME_STEPS)
                                if specs[m].temporal else None)} for m in names}
    num_classes = cfg.get("num_classes") or (len(layout.classes) if layout is not None and layout.classes else None)
    if not num_classes:
        raise ConfigError("the dataset layout does not say its classes without its data; pass num_classes=K.")
    return streams, int(num_classes)


def random_inputs(streams: Mapping[str, Mapping[str, Any]], size: int, batch: int) -> dict[str, torch.Tensor]:
    """Random normalised inputs (and all-real time masks / day offsets for series) at `size` for the primary."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for m, s in streams.items():
        hw = max(1, round(size * float(s["scale"])))
        if s["time"]:
            t = int(s["time"])
            out[m] = torch.randn(batch, t, s["channels"], hw, hw, generator=g)
            out[f"{m}_time_mask"] = torch.ones(batch, t, dtype=torch.bool)
            out[f"{m}_dates"] = (torch.arange(t) * 10).expand(batch, t)
        else:
            out[m] = torch.randn(batch, s["channels"], hw, hw, generator=g)
    return out


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(describe(v) for v in value) + "]"
    return type(value).__name__


def watched_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children; containers (ModuleDict/ModuleList, never called themselves) by their children."""
    parts = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleDict | nn.ModuleList):
            parts += [(f"{name}.{k}", c) for k, c in child.named_children()]
        else:
            parts.append((name, child))
    return parts


def count_parameters(model: nn.Module) -> dict[str, int]:
    counts = {"total": sum(p.numel() for p in model.parameters())}
    grouped = getattr(model, "grouped_parameters", None)
    if grouped is not None:
        for group, params in grouped().items():
            counts[group] = sum(p.numel() for _, p in params)
    return counts


def build(cfg: DictConfig) -> tuple[nn.Module, dict[str, dict[str, Any]], int]:
    check_config(cfg)
    streams, num_classes = stream_specs(cfg)
    modalities = {m: s["channels"] for m, s in streams.items()}
    bands = {m: s["bands"] for m, s in streams.items() if s.get("bands")}
    model = build_model(cfg.model, modalities, num_classes, bands if len(bands) == len(streams) else None)
    return model, streams, num_classes


def summarise(cfg: DictConfig) -> dict[str, Any]:
    """Build, count, run one forward with hooks and one under the FLOP counter; print a report."""
    size, batch = int(cfg.input_size), int(cfg.batch_size)
    model, streams, num_classes = build(cfg)
    model.eval()
    # a plain module's own parts are watched, not the wrapper that gives it segplat's defaults
    watched = model.net if isinstance(model, PlainModel) else model
    inputs = random_inputs(streams, size, batch)
    shapes: dict[str, list[str]] = {}
    hooks = []
    for name, part in watched_parts(watched):
        hooks.append(part.register_forward_hook(
            lambda _m, _i, out, name=name: shapes.setdefault(name, []).append(describe(out))))
    with torch.no_grad():
        start = time.perf_counter()
        outputs = model(inputs)
        seconds = time.perf_counter() - start
    for h in hooks:
        h.remove()
    # parts driven through their own methods (a stream's `stage(i)`) never fire: watch their children instead
    silent = [(name, part) for name, part in watched_parts(watched) if name not in shapes]
    deeper = [(f"{name}.{k}", c) for name, part in silent for k, c in watched_parts(part)]
    if deeper:
        hooks = [c.register_forward_hook(lambda _m, _i, out, name=name: shapes.setdefault(name, []).append(
            describe(out))) for name, c in deeper]
        with torch.no_grad():
            model(inputs)
        for h in hooks:
            h.remove()
    cost = count_macs(model, inputs)
    params = count_parameters(model)
    fusion = OmegaConf.select(cfg, "model.fusion")
    fusion_txt = (f"{fusion.get('level')}/{fusion.get('type')}" if fusion is not None else "-")
    lines = [
        f"model: {type(watched).__module__}.{type(watched).__qualname__}  (fusion {fusion_txt})",
        f"data: {cfg.dataset.get('name')}: " + ", ".join(
            f"{m} {s['channels']} bands" + (f" x {s['time']} dates" if s["time"] else "")
            + (f" at scale {s['scale']}" if s["scale"] != 1 else "") for m, s in streams.items())
        + f"; {num_classes} classes",
        "parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()),
        f"MACs (multiply-adds, forward, batch {batch}, {size}x{size}; what papers print as FLOPs): "
        f"{cost.macs / 1e9:.3f} G, attention {cost.attention_macs / 1e9:.3f} G of them",
        f"FLOPs (2 per multiply-add): {cost.flops / 1e9:.3f} G  (forward took {seconds:.2f} s on CPU)",
        "inputs: " + describe(inputs),
        "stage outputs:",
    ]
    for name, outs in shapes.items():
        calls = f"  (x{len(outs)} calls)" if len(outs) > 1 else ""
        lines.append(f"  {name:<24} {outs[-1]}{calls}")
    lines.append(f"outputs: {describe(outputs)}")
    print("\n".join(lines), flush=True)
    return {"params": params, "macs": cost.macs, "flops": cost.flops, "attention_macs": cost.attention_macs,
            "shapes": shapes, "outputs": {k: tuple(v.shape) for k, v in outputs.items()}}


def model_presets() -> list[str]:
    """segplat's model presets and those of the user's config folders on this command's search path."""
    from segplat.utils.searchpath import command_searchpath, user_config_dirs

    folders = [CONF_DIR, *user_config_dirs(command_searchpath())]
    return sorted({p.stem for folder in folders for p in (folder / "model").glob("*.yaml")})


def demo_all(cfg: DictConfig) -> int:
    """A random-tensor forward of every model preset; returns the number that failed."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    try:
        hydra_cfg = HydraConfig.get()
        # the user's config folders (hydra.searchpath) reach each preset's compose too
        overrides = [o for o in hydra_cfg.overrides.hydra if o.split("=", 1)[0].lstrip("+") == "hydra.searchpath"]
        overrides += [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") not in ("model", "demo")]
    except ValueError:
        overrides = []
    failed = []
    for name in model_presets():
        print(f"=== model={name}", flush=True)
        try:
            sub = compose(config_name="summary", overrides=[f"model={name}", *overrides])
            summarise(sub)
        except Exception as err:  # report every preset, then fail at the end
            failed.append(name)
            print(f"FAILED model={name}: {type(err).__name__}: {err}", flush=True)
    print(f"demo: {len(model_presets()) - len(failed)} presets ran"
          + (f", failed: {', '.join(failed)}" if failed else ", none failed"), flush=True)
    return len(failed)


def run(cfg: DictConfig) -> int:
    check_command_configs()  # the user's config folders (hydra.searchpath): there, and none hidden
    check_task_keys(cfg, SummaryTask, closed=False)
    torch.manual_seed(0)
    if cfg.get("demo"):
        return 1 if demo_all(cfg) else 0
    summarise(cfg)
    return 0


@hydra.main(config_path=str(CONF_DIR), config_name="summary", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        code = run(cfg)
    except SegplatError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    if any(a == "model=all" for a in sys.argv[1:]):
        sys.argv = [a for a in sys.argv if a != "model=all"] + ["demo=true"]
    main()
