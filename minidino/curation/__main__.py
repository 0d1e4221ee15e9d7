"""`python -m minidino.curation ...`: the command line of curate.py, with one-line errors."""

import sys

from ..cli import error_line
from ..config import ConfigError
from ..data import DataError
from .curate import main

if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {error_line(e)}")
