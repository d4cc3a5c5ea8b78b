"""CLI subcommands (the wiring layer). Nothing in the base library imports these."""
