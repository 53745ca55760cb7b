"""Where a GFM's pretrained weights come from: a local file, a folder the user filled, or the Hugging Face cache.

Runs never download. `model.encoder.pretrained` is
- a file (.pt / .pth / .bin / .safetensors): loaded as it is;
- a folder: the official file name inside it (e.g. `Prithvi_EO_V2_300M.pt`), or a Hugging Face cache
  tree under it (`models--ORG--NAME/snapshots/*/FILE`, as `HF_HUB_CACHE=DIR hf download ...` writes);
- `hf`: the user's Hugging Face cache (`HF_HUB_CACHE`, default ~/.cache/huggingface/hub), filled
  once with `hf download ORG/NAME FILE` (the repository and file are named in the error when absent).
And then the state dict is checked key by key against the encoder (segplat.models.encoders.gfm.encoders).
"""

from __future__ import annotations

from pathlib import Path

from segplat.errors import ConfigError

HF_CACHE = "hf"


def _from_hf_cache(repo_id: str, filename: str, cache_dir: str | Path | None) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with the gfm extra
        return None
    found = try_to_load_from_cache(repo_id, filename, cache_dir=None if cache_dir is None else str(cache_dir))
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def resolve_weights(pretrained: str | Path | None, repo_id: str | None, filename: str | None,
                    key: str = "model.encoder.pretrained") -> Path | None:
    """The local weights file `pretrained` names (None = random init); one-sentence ConfigError otherwise."""
    if pretrained is None or pretrained is False or str(pretrained).strip() in ("", "null", "none", "None"):
        return None
    text = str(pretrained)
    official = f"{filename} of {repo_id}" if repo_id and filename else None
    if text == HF_CACHE:
        if not official:
            raise ConfigError(f"{key}=hf: this encoder has no published weights file to look up; give a local file.")
        found = _from_hf_cache(repo_id, filename, None)
        if found is None:
            raise ConfigError(f"{key}=hf: {official} is not in the Hugging Face cache; fill it once with "
                              f"`hf download {repo_id} {filename}` (runs never download) or give the file's path.")
        return found
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if filename and (path / filename).is_file():
            return path / filename
        found = _from_hf_cache(repo_id, filename, path) if official else None
        if found is not None:
            return found
        raise ConfigError(f"{key}={text} is a folder without {official or 'a known weights file'} (as a file or a "
                          "Hugging Face cache tree); put the file there or give its path.")
    raise ConfigError(f"{key}={text} is neither a file nor a folder; download the weights once "
                      f"({official or 'the encoder weights'}) and point the key at the file, or use {key}=hf for "
                      "the Hugging Face cache.")
