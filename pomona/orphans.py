"""No orphan processes: children that die with the process that started them."""

from __future__ import annotations

import signal
import sys


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """On Linux, have the kernel send ``sig`` to this process when its parent dies.

    Call it in the child (for instance as ``preexec_fn``). macOS has no such
    call; there the daemons' children also watch their stdin.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
