"""The exit statuses dist_train promises, and the one exception type users can cause.

Everything a user can get wrong (a flag, a config value, a URL, a checkpoint that
does not fit) raises `UserError`; the CLI turns it into one line on stderr and
exit status 2. Any other exception is a bug and keeps its traceback.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
# A newer attempt took over the run dir; this (zombie) attempt must not write.
EXIT_SUPERSEDED = 3
# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry".
# A preempted job committed what it could and wants to be started again.
EXIT_PREEMPTED = 75


def exit_now(status: int) -> None:
    """Leave this process at once with `status`, logs and standard streams flushed first.

    Used where the interpreter's normal shutdown is not wanted: a torchrun worker after its
    process group is torn down, or a rank past its preemption deadline.
    """
    import logging
    import os
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not keep us here
            pass
    os._exit(status)


class UserError(Exception):
    """A problem the user can fix: reported as one line, exit status 2."""


class StorageError(Exception):
    """Checkpoint storage failed in a way retries did not fix."""


class SupersededError(Exception):
    """A newer attempt owns the run dir; this one is fenced out."""


class LocalUserError(UserError):
    """Bad input that one rank found alone (a corrupt file it read): that rank reports it, whatever its
    rank, and leaves with status 2; its peers, waiting in a collective, are stopped by torchrun."""


def printable(text: str, limit: int = 200) -> str:
    """`text` from a file or a path, safe for a terminal: control characters (escape codes) escaped, cut."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
    return out if len(out) <= limit else out[:limit - 3] + "..."
