"""One exception type for problems the user can fix.

The CLI prints ``MkdtError`` as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class MkdtError(Exception):
    """Bad input or state that the user can fix; the message names the file/value and the fix."""
