"""Charts, HTML reports and the command line (python -m reports)."""
