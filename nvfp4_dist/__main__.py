"""``python -m nvfp4_dist`` (also under ``torchrun -m nvfp4_dist``): the CLI."""

from .cli import entry

entry()
