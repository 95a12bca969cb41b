"""One crafted file per attack class of FORMAT-LESSONS.md (tests/format/attacks.py): each is refused with its typed
error, quickly and with bounded memory, by the library and `python -m kvc_format` (`kvc verify` and `kvc load`:
tests/test_cli_attacks.py)."""

import ast
import os
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

import kvc_format
from kvc_format import ChecksumError, KvcFormatError, KvcReader, TruncatedError

from attacks import ATTACKS, GOLDEN, IDS, Attack

FORMAT_DIR = Path(kvc_format.__file__).parent
PEAK_BYTES = 16 << 20  # what refusing any crafted file may allocate (Python and numpy allocations, tracemalloc)


def refuse(path: Path, attack: Attack) -> None:
    with KvcReader(path) as reader:
        assert attack.stage == "verify", "the file opened: its attack should be caught on open"
        reader.verify()


def test_every_attack_class_has_a_crafted_file():
    classes = {a.number for a in ATTACKS} | {7, 13}  # 7 and 13 are tested below, on top of the crafted files
    assert classes == set(range(1, 14))


@pytest.mark.parametrize("attack", ATTACKS, ids=IDS)
def test_crafted_file_gives_its_typed_error_fast_and_small(crafted, attack):
    path = crafted[IDS[ATTACKS.index(attack)]]
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(KvcFormatError) as caught:
            refuse(path, attack)
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert type(caught.value).__name__ == attack.error, caught.value
    assert seconds < 1.0
    assert peak < PEAK_BYTES, f"{peak / 2**20:.1f} MiB"


def test_edge_reader_command_prints_one_line(crafted):
    for name, path in list(crafted.items())[:: max(1, len(crafted) // 8)]:
        result = subprocess.run([sys.executable, "-m", "kvc_format", "verify", str(path)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 1, (name, result.stdout)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), (name, result.stderr)


# --- 7. asserts as validation ---------------------------------------------------------------------------------

def test_format_package_validates_without_assert():
    for source in FORMAT_DIR.rglob("*.py"):
        tree = ast.parse(source.read_text())
        asserts = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
        assert not asserts, f"{source.name} uses assert at lines {asserts}"


def test_crafted_files_refused_the_same_under_python_O(crafted):
    """Python -O strips asserts: every check must still fire."""
    script = ("import sys\nfrom kvc_format import KvcReader, KvcFormatError\nfor path in sys.argv[1:]:\n"
              "    try:\n        with KvcReader(path) as r: r.verify()\n        print('ACCEPTED', path)\n"
              "    except KvcFormatError as e: print(type(e).__name__)\n")
    paths = [str(p) for p in crafted.values()]
    result = subprocess.run([sys.executable, "-O", "-c", script, *paths], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [a.error for a in ATTACKS]


# --- 11. code execution ---------------------------------------------------------------------------------------

def test_format_package_never_unpickles_or_evaluates():
    banned_modules = {"pickle", "marshal", "shelve", "dill", "cloudpickle"}
    banned_calls = {"eval", "exec", "compile", "__import__"}
    for source in FORMAT_DIR.rglob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = {a.name.split(".")[0] for a in node.names} | {(getattr(node, "module", "") or "").split(".")[0]}
                assert not names & banned_modules, f"{source.name}:{node.lineno} imports {names & banned_modules}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in banned_calls, f"{source.name}:{node.lineno} calls {node.func.id}"
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                raise AssertionError(f"{source.name}:{node.lineno} passes allow_pickle")


# --- 13. file changed while open ------------------------------------------------------------------------------

def test_section_rewritten_under_an_open_reader_fails_its_checksum(tmp_path):
    path = tmp_path / "doc.kvc"
    shutil.copy(GOLDEN / "quantized-rans.kvc", path)
    with KvcReader(path) as reader:
        section = reader.sections[1]
        with open(path, "r+b") as f:  # another process rewrites bytes in place
            f.seek(section.offset + section.length // 2)
            f.write(b"\x55" * 16)
        reader.read_layer(0)
        with pytest.raises(ChecksumError):
            reader.read_layer(1)


def test_file_truncated_under_an_open_reader(tmp_path):
    path = tmp_path / "doc.kvc"
    shutil.copy(GOLDEN / "dense-zstd.kvc", path)
    with KvcReader(path) as reader:
        os.truncate(path, reader.sections[1].offset + 10)
        with pytest.raises(TruncatedError):
            reader.read_layer(1)


def test_file_replaced_under_an_open_reader_keeps_its_old_bytes(tmp_path):
    """Writers rename a complete file over the old one: a reader that opened the old one reads it to the end."""
    path = tmp_path / "doc.kvc"
    shutil.copy(GOLDEN / "quantized-rans.kvc", path)
    with KvcReader(path) as reader:
        expected = [layer.keys.data.copy() for layer in reader.read_layers()]
        with kvc_format.KvcWriter(path, {"replaced": True}):
            pass
        assert path.stat().st_size < 1000  # the path now names the new file
        reader.verify()
        assert all((a.keys.data == b).all() for a, b in zip(reader.read_layers(), expected, strict=True))


def test_threads_share_one_reader(tmp_path):
    with KvcReader(GOLDEN / "quantized-rans.kvc") as reader:
        expected = [layer.values.data for layer in reader.read_layers()]
        failures = []

        def work():
            for _ in range(20):
                for i, layer in enumerate(reader.read_layers()):
                    if not (layer.values.data == expected[i]).all():
                        failures.append(i)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures
