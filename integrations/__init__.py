"""Integrations with HF transformers, timm, torchvision, PEFT and accelerate.

Each module guards its optional dependency with an ImportError that names the
extra to install; core never imports this package.
"""
