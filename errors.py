"""The one exception type for problems a user can fix, and how the command-line tools report it."""
import sys


class UserError(Exception):
    """Bad input or options: a missing file, malformed data, a broken checkpoint, impossible flags.

    The message is one line that names the file (or option) and the problem.
    """


def run_cli(main):
    """Run `main()`; a UserError becomes `error: <message>` on stderr and exit status 2, no traceback.

    Ctrl-C before training has started (train.py handles it during training) exits 130 with one line.
    """
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
