"""The llama.cpp runtime the edge tests run (node-llama-cpp 3.21.1 in examples/edge, installed by `make edge`): under
CI its absence fails a test, elsewhere it skips it."""

import os
import shutil
from pathlib import Path

import pytest

EDGE = Path(__file__).resolve().parent.parent / "examples" / "edge"


def require_llama_cpp() -> str:
    """The path of `node`, with node-llama-cpp installed beside examples/edge; fails (CI) or skips without them."""
    node = shutil.which("node")
    if node is None or not (EDGE / "node_modules" / "node-llama-cpp").is_dir():
        message = "llama.cpp runtime missing: run `npm ci` in examples/edge (Node 20)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return node
