"""Session-wide test setup."""

from __future__ import annotations

import signal

# A shell that starts a command in the background (`cmd &`, nohup, some CI
# runners) sets SIGINT to "ignore", and an ignored signal stays ignored in
# every child: the tests that press Ctrl-C in a child (`pomona chat`, `pomona
# status --watch`, `pomona events --follow`) would then wait in vain. A Python
# handler is reset to the default in exec'd children, so this gives them the
# SIGINT a terminal would.
signal.signal(signal.SIGINT, signal.default_int_handler)
