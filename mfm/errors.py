"""The one exception type for mistakes a user can fix (params, files, checkpoints, data).

The CLI turns it into a single line on stderr and exit code 2, so a stage never dies with a
traceback for something the user caused.
"""


class UserError(Exception):
    """A problem caused by the user's input; the message names the cause and the fix."""


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; a rerun resumes from it.

    The CLI prints the message and exits 143 (128 + SIGTERM), so DVC and Snakemake see the
    stage as failed, never as done.
    """

    exit_code = 143
