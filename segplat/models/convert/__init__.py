"""Checkpoint conversion: other code bases' state dicts -> segplat's module names.

- `mit`: MiT/SegFormer encoders saved by transformers (v4 and v5 names), NVlabs/mmseg 0.x or segplat.
- `segformer_head`: the SegFormer all-MLP decode head (transformers v4/v5, NVlabs/mmseg 0.x, CMX, segplat).
- `cmx`: whole official CMX models (`huaaaliu/RGBX_Semantic_Segmentation` `.pth` files).
- `ms2mnet`: the released MS2MNet's module names (`DrWuHonglin/MS2MNet`).

Every file is read with `segplat.models.weights.load_state_file` (safetensors or `torch.load(weights_only=True)`).
"""
