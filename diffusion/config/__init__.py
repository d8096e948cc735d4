"""Configs: the schema with its checks, config files and overrides, and the command line of every entry point.

A config file starts from ``base_config()``, importable from here (``from diffusion.config import base_config``) as
config files written before the package was split into layers do."""

from diffusion.config.schema import base_config

__all__ = ["base_config"]
