"""Command line: thin verbs over the library. ``patchcert <verb> --help``.

Each verb lives in its own module ``patchcert.cli.<verb>`` with ``register(subparsers)``
(which sets ``func``). Every user error ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

VERBS = ["models", "train", "certify", "attack", "report", "convert"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(prog="patchcert", description="Certified robustness to adversarial patches.")
    p.add_argument("--version", action="version", version=f"patchcert {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (before or after the verb)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (before or after the verb)")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb in VERBS:
        importlib.import_module(f".{verb}", __name__).register(sub)
    for sp in sub.choices.values():  # -v / -q after the verb too (SUPPRESS: never resets the value given before)
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="warnings and errors only")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..errors import PatchcertError
    from ..runtime import tune_allocator

    tune_allocator()
    parser = build_parser()
    args = parser.parse_args(argv)
    from ._logging import configure_logging

    if args.verbose and args.quiet:
        print(f"patchcert {args.verb}: error: give -v or -q, not both", file=sys.stderr)
        return 2
    configure_logging(verbose=args.verbose, quiet=args.quiet)
    try:
        rc = args.func(args)
    except PatchcertError as e:
        print(f"patchcert {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `patchcert models --json | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except OSError as e:  # a full disk, a read-only --out, a file where a folder should be ...
        from ..rundir import os_error_message

        print(f"patchcert {args.verb}: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"patchcert {args.verb}: error: out of memory (try a smaller --batch-size or model)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"patchcert {args.verb}: interrupted (finished work is saved; rerun with --resume)", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
