"""OmegaConf containers to plain Python: the one helper for it."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(obj: Any, resolve: bool = True) -> Any:
    """DictConfig / ListConfig -> dict / list (interpolations resolved); anything else unchanged.

    Why one helper: builders receive config nodes (`_recursive_: false`, partials) or plain values
    depending on who calls them; each converting on its own is how one of them forgets to resolve.
    """
    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=resolve)
    return obj
