"""Configs: the schema with its checks, config files and overrides, and the command line of every entry point."""
