"""Resumable units: one rule for what a stored result depends on, and safe files for it.

A **unit** is any piece of work whose result is kept on disk and reused on a rerun: a
preprocessing shard set, a training run, a finetune, an evaluation unit. Its **stamp** is a hash
of everything the result depends on: its own settings, the stamps of the units it reads, and
the version of the judge or metric that scored it. A unit is done iff its stored stamp equals
the stamp it would have now; a changed stamp recomputes it, and since the stamps of the units
downstream include its stamp, those too.

Result files that are the only copy of something (answers, judged units, reports, stamps) are
written with :func:`write_atomic`: a reader, or a run killed mid-write, sees the old file or
the new one, never half of one. JSON is written strictly: a missing figure is null, not NaN.

Run directories (training runs, finetunes) hold their stamp in ``unit_stamp.json``; a run with
another stamp is moved aside, never deleted and never reused (:func:`prepare_run_dir`).
docs/resumption.md describes the whole scheme.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

RUN_STAMP_FILE = "unit_stamp.json"


def stamp(*parts: Any) -> str:
    """A stable 16-hex-digit hash of JSON-able parts (dict key order does not matter). The
    encoding is the one earlier stamps used, so results stamped before stay valid."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def unit_stamp(settings: Any, reads: Iterable[str] = (), version: Any = None) -> str:
    """A unit's stamp: its own settings, the stamps of the units it reads (in order), and the
    version of what scored it."""
    return stamp({"settings": settings, "reads": list(reads), "version": version})


def file_stamp(path: str | os.PathLike) -> str:
    """A hash of a file's bytes: an input file the stamp should follow when it is edited."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def json_safe(data: Any) -> Any:
    """``data`` with every NaN or infinity replaced by None: what a missing figure is in strict
    JSON, which ``jq`` and other strict parsers read (Python writes ``NaN`` otherwise)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def figure(value: Optional[float]) -> float:
    """A figure read back from a file that :func:`json_safe` wrote: null is NaN again, so the
    arithmetic and formatting that handled a missing figure before still do."""
    return math.nan if value is None else value


def write_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` (text, bytes, or JSON-able) to ``path`` so that the file is either the
    old one or the complete new one: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        payload = data.encode()
    elif isinstance(data, bytes):
        payload = data
    else:
        payload = (json.dumps(json_safe(data), indent=1, allow_nan=False) + "\n").encode()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike) -> Iterator[Path]:
    """A directory to fill that becomes ``out`` only when the block ends without an error
    (replacing what was there); on an error it is removed and ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike) -> Optional[Any]:
    """A JSON file's content, or None when it is missing or unreadable (a foreign half-file)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class Units:
    """Stamped unit results under a folder: ``<root>/<name>.json`` holds ``{"stamp": ...,
    "result": ..., <metadata>}``; ``name`` may contain ``/`` (a subfolder per group)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def stored_stamp(self, name: str) -> Optional[str]:
        saved = read_json(self.path(name))
        return saved.get("stamp") if isinstance(saved, dict) else None

    def get(self, name: str, want: str) -> Optional[dict[str, Any]]:
        """The stored record when its stamp is ``want``; otherwise None (to be recomputed)."""
        saved = read_json(self.path(name))
        if isinstance(saved, dict) and saved.get("stamp") == want:
            return saved
        return None

    def done(self, name: str, want: str) -> bool:
        return self.get(name, want) is not None

    def put(self, name: str, want: str, result: Any, **meta: Any) -> dict[str, Any]:
        record = {"stamp": want, **meta, "result": result}
        write_atomic(self.path(name), record)
        return record

    def names(self) -> list[str]:
        """Every stored unit, as ``name`` (stamped JSON files only)."""
        if not self.root.is_dir():
            return []
        return sorted(str(p.relative_to(self.root).with_suffix("")).replace(os.sep, "/")
                      for p in self.root.rglob("*.json") if not p.name.startswith("."))

    def stale(self, wanted: dict[str, str]) -> list[dict[str, Any]]:
        """Stored units not in ``wanted`` (name -> stamp), or stored with another stamp."""
        out = []
        for name in self.names():
            if name not in wanted:
                out.append({"unit": name, "why": "not in the current config",
                            "stamp": self.stored_stamp(name)})
            elif self.stored_stamp(name) != wanted[name]:
                out.append({"unit": name, "why": "stored with another stamp",
                            "stamp": self.stored_stamp(name)})
        return out


# --------------------------------------------------------------------------------------------
# Run directories


def run_stamp(run_dir: str | os.PathLike) -> Optional[str]:
    """The stamp a run directory was trained under, None when it has none."""
    saved = read_json(Path(run_dir) / RUN_STAMP_FILE)
    return saved.get("stamp") if isinstance(saved, dict) else None


@dataclass
class RunState:
    state: str                        # "finished" | "resume" | "fresh"
    moved_to: Optional[Path] = None   # where a run with another stamp was put aside


def prepare_run_dir(run_dir: str | os.PathLike, want: str, what: Any = None, *,
                    finished: Callable[[Path], bool]) -> RunState:
    """Make ``run_dir`` a run of stamp ``want``: a finished run of that stamp is ``finished``
    (reuse it), a partial one ``resume`` (from its own checkpoints); anything else there (a run
    of another stamp, or one without a stamp) is renamed ``<dir>.stale-<old stamp[:8]>`` and the
    run starts ``fresh``. ``what``: the settings behind the stamp, recorded beside it.
    ``finished(run_dir)`` says whether a run is complete; the caller passes the check of the
    run's own format (``training.checkpoint.run_finished``), which this module, below the
    training engine, does not know."""
    run_dir = Path(run_dir)
    moved = None
    if run_dir.is_dir() and any(run_dir.iterdir()):
        old = run_stamp(run_dir)
        if old == want:
            return RunState("finished" if finished(run_dir) else "resume")
        base = f"{run_dir.name}.stale-{old[:8] if old else 'unstamped'}"
        moved = run_dir.with_name(base)
        n = 1
        while moved.exists():
            n += 1
            moved = run_dir.with_name(f"{base}-{n}")
        os.rename(run_dir, moved)
    write_atomic(run_dir / RUN_STAMP_FILE, {"stamp": want, "settings": what})
    return RunState("fresh", moved)
