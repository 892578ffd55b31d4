"""The `vidscale` command line. Each subcommand lives in its own module, which provides
`add_parser(subparsers)` and `run(args) -> int`; this file only lists them."""
from __future__ import annotations

import argparse
import signal
import sys

from vidscale.scaling.cli import (bench, cancel, export, fit, info, make_videos, plan, prepare, resume, sample,
                                  status, sweep, train)
from vidscale.scaling.config import RecipeError
from vidscale.scaling.train.signals import interrupted_by

# keep in the order `vidscale --help` shows them
SUBCOMMANDS = [train, resume, export, sample, info, plan, bench, prepare, make_videos, sweep, fit, status, cancel]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vidscale",
        description="Train video Diffusion Transformers at scale and fit their scaling laws.",
        epilog="Run 'vidscale COMMAND --help' for a command's options.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for m in SUBCOMMANDS:
        sp = m.add_parser(sub)
        sp.set_defaults(_run=m.run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (RecipeError, ValueError, FileNotFoundError) as e:
        print(f"vidscale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, FloatingPointError) as e:  # a failed write or read (disk full, checkpoint damaged), a
        # run dir in use, a diverged run: one line naming the path or the step
        print(f"vidscale {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM / SIGHUP once what was started here is stopped
        signum = interrupted_by()
        print(f"vidscale {args.command}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
