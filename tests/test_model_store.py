"""Tests of shared.model_store that run offline: fake part files, tiny tokenizers, no pip."""

from __future__ import annotations

import errno
import hashlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from shared import model_store
from shared.model_store import (
    ChecksumMismatchError,
    InsufficientDiskSpaceError,
    ModelSource,
    TokenizerMismatchError,
    assemble_parts,
    check_disk_space,
    check_tokenizers_match,
    ensure_model,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
FAKE_MODEL = "fake-model"


def _write_parts(directory: Path, contents: list[bytes]) -> list[Path]:
    paths = []
    for index, content in enumerate(contents, start=1):
        path = directory / f"part{index:02d}.bin"
        path.write_bytes(content)
        paths.append(path)
    return paths


def _fake_source(content: bytes, sha256: str | None = None) -> ModelSource:
    return ModelSource(
        packages=("fake-part1", "fake-part2", "fake-part3"),
        version="1.0",
        gguf_file="fake.gguf",
        size=len(content),
        sha256=sha256 or hashlib.sha256(content).hexdigest(),
        converted_size=1000,
        eos_tokens=("</s>",),
    )


def _fail(*args, **kwargs):
    raise AssertionError("this step must not run")


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """Register FAKE_MODEL whose packages 'install' as three small local part files."""
    contents = [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]
    part_paths = _write_parts(tmp_path, contents)
    joined = b"".join(contents)
    calls = SimpleNamespace(install=0, convert=0)

    def fake_install(source, packages_dir, pip_tmp_dir):
        calls.install += 1
        packages_dir.mkdir(parents=True)

    def fake_convert(gguf_path, output_dir, source):
        calls.convert += 1
        assert gguf_path.read_bytes() == joined
        output_dir.mkdir(parents=True)
        (output_dir / "config.json").write_text("{}")

    monkeypatch.setattr(model_store, "_install_packages", fake_install)
    monkeypatch.setattr(model_store, "_locate_parts", lambda source, packages_dir: part_paths)
    monkeypatch.setattr(model_store, "convert_gguf", fake_convert)
    monkeypatch.setitem(model_store.MODELS, FAKE_MODEL, _fake_source(joined))
    return SimpleNamespace(content=joined, calls=calls, cache_dir=tmp_path / "cache")


def test_assemble_parts_joins_in_order(tmp_path):
    contents = [b"first-", b"second-", b"third"]
    part_paths = _write_parts(tmp_path, contents)
    joined = b"".join(contents)
    output_path = tmp_path / "out" / "model.gguf"

    result = assemble_parts(part_paths, output_path, len(joined), hashlib.sha256(joined).hexdigest())

    assert result == output_path
    assert output_path.read_bytes() == joined


def test_assemble_parts_checksum_mismatch(tmp_path):
    part_paths = _write_parts(tmp_path, [b"abc", b"def"])
    output_path = tmp_path / "model.gguf"
    expected_sha256 = "0" * 64
    actual_sha256 = hashlib.sha256(b"abcdef").hexdigest()

    with pytest.raises(ChecksumMismatchError) as caught:
        assemble_parts(part_paths, output_path, 6, expected_sha256)

    message = str(caught.value)
    assert expected_sha256 in message
    assert actual_sha256 in message
    assert str(output_path) in message
    assert not output_path.exists()


def test_assemble_parts_size_mismatch(tmp_path):
    part_paths = _write_parts(tmp_path, [b"abc", b"def"])
    output_path = tmp_path / "model.gguf"

    with pytest.raises(ChecksumMismatchError) as caught:
        assemble_parts(part_paths, output_path, 7, hashlib.sha256(b"abcdef").hexdigest())

    assert "7 bytes" in str(caught.value)
    assert "6 bytes" in str(caught.value)
    assert not output_path.exists()


def test_ensure_model_builds_then_reuses(fake_build):
    model_dir = ensure_model(FAKE_MODEL, fake_build.cache_dir)

    assert model_dir == fake_build.cache_dir / FAKE_MODEL
    assert (model_dir / ".complete").read_text().strip() == hashlib.sha256(fake_build.content).hexdigest()
    assert fake_build.calls.install == 1
    assert fake_build.calls.convert == 1
    assert not list(fake_build.cache_dir.glob(f".{FAKE_MODEL}.build-*"))

    assert ensure_model(FAKE_MODEL, fake_build.cache_dir) == model_dir
    assert fake_build.calls.install == 1
    assert fake_build.calls.convert == 1


def test_ensure_model_checksum_mismatch_cleans_up(fake_build, monkeypatch):
    bad_source = _fake_source(fake_build.content, sha256="f" * 64)
    monkeypatch.setitem(model_store.MODELS, FAKE_MODEL, bad_source)

    with pytest.raises(ChecksumMismatchError, match="f" * 64):
        ensure_model(FAKE_MODEL, fake_build.cache_dir)

    assert fake_build.calls.convert == 0
    assert not (fake_build.cache_dir / FAKE_MODEL).exists()
    assert not list(fake_build.cache_dir.glob(f".{FAKE_MODEL}.build-*"))


def test_ensure_model_marker_skips_work(tmp_path, monkeypatch):
    source = _fake_source(b"content")
    monkeypatch.setitem(model_store.MODELS, FAKE_MODEL, source)
    model_dir = tmp_path / FAKE_MODEL
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / ".complete").write_text(source.sha256 + "\n")
    monkeypatch.setattr(model_store, "_build_model", _fail)
    monkeypatch.setattr(model_store, "check_disk_space", _fail)

    assert ensure_model(FAKE_MODEL, tmp_path) == model_dir


