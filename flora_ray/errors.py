"""The one exception type for input the user can fix.

``InputError`` is raised for a configuration key, a file, a URI, a model name or a command-line choice that is
wrong and that the user can correct; its message names the problem and the fix in one line. The CLI reports it as
``flora-ray: error: ...`` with exit code 2 and no traceback. Every other exception is a failure of flora-ray or of
something under it (exit code 1, its type and stage named, ``-v`` for the traceback).

It subclasses ``ValueError`` so that callers catching ``ValueError`` keep working.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input the user can fix: the message says what is wrong and how to fix it, in one line."""
