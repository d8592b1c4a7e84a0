"""Typed configuration: one small frozen model per component, composed by :class:`TrainConfig`.

A config is a YAML file (or a built-in name such as ``digits``) plus ``KEY=VALUE`` overrides
(dotted keys for nested sections, values parsed as YAML scalars). Unknown keys, wrong types and
out-of-range values raise :class:`ConfigError`, whose message names the key; the CLI prints it
on one line and exits 2. Validation is pure (no communication), so every rank reaches the same
verdict before any collective is entered.

    sections  the models and their cross-key checks (each field's docstring documents it)
    loading   YAML and overrides in, a validated TrainConfig out; comparing ranks' configs
"""
from .loading import (BUILTIN, check_agreement, first_difference, from_dict, load_config, parse_overrides,
                      replace)
from .sections import (INT_LIMIT, CheckpointConfig, ConfigError, DataConfig, DDPConfig, FedAvgConfig, HorovodConfig, LocalConfig,
                       ModelConfig, OptimConfig, ParallelConfig, PSConfig, RuntimeConfig, TrainConfig)

__all__ = ["BUILTIN", "INT_LIMIT", "CheckpointConfig", "ConfigError", "DDPConfig", "DataConfig", "FedAvgConfig", "HorovodConfig", "LocalConfig",
           "ModelConfig", "OptimConfig", "ParallelConfig", "PSConfig", "RuntimeConfig", "TrainConfig", "check_agreement",
           "first_difference", "from_dict", "load_config", "parse_overrides", "replace"]
