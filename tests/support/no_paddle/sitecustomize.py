"""Hides paddle from every Python process started with this folder on PYTHONPATH (scripts/test.sh's paddle-free
run): a ``sys.meta_path`` finder refuses ``paddle`` and its submodules, as on a machine with neither paddle wheel.
The tests marked ``paddle_free`` run once this way, which also proves they need no paddle."""
import importlib.abc
import os
import sys


class _NoPaddle(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "paddle" or name.startswith("paddle."):
            raise ImportError(f"No module named {name!r} (hidden: a paddle_free test run)")
        return None


sys.meta_path.insert(0, _NoPaddle())
os.environ["DISTILL_PADDLE_HIDDEN"] = "1"   # tests/conftest.py collects only the paddle_free files
