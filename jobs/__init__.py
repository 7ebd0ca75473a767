"""Ray job entry points: `python -m jobs.<name> --help`. Thin: parse, call the library, report."""
