"""The `vidscale` command line. Each subcommand lives in its own module, which provides
`add_parser(subparsers)` and `run(args) -> int`; this file only lists them."""
from __future__ import annotations

import argparse
import importlib
import sys

from scaling.config import RecipeError

# (command, module): keep in the order `vidscale --help` shows them
SUBCOMMANDS = [
    ("train", "scaling.commands.train"),
    ("resume", "scaling.commands.resume"),
    ("export", "scaling.commands.export"),
    ("sample", "scaling.commands.sample"),
    ("info", "scaling.commands.info"),
    ("bench", "scaling.commands.bench"),
    ("prepare", "scaling.commands.prepare"),
    ("make-videos", "scaling.commands.make_videos"),
    ("sweep", "scaling.commands.sweep"),
    ("fit", "scaling.commands.fit"),
    ("status", "scaling.commands.status"),
    ("cancel", "scaling.commands.cancel"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vidscale",
        description="Train video Diffusion Transformers at scale and fit their scaling laws.",
        epilog="Run 'vidscale COMMAND --help' for a command's options.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, mod in SUBCOMMANDS:
        m = importlib.import_module(mod)
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
    except OSError as e:  # a failed write or read (disk full, checkpoint damaged): one line naming the path
        print(f"vidscale {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vidscale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
