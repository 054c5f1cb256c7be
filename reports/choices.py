"""The report-side names a user can choose (figure formats): free of altair and pandas, so that the command
line's parser (python -m reports --help) is built without importing them."""

from __future__ import annotations

FORMATS = ("png", "svg", "pdf")  # of --figures, written by reports.figures
