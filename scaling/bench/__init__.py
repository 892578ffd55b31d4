"""Benchmarks behind `vidscale bench NAME`. Each module provides `add_args(parser)` and
`run(args) -> dict`; the dict is printed (as one JSON object with --json). Benchmarks
report ratios measured in one run; tests never assert timings."""
