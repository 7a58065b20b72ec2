"""`python -m litovis ...` is the `litovis` command."""

from litovis.cli import main

main()
