"""A variant measured against its fp32 reference: quality, latency and memory. No Django here.

An evaluation set is one ``.npz``: the model's inputs (``input:<name>``) and the fp32
reference outputs (``output:<name>``). Text models get real sentences, tokenized.
Latency and memory are measured in a fresh subprocess (``python -m fleet.lib.evaluation``),
so onnxruntime's native allocations show in its RSS and nothing else of the caller's does.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import resource
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SENTENCES_PATH = Path(__file__).parent / "data" / "sentences.txt"
_INPUT, _OUTPUT, _TEXTS = "input:", "output:", "texts"


def default_sentences() -> list[str]:
    """The ~32 varied English sentences shipped for text models."""
    return [s for s in SENTENCES_PATH.read_text().splitlines() if s.strip()]


def text_inputs(tokenizer_json: Path, sentences: list[str], *, max_length: int) -> dict[str, np.ndarray]:
    """Tokenized, padded sentences as the int64 inputs a BERT-family graph takes."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in encodings], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], np.int64),
    }


def run_model(model: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feeds = {i.name: inputs[i.name] for i in session.get_inputs()}
    return dict(zip(names, session.run(names, feeds), strict=True))


def dump_set(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], *, texts: list[str] | None = None) -> bytes:
    buffer = io.BytesIO()
    arrays = {f"{_INPUT}{k}": v for k, v in inputs.items()} | {f"{_OUTPUT}{k}": v for k, v in outputs.items()}
    if texts is not None:
        # The sentences themselves, so a device can be sent real text to self-test with.
        arrays[_TEXTS] = np.array(texts, dtype=np.str_)
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
    return buffer.getvalue()


# An evaluation set is a few sentences and their reference outputs: tens of MiB at most.
# A compressed .npz can claim far more (1 MiB of zeros expands to 1 GiB), and numpy
# allocates an array from its header's shape before reading any data.
MAX_SET_BYTES = 128 * 1024 * 1024
MAX_SET_ARRAYS = 64


