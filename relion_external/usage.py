"""The error for a wrongly set up External job (a missing input, a bad parameter of a mode).

Its own module, below both the job (``cli``) and the ``select_classes`` mode, so that neither imports
the other to raise it.
"""

from __future__ import annotations


class UsageError(ValueError):
    """The job's parameters or inputs are wrong; the message says which and how to set them."""
