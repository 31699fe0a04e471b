"""Configuration: TOML files -> frozen dataclasses, validated once at load.

Theory of operation
-------------------
A `Config` is built from layers, each overriding the one before:

1. built-in defaults (the field defaults in `schema`, which are real ESP-AT's),
2. the profile (``--profile NAME``; default ``esp32``),
3. the config files: ``--config PATH`` alone when given; else, for the
   command line (``system=True``), ``/etc/bridged/bridged.toml`` and then the
   instance's ``/etc/bridged/<instance>.toml``, each when present
   (``$BRIDGED_CONFIG_DIR`` relocates /etc/bridged, for tests),
4. command-line overrides (dotted keys such as ``uart.port``).

Every value is checked where it appears, so an error names the file (or
"command line") it came from, the dotted key and what is allowed::

    config/bridged.toml: uart.parity: 'odd2' is not allowed; allowed: none, odd, even

Unknown sections and keys are errors too, listing the allowed ones. Nothing
else in bridged validates configuration: code that holds a `Config` may trust
it.

The schema lives in one place: each dataclass field carries its default and
its check (`_field`). A config file may also carry a top-level
``profile = "NAME"``, used when no profile is given on the command line (the
last file that names one wins).

Modules: `checks` (what each key allows, `ConfigError`), `schema` (the
sections' dataclasses and `Config`), `paths` (system files, instances,
profiles, the state directory), `loading` (the layers into a `Config`, and
back to TOML). Import the names from ``bridged.config``.
"""

from __future__ import annotations

from bridged.config.checks import COMMAND_LINE, OTA_PARTITION, OTA_VERSION, ConfigError
from bridged.config.loading import load_config, to_toml
from bridged.config.paths import (config_dir, find_profile, instance_name, profile_dirs,
                                  profile_header, state_dir, system_files)
from bridged.config.schema import (DEFAULT_PROFILE, RESTART_ONLY, Config, DnsConfig, FaultsConfig,
                                   FirmwareConfig, LinksConfig, LogConfig, OtaConfig, SntpConfig,
                                   StateConfig, UartConfig, WatchdogConfig, WifiConfig, changed_keys,
                                   default_config)

__all__ = [
    "DEFAULT_PROFILE",
    "Config",
    "ConfigError",
    "DnsConfig",
    "FaultsConfig",
    "FirmwareConfig",
    "LinksConfig",
    "LogConfig",
    "OTA_PARTITION",
    "OTA_VERSION",
    "OtaConfig",
    "SntpConfig",
    "WatchdogConfig",
    "StateConfig",
    "UartConfig",
    "WifiConfig",
    "default_config",
    "find_profile",
    "load_config",
    "profile_dirs",
    "state_dir",
    "to_toml",
    "profile_header",
    "changed_keys",
    "config_dir",
    "instance_name",
    "RESTART_ONLY",
]
