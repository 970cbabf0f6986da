"""Integrations with HF transformers, timm, torchvision (and, through core's `import_peft`
/ `export_peft` and the torch-optimizer face of `geopeft.optimizer`, PEFT and accelerate).

- `transformers`, `timm`, `torchvision`: target presets, registered through the `geopeft`
  entry point; importing them imports none of those libraries.
- `hf_trainer`: `GeoTrainer` (also `geopeft.integrations.transformers.GeoTrainer`).

A module that needs its library imports it through `_extras.require`, whose ImportError
names the extra to install; core never imports this package.
"""
