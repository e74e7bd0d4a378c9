"""Subcommands of the ``gradsel`` CLI (see ``gradsel_core.cli``)."""
