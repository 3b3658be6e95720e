"""Glue between `ml_collections` experiment configs and the library's typed settings."""

from __future__ import annotations

from ml_collections import config_dict

from attn.model import ModelConfig


def model_config(config: config_dict.ConfigDict) -> ModelConfig:
    """The validated `ModelConfig` of an experiment config's `model` field."""
    return ModelConfig.from_mapping(config.model.to_dict())
