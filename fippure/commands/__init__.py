"""One module per ``fippure`` subcommand (see :mod:`fippure.cli`)."""
