"""Initial weights for training, from the config's `init` section.

- `init.model_dir`: a whole model (converted official checkpoint or an earlier
  run's model directory) - fine-tuning;
- otherwise the paper's initialisation, part by part: `init.vit` (timm ViT
  state dict or big_vision AugReg `.npz`), `init.resnet` (torchvision
  ResNet-101), `init.clip_text` (OpenAI or HF CLIP weights). Parts left None
  keep their random initialisation (the offline demo).
"""

import flax
import jax
import ml_collections

from lseg_jax import checkpoint, convert


def _merge(variables: dict, part: dict) -> dict:
  flat = flax.traverse_util.flatten_dict(variables)
  for path, value in flax.traverse_util.flatten_dict(part).items():
    flat[path] = value
  return flax.traverse_util.unflatten_dict(flat)


def load_initial_weights(config: ml_collections.ConfigDict, variables: dict, shardings) -> dict:
  """`variables` with the configured pre-trained parts put in, on `shardings`."""
  init = config.init
  if init.get("model_dir"):
    model_config, loaded = checkpoint.load_model(init.model_dir)
    if model_config.backbone != config.model.backbone:
      raise ValueError(f"init.model_dir holds a {model_config.backbone} model but model.backbone is "
                       f"{config.model.backbone}")
    return jax.device_put(loaded, shardings)
  parts = {"vit": convert.convert_vit_init, "resnet": convert.convert_resnet_init,
           "clip_text": convert.convert_clip_text}
  for name, fn in parts.items():
    if init.get(name):
      variables = _merge(variables, fn(convert.load_state_dict(init[name]), config.model))
  return jax.device_put(variables, shardings)
