"""`python -m gutout` and `torchrun ... -m gutout train ...`: the command line.

An entry point, not library code: nothing imports it, so the library's imports still point one way
(`train -> pipelines -> gutout`); the CLI itself lives in `gutout.train.cli`.
"""

from gutout.train.cli import main

main()
