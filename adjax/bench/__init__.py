"""Benchmarks: `python -m adjax.bench NAME [options]` (see __main__.py for the list)."""
