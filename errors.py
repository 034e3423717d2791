"""The one exception type for problems a user can fix, how the command-line tools report it, and the
atomic file write every output goes through (a failed write is such a problem, e.g. a full disk)."""
import os
import shutil
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


def write_atomic(path, write, errors=(OSError, RuntimeError)):
    """Call `write(tmp)` for a temporary name beside `path`, then rename it over `path`: a kill or a full
    disk leaves the previous file or the new one, never half of one. A failure in `errors` (torch.save
    reports a full disk as RuntimeError) becomes a UserError and the temporary file is removed."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except errors as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(path) or ".").free / 2**20
        reason = str(err.strerror if isinstance(err, OSError) and err.strerror else err).splitlines()[0]
        raise UserError(f"could not write {path} ({reason}; {free:.0f} MiB free there); "
                        "the previous file is intact") from None
