"""Run configuration: one typed ``RunConfig``, parsed and validated once, at the edge.

- ``run_config``: the ``RunConfig`` dataclass (every knob, its type and default), the
  kebab-case key of each field, ``NODE_KEYS`` (what a node's messages carry);
- ``validation``: ``resolve(*layers)``, the allowed values and the one-line ``ConfigError``\\ s;
- ``files``: ``--run-config`` text and experiment TOML files, as layers for ``resolve``.
"""

from snake_flower.config.files import experiment_layers, load_toml, parse_overrides
from snake_flower.config.run_config import (
    ATTACK_KEYS,
    DEFAULTS,
    NODE_KEYS,
    ConfigError,
    RunConfig,
    field_name,
    kd_enabled,
    key_of,
    node_message,
    perplexity_levels,
)
from snake_flower.config.validation import CHOICES, NON_NEGATIVE, POSITIVE, resolve, validate

__all__ = ["ATTACK_KEYS", "CHOICES", "DEFAULTS", "NODE_KEYS", "NON_NEGATIVE", "POSITIVE", "ConfigError", "RunConfig",
           "experiment_layers", "field_name", "kd_enabled", "key_of", "load_toml", "node_message",
           "parse_overrides", "perplexity_levels", "resolve", "validate"]
