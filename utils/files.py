"""Safe file output: atomic writes, output locations checked before any work, and a fallback location when a
finished result cannot be written where asked.

An atomic write goes to a temporary file in the target's folder, is flushed to disk (fsync), then renamed
over the target (os.replace): a reader, a crash or a second run writing the same path sees either the old
file or a complete new one, never half of one.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UsageError, UserError


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(temporary_path)` to write the file's content, then move it over `path` in one step.
    If `write` (or the flush) fails, `path` keeps its previous content and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(temporary)
    try:
        write(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _fsync_folder(folder: Path):
    """Make the rename itself durable (POSIX; folders cannot be opened for this on Windows)."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ----- output locations, checked before the model loads -----
def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path, flag: str, given: Path):
    """Create and remove a file in `folder`: the only test that also holds for root and read-only mounts."""
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UsageError(f"{flag} {given}: cannot write in {folder} ({error.strerror or error}); "
                         "choose a writable location") from None


def _check_ancestors(path: Path, flag: str, given: Path):
    """The folder of `path`, or the nearest existing one above it, must be a writable folder."""
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise UsageError(f"{flag} {given}: {existing} is a file, not a folder; choose another location")
    _probe_writable(existing, flag, given)


def check_output_file(path: str | Path, flag: str, suffix: str | None = None):
    """A file the run will write: not an existing folder, with the expected suffix, in a writable folder."""
    path = Path(path)
    if path.is_dir():
        name = f"params{suffix}" if suffix else "a file name"
        raise UsageError(f"{flag} {path} is an existing folder; give a file path such as {path / name}")
    if suffix and path.suffix != suffix:
        raise UsageError(f"{flag} {path}: the file written is {suffix[1:]}; give a path ending in {suffix}"
                         + (" (.pt files are only read, as reference parameter files)" if path.suffix == ".pt"
                            else ""))
    _check_ancestors(path, flag, path)  # an existing file is replaced by a rename: its folder must be writable


def check_output_folder(path: str | Path, flag: str):
    """A folder the run will write into: not an existing file, creatable and writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is an existing file; give a folder")
    _check_ancestors(path / "results.json", flag, path)


# ----- a fallback when a finished result cannot be written where asked -----
def fallback_path(path: Path) -> Path:
    """Where a file that could not be written at `path` goes instead: the system's temporary folder."""
    return Path(tempfile.gettempdir()) / "llm-fp4-unsaved" / f"{os.getpid()}-{path.name}"


class SaveFailed(UserError, OSError):
    pass


def save_with_fallback(path: Path, save: Callable[[Path], object], what: str) -> Path:
    """`save(path)`, or, when that fails for a reason of the file system, `save(fallback_path(path))` with a
    warning naming both; returns where the file was written. Fails only when both locations fail."""
    try:
        save(path)
        return path
    except OSError as error:
        fallback = fallback_path(path)
        try:
            save(fallback)
        except OSError as second:
            raise SaveFailed(f"could not write the {what} to {path} ({error}) nor to {fallback} ({second}); "
                             "free space or fix the permissions and rerun") from None
        print(f"warning: could not write the {what} to {path} ({error}); they were written to {fallback} "
              "instead: move that file to where it belongs", flush=True)
        return fallback


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_folder(path: str | Path, write: Callable[[Path], object], keep_existing: bool = False) -> Path:
    """Call `write(temporary_folder)` to fill a folder next to `path`, then move it to `path`. On failure nothing
    is left behind and `path` keeps its previous content. An existing `path` is moved aside first and removed
    once the new folder is in place (two renames: a crash between them leaves the old folder under a hidden
    name, never a half-written one at `path`). `keep_existing`: a folder that another writer put at `path`
    meanwhile stays, and this one is dropped (a cache that every writer fills alike)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(temporary, 0o777 & ~current_umask())  # mkdtemp's folder is private; the result is an ordinary one
    previous = None
    try:
        write(temporary)
        for file in temporary.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as written:
                    os.fsync(written.fileno())
        if path.exists() and keep_existing:
            shutil.rmtree(temporary, ignore_errors=True)
            return path
        if path.exists():
            previous = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, previous)
        os.replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if previous is not None and not path.exists():
            os.replace(previous, path)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    _fsync_folder(path.parent)
    return path
