"""The one error type users see: a bad value, named by its field, with what is allowed."""


class ConfigError(ValueError):
    """Bad input. The message is one line: '<where>: <field>: <rule> (got <value>)'."""
