"""Prefect flows and the ``mvlm`` command-line interface."""
