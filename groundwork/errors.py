"""The one root of the errors a user can act on.

Every error whose message is a one-line explanation for the user (what was wrong, naming the field, file
or folder, and what to do) derives from `UserError`; `groundwork.cli.run_main` turns any of them into
that line on stderr and exit code 2, so no command needs its own list. Errors that mean a bug in the
project stay ordinary exceptions and keep their traceback.
"""


class UserError(Exception):
    """Bad input or a stop the user can act on; the message is one line."""
