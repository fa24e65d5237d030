"""Subcommands of ``karl-verl`` (see :mod:`karl_verl.cli`)."""
