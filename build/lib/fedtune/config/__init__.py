"""Experiment configuration."""

from fedtune.config.load import config_from_dict, config_to_yaml, load_config
from fedtune.config.schema import ExperimentConfig

__all__ = ["ExperimentConfig", "config_from_dict", "config_to_yaml", "load_config"]
