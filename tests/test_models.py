"""Resolving --model: aliases, folders, .gguf files and hub ids, with one-line errors when unusable."""

import time

import pytest

from kvzip_cli import KvcError
from kvzip_cli.devices import resolve_device, resolve_dtype
from kvzip_cli.models import load_model, resolve


def test_unknown_model(tmp_path):
    with pytest.raises(KvcError, match="unknown model 'nonsense'"):
        resolve("nonsense")


def test_missing_gguf(tmp_path):
    with pytest.raises(KvcError, match="does not exist"):
        resolve(str(tmp_path / "m.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(KvcError, match="without config.json"):
        resolve(str(tmp_path))


def test_local_folder(tiny_folder):
    lm = load_model(str(tiny_folder), device="cpu")
    assert lm.model.config.num_hidden_layers == 3
    assert lm.name == str(tiny_folder)


def test_hub_alias_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(KvcError, match="qwen2.*not in the local Hugging Face cache"):
        resolve("qwen2")
    assert time.perf_counter() - started < 5


def test_devices_and_dtypes():
    import torch

    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(KvcError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    with pytest.raises(KvcError, match="unknown device"):
        resolve_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(KvcError, match="no CUDA device"):
            resolve_device("cuda")
