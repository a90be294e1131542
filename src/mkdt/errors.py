"""The exceptions a user sees as one line, and the exit codes they map to.

The CLI prints an ``MkdtError`` as ``mkdt <command>: error: <message>`` and exits 1 (a failure during
work) or 2 (a ``ConfigError``: the command line, a config file or an input path is wrong, found before
any stage runs). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os


class MkdtError(Exception):
    """Bad input or state that the user can fix; the message names the file/value and the fix."""

    exit_code = 1


class ConfigError(MkdtError):
    """A usage or configuration error: unknown key, wrong type, value out of range, missing input."""

    exit_code = 2


class ArtifactIOError(MkdtError):
    """Reading or writing a file failed for a reason of the file system (read-only, full, too large,
    permission): the message names the path, the cause and the fix."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interruption so it unwinds like Ctrl-C: finished work is kept."""


_IO_FIXES = {
    errno.EROFS: ("read-only file system", "write to another folder (--out)"),
    errno.ENOSPC: ("no space left on the device", "free space or write to another disk (--out)"),
    errno.EDQUOT: ("disk quota exceeded", "free space or write to another disk (--out)"),
    errno.EFBIG: ("file too large for this file system or the file-size limit (ulimit -f)",
                  "raise the limit or write to another file system (--out)"),
    errno.EACCES: ("permission denied", "fix the folder's permissions or write elsewhere (--out)"),
    errno.EPERM: ("operation not permitted", "fix the folder's permissions or write elsewhere (--out)"),
    errno.ENOTDIR: ("a path component is a file, not a folder", "choose a folder path (--out)"),
    errno.EEXIST: ("a file exists where a folder is needed", "choose a folder path (--out)"),
    errno.EISDIR: ("a folder exists where a file is needed", "remove it or choose another path"),
}


def io_error(path: str | os.PathLike, exc: OSError) -> ArtifactIOError:
    """``exc`` (raised while writing/reading ``path``) as one line: path, cause, fix."""
    cause, fix = _IO_FIXES.get(exc.errno or -1, (exc.strerror or str(exc), "check the path and retry"))
    return ArtifactIOError(f"{path}: {cause}; {fix}")
