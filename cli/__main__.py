"""`python -m entremise.cli`."""

from entremise.cli.app import main

main()
