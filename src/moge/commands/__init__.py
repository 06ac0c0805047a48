"""CLI subcommands that are not owned by a deeper package."""
