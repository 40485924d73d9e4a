"""`python -m pallas_kernels.bench`: see the package docstring (`--help`)."""

import sys

from pallas_kernels.bench import main

main(sys.argv)
