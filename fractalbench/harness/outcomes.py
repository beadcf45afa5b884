"""Per-sample outcomes of a cell on its test split, stored beside its rows.

For every accuracy row of a cell (``top1``/``top5`` of each forced exit, ``top1_full``, and
``policy_top1`` of each operating point: grid points, validation-fitted budget points, learned
gates or router, attribute-sweep values) the cell keeps which test samples were right, and for an
operating point the exit each sample left at. The accuracy of the row is exactly the mean of its
``correct`` bits (a test checks it), so two runs on the same test samples can be compared sample by
sample (McNemar's exact test in :mod:`fractalbench.reports.compare`) instead of by their two percentages.

On disk: one compressed NumPy archive per cell, ``<run dir>/outcomes/<cell_id>.npz``, written
before the cell's result file (so a finished cell always has it). Members:

- ``labels`` [N] (int16 or int32): the test labels in test-split order;
- ``entries``: a JSON list, one object per outcome: ``metric``, ``policy``, ``threshold``, ``exit``;
- ``correct_<i>``: the right/wrong bits of entry i, ``np.packbits`` (N bits, 1 = right);
- ``exit_<i>`` [N] (uint8 or int16): where each sample exited (operating points only).

10,000 test samples cost 1,250 bytes of bits per outcome plus the exits (compressed). Load a whole
run in one call with :func:`load_run_outcomes`, one cell with :func:`load_outcomes`.
``sample_digest`` identifies the sample set (its size and the labels in order): outcomes of two
runs are paired only when the digests agree.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

OUTCOMES_DIR = "outcomes"
OUTCOME_METRICS = ("top1", "top5", "top1_full", "policy_top1")


class OutcomesError(ValueError):
    """An outcomes file that cannot be read, or outcomes that do not fit their labels."""


def threshold_key(value: Any) -> float | None:
    """A threshold as matched across rows and outcomes: None, or the float rounded to 9 digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    return round(float(value), 9)


def exit_key(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    return int(value)


def outcome_key(metric: str, policy: str = "", threshold: Any = None, exit: Any = None) -> tuple:
    """The identity of one outcome within a cell: the fields of the accuracy row it belongs to."""
    return str(metric), str(policy or ""), threshold_key(threshold), exit_key(exit)


@dataclass(frozen=True)
class Outcome:
    """One accuracy row's samples: ``correct`` (bool [N]) and, for an operating point, ``exit_index``
    (int [N], the exit each sample left at; None for a forced exit)."""

    metric: str
    policy: str
    threshold: float | None
    exit: int | None
    correct: np.ndarray
    exit_index: np.ndarray | None = None

    @property
    def key(self) -> tuple:
        return outcome_key(self.metric, self.policy, self.threshold, self.exit)

    @property
    def accuracy(self) -> float:
        """Percent right (equal to the value of the row this outcome belongs to)."""
        return 100.0 * float(self.correct.mean()) if self.correct.size else math.nan


def sample_digest(labels: np.ndarray, split: str = "test") -> str:
    """16 hex digits of sha256 over the split name, the sample count and the labels in order."""
    data = np.ascontiguousarray(np.asarray(labels, dtype=np.int64))
    h = hashlib.sha256(f"{split}:{data.size}:".encode())
    h.update(data.tobytes())
    return h.hexdigest()[:16]


@dataclass
class CellOutcomes:
    """The outcomes of one cell on one split (``labels`` [N] in split order)."""

    labels: np.ndarray
    entries: dict[tuple, Outcome] = field(default_factory=dict)
    split: str = "test"

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def digest(self) -> str:
        return sample_digest(self.labels, self.split)

    def __iter__(self) -> Iterator[Outcome]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, metric: str, correct: Any, *, policy: str = "", threshold: Any = None, exit: Any = None,
            exit_index: Any = None) -> Outcome:
        """Record one row's per-sample bits (tensors or arrays of N values); replaces an equal key."""
        if metric not in OUTCOME_METRICS:
            raise OutcomesError(f"outcomes are kept for {', '.join(OUTCOME_METRICS)}, not {metric!r}")
        bits = _array(correct).astype(bool).reshape(-1)
        if bits.shape[0] != self.n:
            raise OutcomesError(f"outcome of {metric} {policy} has {bits.shape[0]} samples; the split has {self.n}")
        exits = None if exit_index is None else _array(exit_index).astype(np.int64).reshape(-1)
        if exits is not None and exits.shape[0] != self.n:
            raise OutcomesError(f"exits of {metric} {policy} have {exits.shape[0]} samples; the split has {self.n}")
        out = Outcome(str(metric), str(policy or ""), threshold_key(threshold), exit_key(exit), bits, exits)
        self.entries[out.key] = out
        return out

    def get(self, metric: str, policy: str = "", threshold: Any = None, exit: Any = None) -> Outcome | None:
        return self.entries.get(outcome_key(metric, policy, threshold, exit))

    def for_row(self, row: Any) -> Outcome | None:
        """The outcome of a result row (a mapping with metric, policy, threshold, exit), if kept."""
        return self.get(row.get("metric", ""), row.get("policy") or "", row.get("threshold"), row.get("exit"))

    # ----- storage ------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        labels = np.asarray(self.labels)
        dtype = np.int16 if labels.size == 0 or (labels.min() >= -32768 and labels.max() < 32768) else np.int32
        arrays: dict[str, np.ndarray] = {"labels": labels.astype(dtype)}
        index = []
        for i, out in enumerate(self.entries.values()):
            index.append({"metric": out.metric, "policy": out.policy, "threshold": out.threshold, "exit": out.exit})
            arrays[f"correct_{i}"] = np.packbits(out.correct)
            if out.exit_index is not None:
                small = out.exit_index.size == 0 or (out.exit_index.min() >= 0 and out.exit_index.max() < 256)
                arrays[f"exit_{i}"] = out.exit_index.astype(np.uint8 if small else np.int16)
        arrays["entries"] = np.array(json.dumps({"split": self.split, "entries": index}))
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    def save(self, path: Path | str) -> Path:
        """Write atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> CellOutcomes:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                labels = data["labels"].astype(np.int64)
                meta = json.loads(str(data["entries"]))
                result = cls(labels, split=meta.get("split", "test"))
                for i, entry in enumerate(meta["entries"]):
                    bits = np.unpackbits(data[f"correct_{i}"], count=result.n).astype(bool)
                    exits = data[f"exit_{i}"].astype(np.int64) if f"exit_{i}" in data else None
                    result.add(entry["metric"], bits, policy=entry["policy"], threshold=entry["threshold"],
                               exit=entry["exit"], exit_index=exits)
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
            raise OutcomesError(f"outcomes file {path} is unreadable: {type(exc).__name__}: {exc}") from None
        return result


def _array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def outcomes_path(run_dir: Path | str, cell_id: str) -> Path:
    return Path(run_dir) / OUTCOMES_DIR / f"{cell_id}.npz"


def load_outcomes(run_dir: Path | str, cell_id: str) -> CellOutcomes | None:
    """One cell's outcomes (None when the cell kept none, e.g. a run made before they existed)."""
    path = outcomes_path(run_dir, cell_id)
    return CellOutcomes.load(path) if path.is_file() else None


def load_run_outcomes(run_dir: Path | str) -> dict[str, CellOutcomes]:
    """Every cell's outcomes of a run directory: cell id -> :class:`CellOutcomes` ({} if none)."""
    folder = Path(run_dir) / OUTCOMES_DIR
    if not folder.is_dir():
        return {}
    return {path.stem: CellOutcomes.load(path) for path in sorted(folder.glob("*.npz"))}
