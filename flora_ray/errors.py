"""What went wrong, told apart: input the user can fix, a stage left unfinished, and everything else.

``InputError`` is raised for a configuration key, a file, a URI, a model name or a command-line choice that is
wrong and that the user can correct; its message names the problem and the fix in one line. The CLI reports it as
``flora-ray: error: ...`` with exit code 2 and no traceback. It subclasses ``ValueError`` (``MissingInput`` also
``FileNotFoundError``) so that callers catching those keep working. Every other exception is a failure of flora-ray
or of something under it: the CLI names its type and the stage it happened in (``note_stage``), exits with 1 and
shows the traceback with ``-v``.
"""

from __future__ import annotations

import contextlib


class InputError(ValueError):
    """Input the user can fix: the message says what is wrong and how to fix it, in one line."""


class MissingInput(InputError, FileNotFoundError):
    """A file or directory the user names, or must make first, does not exist (also a ``FileNotFoundError``)."""


class StageUnfinished(RuntimeError):
    """A stage returned with work left that re-running the same command continues (an interrupted search): no fault
    of the input nor of flora-ray, so the CLI prints the message as it is, with exit code 1."""


STAGE_ATTRIBUTE = "flora_ray_stage"


def note_stage(exc: BaseException, stage: str) -> None:
    """Record on ``exc`` the stage it happened in (the innermost one, if stages nest), for the CLI's report."""
    if getattr(exc, STAGE_ATTRIBUTE, None) is None:
        with contextlib.suppress(AttributeError):  # a type that takes no attributes: reported without its stage
            setattr(exc, STAGE_ATTRIBUTE, stage)


def stage_of(exc: BaseException) -> str | None:
    """The stage ``exc`` happened in, when ``note_stage`` recorded one."""
    return getattr(exc, STAGE_ATTRIBUTE, None)
