"""The one exception type that means "the user gave us something we cannot use".

Anything raised as a UserError is printed by the command line as a single line (no traceback) and ends the
process with exit status 2. The message must name the key, file or line at fault and say what would fix it.
"""


class UserError(Exception):
    """Bad input from the user: config values, paths, data files, checkpoints."""

    exit_code = 2