def test_ensure_model_rebuilds_outdated_marker(fake_build):
    model_dir = fake_build.cache_dir / FAKE_MODEL
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir / "stale.bin").write_text("old")
    (model_dir / ".complete").write_text("e" * 64)

    ensure_model(FAKE_MODEL, fake_build.cache_dir)

    assert fake_build.calls.convert == 1
    assert not (model_dir / "stale.bin").exists()
    assert (model_dir / ".complete").read_text().strip() != "e" * 64


def test_ensure_model_complete_skips_heavy_imports(tmp_path):
    name = "smollm2-135m-instruct"
    model_dir = tmp_path / name
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / ".complete").write_text(model_store.MODELS[name].sha256)
    script = (
        "import sys\n"
        "from shared.model_store import ensure_model\n"
        f"print(ensure_model({name!r}, {str(tmp_path)!r}))\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )

    assert result.stdout.splitlines() == [str(model_dir), "[]"]


def test_ensure_model_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown model name 'no-such-model'"):
        ensure_model("no-such-model", tmp_path)


def test_check_disk_space_message(tmp_path, monkeypatch):
    monkeypatch.setattr(model_store.shutil, "disk_usage", lambda path: SimpleNamespace(free=500_000_000))

    with pytest.raises(InsufficientDiskSpaceError) as caught:
        check_disk_space(tmp_path, 2_000_000_000, "some-model")

    message = str(caught.value)
    assert str(tmp_path) in message
    assert "some-model" in message
    assert "2.00 GB" in message
    assert "0.50 GB free" in message


def test_ensure_model_checks_disk_before_install(fake_build, monkeypatch):
    monkeypatch.setattr(model_store.shutil, "disk_usage", lambda path: SimpleNamespace(free=10))
    monkeypatch.setattr(model_store, "_install_packages", _fail)

    with pytest.raises(InsufficientDiskSpaceError, match=FAKE_MODEL):
        ensure_model(FAKE_MODEL, fake_build.cache_dir)


def test_ensure_model_reports_enospc(fake_build, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_store, "convert_gguf", full_disk)

    with pytest.raises(InsufficientDiskSpaceError) as caught:
        ensure_model(FAKE_MODEL, fake_build.cache_dir)

    assert "ran out of disk space" in str(caught.value)
    assert str(fake_build.cache_dir) in str(caught.value)
    assert not list(fake_build.cache_dir.glob(f".{FAKE_MODEL}.build-*"))


def test_ensure_model_reports_safetensors_enospc(fake_build, monkeypatch):
    class SafetensorError(Exception):
        """Stand-in for safetensors' error type, which is not an OSError."""

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(model_store, "convert_gguf", full_disk)

    with pytest.raises(InsufficientDiskSpaceError, match="ran out of disk space"):
        ensure_model(FAKE_MODEL, fake_build.cache_dir)


def test_ensure_model_keeps_other_oserror(fake_build, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(model_store, "convert_gguf", denied)

    with pytest.raises(PermissionError):
        ensure_model(FAKE_MODEL, fake_build.cache_dir)


def _save_tokenizer(directory: Path, vocab: dict[str, int], eos_token: str = "</s>") -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=eos_token)
    tokenizer.save_pretrained(directory)
    return directory


BASE_VOCAB = {"<unk>": 0, "</s>": 1, "<end>": 2, "def": 3, "return": 4, "x": 5}


def test_tokenizers_match_identical(tmp_path):
    target = _save_tokenizer(tmp_path / "target", BASE_VOCAB)
    draft = _save_tokenizer(tmp_path / "draft", dict(BASE_VOCAB))

    check_tokenizers_match(target, draft)


def test_tokenizers_mismatch_swapped_ids(tmp_path):
    swapped = {**BASE_VOCAB, "def": 4, "return": 3}
    target = _save_tokenizer(tmp_path / "target", BASE_VOCAB)
    draft = _save_tokenizer(tmp_path / "draft", swapped)

    with pytest.raises(TokenizerMismatchError) as caught:
        check_tokenizers_match(target, draft)

    message = str(caught.value)
    assert "'def': target id 3, draft id 4" in message
    assert "'return': target id 4, draft id 3" in message
    assert "2 differing entries" in message


def test_tokenizers_mismatch_extra_token(tmp_path):
    target = _save_tokenizer(tmp_path / "target", BASE_VOCAB)
    draft = _save_tokenizer(tmp_path / "draft", {**BASE_VOCAB, "lambda": 6})

    with pytest.raises(TokenizerMismatchError) as caught:
        check_tokenizers_match(target, draft)

    assert "'lambda': target id None, draft id 6" in str(caught.value)
    assert "target 6 tokens, draft 7 tokens" in str(caught.value)


def test_tokenizers_mismatch_special_tokens(tmp_path):
    target = _save_tokenizer(tmp_path / "target", BASE_VOCAB, eos_token="</s>")
    draft = _save_tokenizer(tmp_path / "draft", BASE_VOCAB, eos_token="<end>")

    with pytest.raises(TokenizerMismatchError) as caught:
        check_tokenizers_match(target, draft)

    message = str(caught.value)
    assert "special tokens differ" in message
    assert "eos_token: target '</s>', draft '<end>'" in message
    assert "vocabularies differ" not in message


def test_tokenizer_mismatch_is_value_error():
    assert issubclass(TokenizerMismatchError, ValueError)


@pytest.mark.slow
@pytest.mark.skipif(
    not all(
        model_store.is_model_complete(model_store.DEFAULT_CACHE_DIR / name, model_store.MODELS[name])
        for name in model_store.MODELS
    ),
    reason="the converted models are not in the default cache directory; run saguaro-models --all",
)
def test_real_tokenizers():
    cache_dir = model_store.DEFAULT_CACHE_DIR
    target = cache_dir / model_store.TARGET_MODEL
    draft = cache_dir / model_store.DRAFT_MODEL
    small = cache_dir / model_store.SMALL_TEST_MODEL

    check_tokenizers_match(target, draft)
    with pytest.raises(TokenizerMismatchError, match="vocabularies differ"):
        check_tokenizers_match(target, small)


def test_cli_prints_model_dirs(tmp_path, monkeypatch, capsys):
    for name in (model_store.TARGET_MODEL, model_store.DRAFT_MODEL):
        model_dir = tmp_path / name
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{}")
        (model_dir / ".complete").write_text(model_store.MODELS[name].sha256)
    monkeypatch.setattr(model_store, "_build_model", _fail)

    exit_code = model_store.main(["--cache-dir", str(tmp_path)])

    assert exit_code == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{model_store.TARGET_MODEL}\t{tmp_path / model_store.TARGET_MODEL}",
        f"{model_store.DRAFT_MODEL}\t{tmp_path / model_store.DRAFT_MODEL}",
    ]


def test_cli_failure_exit_code(fake_build, monkeypatch, capsys):
    monkeypatch.setitem(model_store.MODELS, FAKE_MODEL, _fake_source(fake_build.content, sha256="f" * 64))

    exit_code = model_store.main(["--cache-dir", str(fake_build.cache_dir), FAKE_MODEL])

    captured = capsys.readouterr()
    assert exit_code == 1
    assert captured.out == ""
    assert "saguaro-models: error: assembled file" in captured.err
    assert "Traceback" not in captured.err


def test_cli_unknown_name(capsys):
    with pytest.raises(SystemExit) as caught:
        model_store.main(["no-such-model"])

    assert caught.value.code == 2
    assert "unknown model name(s): no-such-model" in capsys.readouterr().err
