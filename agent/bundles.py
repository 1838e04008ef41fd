"""Loading a deployment's stored files, whatever its task: one path for new and restored models.

An encoder or tensor model loads from its artifact files as they are. A generate
bundle is a directory that onnxruntime-genai opens by file name (model.onnx finds
model.onnx.data, genai_config.json names model.onnx), so its verified artifacts
are hard-linked under their manifest filenames into ``bundles/<key>/``, where the
key is a hash of the (filename, sha256) pairs: the same files give the same
directory, which is reused while its links still point at the verified artifacts
and otherwise rebuilt whole beside it and swapped in.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from agent.active import ActiveDeployment
from agent.config import GenerationConfig
from agent.runtime import Loaded, load_model
from agent.transfer import find_artifact

log = logging.getLogger(__name__)

FOLDER: Final = "bundles"


class MissingArtifacts(FileNotFoundError):
    """A deployment's stored files are missing or damaged."""


def bundle_key(files: Mapping[str, str]) -> str:
    text = "\n".join(f"{name}\t{sha}" for name, sha in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load_deployment(
    data_dir: Path,
    active: ActiveDeployment,
    generation: GenerationConfig,
    *,
    verified: Mapping[str, Path] | None = None,
) -> Loaded:
    """Load what ``active`` names from ``data_dir``; ``verified``: paths by hash already checked."""
    if active.inference.task == "generate":
        from agent.generate import load_generator

        directory = assemble(data_dir, active.files, verified=verified)
        return load_generator(directory, spec=active.inference, info=active.info, threads=generation.thread_count())
    model = _artifact(data_dir, active.sha256, verified)
    tokenizer = _artifact(data_dir, active.tokenizer_sha256, verified) if active.tokenizer_sha256 else None
    return load_model(model, spec=active.inference, info=active.info, tokenizer_path=tokenizer)


def assemble(data_dir: Path, files: Mapping[str, str], *, verified: Mapping[str, Path] | None = None) -> Path:
    """The bundle directory for ``files`` (filename to sha256), built from the stored artifacts."""
    if not files:
        raise MissingArtifacts("a generate deployment names no files")
    for name in files:
        if Path(name).name != name or name in (".", ".."):  # the wire pattern refuses these too
            raise MissingArtifacts(f"bundle filename {name!r} is not a plain file name")
    sources = {name: _artifact(data_dir, sha, verified) for name, sha in files.items()}
    root = data_dir / FOLDER
    target = root / bundle_key(files)
    if _links_to(target, sources):
        return target  # already there, maybe serving: never pulled from under a loaded model
    staging = root / f"{target.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, source in sources.items():
        _link(source, staging / name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def prune_bundles(data_dir: Path, keep: list[Mapping[str, str]]) -> None:
    """Remove bundle directories no slot or job uses: their links would keep the bytes on disk."""
    root = data_dir / FOLDER
    if not root.is_dir():
        return
    wanted = {bundle_key(files) for files in keep if files}
    for entry in root.iterdir():
        if entry.name not in wanted:
            shutil.rmtree(entry, ignore_errors=True)
            log.info("bundles.pruned path=%s", entry)


def _links_to(directory: Path, sources: Mapping[str, Path]) -> bool:
    """True when ``directory`` holds exactly ``sources``, each the very file (same inode) it names."""
    try:
        names = {entry.name for entry in directory.iterdir()}
        return names == set(sources) and all(os.path.samefile(directory / n, s) for n, s in sources.items())
    except OSError:
        return False


def _artifact(data_dir: Path, sha256: str, verified: Mapping[str, Path] | None) -> Path:
    if verified is not None and sha256 in verified:
        return verified[sha256]
    path = find_artifact(data_dir, sha256)
    if path is None:
        raise MissingArtifacts(f"artifact {sha256[:12]} is missing or damaged")
    return path


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links: pay for a copy
        shutil.copyfile(source, target)
