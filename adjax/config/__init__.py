"""Run configuration: the defaults (every field), the whole-config check,
the field reference and loading a config file."""
