"""Subcommands of the `guide-fast` CLI, one module per area, each with add_commands(subparsers)."""
