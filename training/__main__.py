"""`python -m training` (also what `deepspeed --module training` and `torchrun -m training` run)."""
import sys

from .cli import main

sys.exit(main())