class EvaluationSetRejected(ValueError):
    """An .npz that is not a bounded evaluation set; the text says why."""


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _array_bytes(member: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """The bytes the member's array takes once loaded, from its .npy header alone."""
    with member.open(info) as stream:
        try:
            version = np.lib.format.read_magic(stream)
            if version not in _HEADER_READERS:
                raise ValueError(f".npy format {version} is not one numpy writes for plain arrays")
            shape, _, dtype = _HEADER_READERS[version](stream)
        except ValueError as exc:
            raise EvaluationSetRejected(f"{info.filename} is not a .npy array: {exc}") from None
    if dtype.hasobject:
        raise EvaluationSetRejected(f"{info.filename} holds Python objects, which an evaluation set never needs")
    return math.prod(shape) * dtype.itemsize


def check_set(path: Path, *, max_bytes: int = MAX_SET_BYTES) -> None:
    """Refuse an .npz whose arrays would take more than ``max_bytes``, before loading any.

    Reads only the zip's directory and each array's header: every member's declared size
    (which zipfile enforces when reading) and shape × dtype (which numpy allocates) count.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > MAX_SET_ARRAYS:
                raise EvaluationSetRejected(f"the set has {len(members)} arrays; at most {MAX_SET_ARRAYS}")
            total = 0
            for info in members:
                total += max(info.file_size, _array_bytes(archive, info))
                if total > max_bytes:
                    raise EvaluationSetRejected(
                        f"the set expands to more than {max_bytes} bytes (EVALUATION_SET_MAX_BYTES) "
                        f"by {info.filename}; its file is {Path(path).stat().st_size} bytes"
                    )
    except zipfile.BadZipFile as exc:
        raise EvaluationSetRejected(f"the file is not an .npz (zip) archive: {exc}") from None


def load_set(path: Path, *, max_bytes: int = MAX_SET_BYTES) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    check_set(path, max_bytes=max_bytes)
    with np.load(path, allow_pickle=False) as data:
        inputs = {k.removeprefix(_INPUT): data[k] for k in data.files if k.startswith(_INPUT)}
        outputs = {k.removeprefix(_OUTPUT): data[k] for k in data.files if k.startswith(_OUTPUT)}
    return inputs, outputs


def load_texts(path: Path, *, max_bytes: int = MAX_SET_BYTES) -> list[str] | None:
    """The sentences a text set was tokenized from, if the set stores them."""
    check_set(path, max_bytes=max_bytes)
    with np.load(path, allow_pickle=False) as data:
        return [str(t) for t in data[_TEXTS]] if _TEXTS in data.files else None


def device_embeddings(output: np.ndarray, mask: np.ndarray | None, pooling: str, normalize: bool) -> np.ndarray:
    """Pooled (and normalized) as the agent does it (agent.runtime.pool, l2_normalize), per sample."""
    hidden = output.astype(np.float64)
    if hidden.ndim == 3:
        if pooling == "cls":
            hidden = hidden[:, 0, :]
        elif mask is None:
            hidden = hidden.mean(axis=1)
        else:
            weights = mask.astype(np.float64)[:, :, None]
            hidden = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    if normalize:
        hidden = hidden / np.clip(np.linalg.norm(hidden, axis=1, keepdims=True), 1e-12, None)
    return hidden


def _per_sample(output: np.ndarray, mask: np.ndarray | None, pooling: str) -> np.ndarray:
    """One vector per sample: the pooled embedding for an embedding model, else the flat output."""
    output = output.astype(np.float64)
    if pooling == "mean" and mask is not None and output.ndim == 3:
        m = mask[..., None].astype(np.float64)
        return (output * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    if pooling == "cls" and output.ndim == 3:
        return output[:, 0]
    return output.reshape(output.shape[0], -1)


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    dot = (reference * candidate).sum(-1)
    norms = np.linalg.norm(reference, axis=-1) * np.linalg.norm(candidate, axis=-1)
    return dot / np.clip(norms, 1e-12, None)


@dataclass(frozen=True)
class Quality:
    mean_cosine: float
    min_cosine: float
    max_abs_error: float
    samples: int


def compare(
    reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], inputs: dict[str, np.ndarray], pooling: str
) -> Quality:
    """Cosine per sample (pooled for embedding models) and the largest absolute difference."""
    mask = inputs.get("attention_mask")
    all_cosines, max_error = [], 0.0
    for name, ref in reference.items():
        got = candidate[name]
        all_cosines.append(cosines(_per_sample(ref, mask, pooling), _per_sample(got, mask, pooling)))
        max_error = max(max_error, float(np.abs(ref.astype(np.float64) - got.astype(np.float64)).max()))
    joined = np.concatenate(all_cosines)
    return Quality(float(joined.mean()), float(joined.min()), max_error, int(joined.size))


@dataclass(frozen=True)
class Performance:
    latency_median_ms: float
    latency_p95_ms: float
    peak_memory_bytes: int
    runs: int


def _single_samples(inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Each sample alone, without its padding: what one request on a device looks like."""
    mask = inputs.get("attention_mask")
    samples = []
    for i in range(next(iter(inputs.values())).shape[0]):
        length = int(mask[i].sum()) if mask is not None else None
        samples.append(
            {k: v[i : i + 1, :length] if length and v.ndim == 2 else v[i : i + 1] for k, v in inputs.items()}
        )
    return samples


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    """This process's RSS high-water mark.

    On Linux VmHWM, which starts afresh at exec; ru_maxrss would carry over the parent's
    peak (a Celery worker's) into this subprocess.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    # ru_maxrss: KiB on Linux, bytes on macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure_here(model: Path, evaluation_set: Path, *, repeats: int = 3, threads: int = 1) -> dict:
    """Load and run ``model`` in this process; call it in a fresh one (see ``measure``)."""
    import onnxruntime as ort

    inputs, _ = load_set(evaluation_set)
    samples = _single_samples(inputs)
    baseline = _rss()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    for sample in samples:  # warm-up: one pass over the set
        session.run(None, {k: v for k, v in sample.items() if k in names})
    # Peak after loading and one pass: later repeats only grow the allocator's caches.
    peak = _peak_rss()
    latencies = []
    for _ in range(repeats):
        for sample in samples:
            started = time.perf_counter()
            session.run(None, {k: v for k, v in sample.items() if k in names})
            latencies.append((time.perf_counter() - started) * 1000)
    return asdict(
        Performance(
            latency_median_ms=float(np.median(latencies)),
            latency_p95_ms=float(np.percentile(latencies, 95)),
            peak_memory_bytes=max(int(peak - baseline), 0),
            runs=len(latencies),
        )
    )


def measure(
    model: Path, evaluation_set: Path, *, repeats: int = 3, threads: int = 1, timeout: float = 600
) -> Performance:
    """Latency (one sample per run) and peak memory over the baseline, in a fresh subprocess.

    One intra-op thread by default: the plane's CPU is shared, and ratios between variants
    stay comparable when other work runs beside the measurement.
    """
    command = [
        sys.executable,
        "-m",
        "fleet.lib.evaluation",
        str(model),
        str(evaluation_set),
        f"--repeats={repeats}",
        f"--threads={threads}",
    ]
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=root, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {model.name} failed: {done.stderr.strip()[-2000:]}")
    return Performance(**json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure one ONNX model's latency and memory on this CPU.")
    parser.add_argument("model", type=Path)
    parser.add_argument("evaluation_set", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(measure_here(args.model, args.evaluation_set, repeats=args.repeats, threads=args.threads)))


if __name__ == "__main__":
    main()
