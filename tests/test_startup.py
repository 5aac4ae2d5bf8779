"""Service start-up checks, run as real processes."""

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.tiny_models import save_tiny_pair


def swap_two_tokens(model_dir) -> None:
    """Give ``w1`` and ``w2`` each other's ids in the saved tokenizer."""
    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab["w1"], vocab["w2"] = vocab["w2"], vocab["w1"]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("service", ["verify", "draft"])
def test_mismatched_tokenizers_stop_startup(service, tmp_path):
    target, draft = save_tiny_pair(tmp_path)
    swap_two_tokens(draft)
    env = {
        **os.environ,
        "SAGUARO_NAMESPACE": f"startup-{uuid.uuid4().hex[:8]}",
        "SAGUARO_TARGET_MODEL": str(target),
        "SAGUARO_DRAFT_MODEL": str(draft),
        "SAGUARO_DTYPE": "float32",
        "SAGUARO_VERIFY_METRICS_PORT": "0",
        "SAGUARO_DRAFT_METRICS_PORT": "0",
        "SAGUARO_DRAFT_BIND": "tcp://127.0.0.1:*",
    }
    result = subprocess.run([sys.executable, "-m", f"services.{service}.main"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "cannot start" in result.stderr
    assert "w1" in result.stderr


def test_missing_model_directory_is_reported(tmp_path):
    env = {**os.environ, "SAGUARO_TARGET_MODEL": str(tmp_path / "nowhere"), "SAGUARO_MODE": "ar", "SAGUARO_VERIFY_METRICS_PORT": "0"}
    result = subprocess.run([sys.executable, "-m", "services.verify.main"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "nowhere" in result.stderr
    assert "saguaro-models" in result.stderr
    assert "Traceback" not in result.stderr


def test_native_matmul_check_follows_torch():
    import torch

    from shared.modeling import cpu_has_native_matmul

    assert cpu_has_native_matmul("float32")
    assert cpu_has_native_matmul("bfloat16") == torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.parametrize("native", [True, False])
def test_load_warns_without_native_bf16(native, tmp_path, monkeypatch, caplog):
    import torch

    from shared import modeling

    target, _ = save_tiny_pair(tmp_path)
    monkeypatch.setattr(modeling, "cpu_has_native_matmul", lambda dtype: native)
    with caplog.at_level("WARNING", logger="saguaro.modeling"):
        model = modeling.load_causal_lm(str(target), "bfloat16", torch.device("cpu"))
    assert model.dtype == torch.bfloat16
    warned = "no native bfloat16 matmul instructions" in caplog.text
    assert warned == (not native)


def test_auto_dtype_follows_native_bf16(monkeypatch):
    import torch

    from shared import modeling

    cpu = torch.device("cpu")
    assert modeling.resolve_dtype("float16", cpu) == "float16"
    monkeypatch.setattr(modeling, "cpu_has_native_matmul", lambda dtype: True)
    assert modeling.resolve_dtype("auto", cpu) == "bfloat16"
    monkeypatch.setattr(modeling, "cpu_has_native_matmul", lambda dtype: False)
    assert modeling.resolve_dtype("auto", cpu) == "float32"
    assert modeling.resolve_dtype("bfloat16", cpu) == "bfloat16"


def test_auto_dtype_loads_float32_without_native_bf16(tmp_path, monkeypatch, caplog):
    import torch

    from shared import modeling

    target, _ = save_tiny_pair(tmp_path)
    monkeypatch.setattr(modeling, "cpu_has_native_matmul", lambda dtype: dtype != "bfloat16")
    with caplog.at_level("INFO", logger="saguaro.modeling"):
        model = modeling.load_causal_lm(str(target), "auto", torch.device("cpu"))
    assert model.dtype == torch.float32
    assert "dtype auto: loading tiny-target in float32" in caplog.text
    assert "no native" not in caplog.text
