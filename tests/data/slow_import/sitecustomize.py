"""Makes this interpreter's first import of an mlx-lm model module slow.

Put this folder on PYTHONPATH of a process (and its children): importing
mlx-lm's model code can take 12-16 s on a Mac that also has PyTorch
installed, and deadlines must not depend on it being fast.
"""

import importlib.abc
import os
import sys
import time


class _SlowModelImport(importlib.abc.MetaPathFinder):
    slept = False

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name.startswith("mlx_lm.models.") and not self.slept:
            self.slept = True
            time.sleep(float(os.environ.get("POMONA_TEST_SLOW_IMPORT_S", "12")))
        return None


sys.meta_path.insert(0, _SlowModelImport())
