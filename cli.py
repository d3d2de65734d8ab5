#!/usr/bin/env python3
"""npllama's command line from a checkout: `python cli.py COMMAND` (installed, it is `npllama COMMAND`)."""
from npllama.cli import main

if __name__ == "__main__":
    main()
