"""`python -m gutout.train`: the command line."""

from .cli import main

main()
