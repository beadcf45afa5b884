"""Baseline model families, one file each. Every module here is imported by
``fractalbench.harness.registry.discover()``; its ``@register_model`` builders become available by name."""
