"""The one error type users see: a bad value, named by its field, with what is allowed. (Safe
file writes and the folder checks that raise it live in windtunnel/files.py.)"""
from __future__ import annotations


class ConfigError(ValueError):
    """Bad input. The message is one line: '<where>: <field>: <rule> (got <value>)'."""
