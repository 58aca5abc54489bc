"""Command-line tools beside fit/test: benchmark, export, sweep, report (each imported only when run)."""
