"""`python -m inference` runs arena-predict (guarded: spawned workers re-import this module)."""
import sys

if __name__ == "__main__":
    from inference.cli import main

    sys.exit(main())
