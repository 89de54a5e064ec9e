"""Run ``python -m MODULE ARGS`` in a process session of its own.

``bench/servers.py`` starts each ``mlx_lm.server`` rank as
``python bench/in_own_session.py -m mlx_lm server ...``: on Linux each session
is a scheduler autogroup, and Pomona's worker starts each runner in a session
of its own, so each mlx-lm rank gets one too (see ``mlx_lm_rank.own_session``).
"""

from __future__ import annotations

import runpy
import sys

from mlx_lm_rank import own_session

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: in_own_session.py -m MODULE [ARGS ...]")
    own_session()
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
