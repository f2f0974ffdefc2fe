"""Hide PyTorch from this interpreter: put this directory on PYTHONPATH and ``import torch``
(or any ``torch.*``) raises ImportError, as on a machine without PyTorch installed.

Used by ``tests/test_no_torch.py`` and ``.ci/run`` to prove the ONNX path needs no torch.
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder


class _HideTorch(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - importlib protocol
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"No module named {name!r} (hidden by tests/no_torch/sitecustomize.py)")
        return None


sys.meta_path.insert(0, _HideTorch())
