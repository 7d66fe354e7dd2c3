"""`python -m adapt`: the `adapt` console command."""

from adapt.cli import main

main()
