"""``python -m nvfp4_dist`` (also under ``torchrun -m nvfp4_dist``): the CLI."""

import sys

from .cli import main

sys.exit(main())
