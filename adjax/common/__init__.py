"""Shared plumbing: atomic writes, process signals and owners, user errors."""
