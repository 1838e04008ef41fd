"""What ``edgefleet versions push PATH`` uploads: each file's role, format and precision.

A file, a directory of them, or a GGUF. Nothing here talks to the plane.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edgefleet_client.errors import EdgefleetError

# In a file name: model.int8.onnx, minilm-fp16.onnx, qwen2-0_5b-instruct-q4_k_m.gguf, ...-f16.gguf
_PRECISIONS = [
    ("int4", re.compile(r"(int4|q4|iq4|q3|q2)", re.I)),
    ("int8", re.compile(r"(int8|q8|quantized)", re.I)),
    ("fp16", re.compile(r"(fp16|f16|bf16|half)", re.I)),
    ("fp32", re.compile(r"(fp32|f32)", re.I)),
]
TOKENIZER_NAMES = ("tokenizer.json",)


@dataclass(frozen=True)
class Upload:
    """One file to upload, with the artifact fields the plane wants."""

    path: Path
    role: str
    format: str
    precision: str = ""
    hardware_class: str = "any"

    def describe(self) -> str:
        what = f"{self.role}, {self.format}" + (f", {self.precision}" if self.precision else "")
        return f"{self.path.name} ({what}, {self.hardware_class})"


def plan_uploads(path: Path, *, precision: str | None = None, hardware_class: str = "any") -> list[Upload]:
    """The uploads for a file or a directory; an ``EdgefleetError`` saying why if there is nothing to push."""
    if not path.exists():
        raise EdgefleetError(f"{path} does not exist")
    if path.is_file():
        upload = _upload(path, precision, hardware_class)
        if upload is None:
            raise EdgefleetError(f"{path.name}: push an .onnx model, a .gguf model or a tokenizer.json")
        return [upload]
    uploads = [u for f in sorted(path.iterdir()) if f.is_file() and (u := _upload(f, precision, hardware_class))]
    if not any(u.role in ("model", "source") for u in uploads):
        raise EdgefleetError(f"{path} holds no .onnx or .gguf model file")
    return uploads


def _upload(path: Path, precision: str | None, hardware_class: str) -> Upload | None:
    name = path.name.lower()
    if name in TOKENIZER_NAMES:
        return Upload(path, role="tokenizer", format=name)
    if name.endswith(".onnx"):
        return Upload(path, "model", "onnx", precision or guess_precision(name, "fp32"), hardware_class)
    if name.endswith(".gguf"):
        # A generative model's source: the plane converts it into the bundles devices run (optimize).
        return Upload(path, "source", "gguf", precision or guess_precision(name, "fp16"), hardware_class)
    return None


def guess_precision(name: str, default: str) -> str:
    """The precision a model file's name states, else ``default`` (pass --precision to be sure)."""
    stem = name.rsplit(".", 1)[0]
    for precision, pattern in _PRECISIONS:
        if pattern.search(stem):
            return precision
    return default
