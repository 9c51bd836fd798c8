"""`python -m jax_attn.bench ...`: the same as `python -m jax_attn bench ...`."""
import sys

from .cli import main

sys.exit(main())
