"""The `entremise` command line (Typer + Rich)."""
