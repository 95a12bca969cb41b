"""`format/` installs on its own (`pip install ./format`) into a clean virtual environment, without torch or
transformers, and decodes, verifies and exports every golden file there exactly as recorded."""

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).parent.parent
GOLDEN = ROOT / "format" / "golden"
TOOLING = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence.pth")
MAX_INSTALL_BYTES = 200 << 20  # numpy + zstandard + msgpack + kvc_format: about 100 MB on x86-64 Linux

CHECK = """
import hashlib, importlib.util, json, sys
from pathlib import Path
import numpy as np
import kvc_format

for heavy in ("torch", "transformers", "kvzip_cli"):
    if importlib.util.find_spec(heavy) is not None:
        sys.exit(f"{heavy} is installed in the clean environment")
golden = Path(sys.argv[1])
expected = json.loads((golden / "expected.json").read_text())
for name, want in expected.items():
    with kvc_format.KvcReader(golden / name) as reader:
        reader.verify()
        for stored, layer in zip(reader.read_layers(), want["layers"], strict=True):
            assert hashlib.sha256(stored.keys.data.tobytes()).hexdigest() == layer["keys"], name
            assert hashlib.sha256(stored.values.data.tobytes()).hexdigest() == layer["values"], name
    heads = kvc_format.load_file(golden / name)
    assert all(np.isfinite(a).all() for a in heads.values()), name
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"files": len(expected), "heavy_modules": loaded}))
"""


def _site_packages_bytes(env: Path) -> int:
    site = next(env.glob("lib/python3*/site-packages"))
    return sum(p.stat().st_size for top in site.iterdir() if not top.name.startswith(TOOLING)
               for p in ([top] if top.is_file() else top.rglob("*")) if p.is_file())


def test_format_package_installs_and_runs_without_torch(tmp_path):
    source, wheels = tmp_path / "source", tmp_path / "wheels"
    # Built from a copy: pip builds in place and would leave build/ and *.egg-info in the checkout.
    shutil.copytree(ROOT / "format", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(source)],
                   check=True, timeout=300)
    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *map(str, wheels.glob("*.whl"))], check=True,
                   timeout=600)
    done = subprocess.run([str(python), "-c", CHECK, str(GOLDEN)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # not the repository, whose format/ must not shadow the installed package
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == {"files": len(list(GOLDEN.glob("*.kvc"))), "heavy_modules": []}

    out = tmp_path / "doc.safetensors"
    exported = subprocess.run([str(env / "bin" / "kvc-format"), "export", str(GOLDEN / "quantized-rope-channel.kvc"),
                               str(out)], capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0 and out.stat().st_size > 0, exported.stderr
    refused = subprocess.run([str(env / "bin" / "kvc-format"), "verify", str(ROOT / "README.md")],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and refused.stderr.startswith("error: ")

    size = _site_packages_bytes(env)
    print(f"torch-free reader installed: {size / 2**20:.1f} MiB (numpy, zstandard, msgpack, kvc_format)")
    assert size < MAX_INSTALL_BYTES
