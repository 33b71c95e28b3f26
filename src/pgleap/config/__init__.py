"""TOML configuration: the schema and its validation."""

from pgleap.config.loader import load_config, parse_config
from pgleap.config.schema import (
    AdminConfig,
    Config,
    CutoverConfig,
    ProxyConfig,
    ServerConfig,
    SyncConfig,
    UpgradeConfig,
    UserConfig,
    ValidationConfig,
)

__all__ = [
    "AdminConfig",
    "Config",
    "CutoverConfig",
    "ProxyConfig",
    "ServerConfig",
    "SyncConfig",
    "UpgradeConfig",
    "UserConfig",
    "ValidationConfig",
    "load_config",
    "parse_config",
]
