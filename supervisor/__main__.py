"""`supervisor` (and `python -m supervisor`): `submit` through a running daemon's HTTP API
when it can (`supervisor.cli.http_submit`, which imports only the standard library), else
the whole CLI (`supervisor.cli.main`)."""

import sys

from supervisor.cli.http_submit import quick_submit


def main() -> int:
    code = quick_submit(sys.argv[1:])
    if code is None:
        from supervisor.cli.main import main as full

        code = full()
    return code


if __name__ == "__main__":
    sys.exit(main())
