"""Model presets as ConfigDicts: the official LSeg backbones and a tiny test model.

A model config is data: `build_model` turns it into modules. Names follow the
official `--backbone` values (lang-seg `_make_encoder`); the `clip_*` part names
the CLIP text tower, the rest the image backbone.
"""

import ml_collections

# CLIP text towers by model name (OpenAI CLIP `build_model` from the checkpoint shapes).
CLIP_TEXT = {
    "ViT-B/32": dict(vocab_size=49408, context_length=77, width=512, depth=12, num_heads=8, embed_dim=512),
    "RN50x4": dict(vocab_size=49408, context_length=77, width=640, depth=12, num_heads=10, embed_dim=640),
    "RN50x16": dict(vocab_size=49408, context_length=77, width=768, depth=12, num_heads=12, embed_dim=768),
}

# timm ViTs at 384 (Dosovitskiy et al. 2021, Table 1) with the DPT hooks.
VIT_L16 = dict(patch_size=16, width=1024, num_heads=16, mlp_dim=4096, hooks=(5, 11, 17, 23), pretrain_grid=24)
VIT_B32 = dict(patch_size=32, width=768, num_heads=12, mlp_dim=3072, hooks=(2, 5, 8, 11), pretrain_grid=12)

_BACKBONES = {
    # name: (image backbone kind, its settings, reassemble/stage widths, CLIP text tower)
    "clip_vitl16_384": ("vit", VIT_L16, (256, 512, 1024, 1024), "ViT-B/32"),
    "clipRN50x16_vitl16_384": ("vit", VIT_L16, (256, 512, 1024, 1024), "RN50x16"),
    "clipRN50x4_vitl16_384": ("vit", VIT_L16, (256, 512, 1024, 1024), "RN50x4"),
    "clip_vitb32_384": ("vit", VIT_B32, (96, 192, 384, 768), "ViT-B/32"),
    "clipRN50x16_vitb32_384": ("vit", VIT_B32, (96, 192, 384, 768), "RN50x16"),
    "clipRN50x4_vitb32_384": ("vit", VIT_B32, (96, 192, 384, 768), "RN50x4"),
    "clip_resnet101": ("resnet", dict(stage_sizes=(3, 4, 23, 3), width=64), (256, 512, 1024, 2048), "ViT-B/32"),
    # A few-kilobyte model for tests and the offline demo: same graph, tiny widths.
    "tiny": ("vit", dict(patch_size=16, width=32, num_heads=2, mlp_dim=64, hooks=(0, 1, 2, 3), pretrain_grid=8),
             (8, 16, 32, 32), "tiny"),
    "tiny_resnet": ("resnet", dict(stage_sizes=(1, 1, 1, 1), width=4), (16, 32, 64, 128), "tiny"),
    # The offline demo's backbone: learns lseg_shapes from scratch in CPU minutes.
    "small_resnet": ("resnet", dict(stage_sizes=(1, 1, 1, 1), width=8), (32, 64, 128, 256), "tiny"),
}
CLIP_TEXT["tiny"] = dict(vocab_size=49408, context_length=77, width=32, depth=2, num_heads=2, embed_dim=32)

BACKBONES = tuple(_BACKBONES)
# The released LSeg networks (the others are ours: tests and the demo).
OFFICIAL_BACKBONES = tuple(name for name, (*_, text) in _BACKBONES.items() if text != "tiny")


def get_model_config(backbone: str = "clip_vitl16_384", **overrides) -> ml_collections.ConfigDict:
  """The LSegNet defaults for `backbone`; `overrides` set top-level fields."""
  if backbone not in _BACKBONES:
    raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
  kind, image, channels, text = _BACKBONES[backbone]
  config = ml_collections.ConfigDict(dict(
      backbone=backbone,
      kind=kind,
      **{kind: dict(image)},  # `vit` or `resnet` settings
      channels=channels,  # widths of the 4 levels entering the fusion decoder
      readout="project",
      features=16 if text == "tiny" else 256,
      use_bn=True,  # LSegNet always sets it
      text=dict(CLIP_TEXT[text]),
      arch_option=0,  # spatial regularisation: 0 none, 1 bottleneck, 2 depthwise
      block_depth=0,
      activation="lrelu",
      logit_scale=1 / 0.07,
      dtype="float32",  # compute dtype
      param_dtype="float32",
      remat_policy="none",  # none | full | dots_saveable (ViT blocks)
      attention="plain",  # plain | xla | cudnn (ViT blocks; models/transformer.py)
  ))
  config.update(overrides)
  return config
