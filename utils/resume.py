"""Resumable block-wise calibration (FPQ, MinMax, the named formats): the parameters of the finished blocks are
written to the parameter file (atomically, marked unfinished) at Ctrl-C and, against a crash, after a block once
a minute has passed since the last write (less often when a write takes longer: at most a tenth of the time goes
to them, for the whole file is rewritten each time); `--resume` installs them and calibrates the remaining
blocks, which gives the same parameters, bit for bit, as an uninterrupted run. Ctrl-C ends in one line saying
what was saved and how to continue.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from safetensors import safe_open

from . import distributed
from .errors import Interrupted, ParamFileError, UsageError
from .files import save_with_fallback
from .llm_fp4 import calibrate_blocks
from .models import get_module
from .onload import onloader_of
from .params import check_overwrite, load_params, read_metadata, save_params
from .pipeline import CalibrationReport, quant_modules, release_originals

RESUME_HINT = "rerun the same command with --resume to continue"
CHECKPOINT_INTERVAL_S = 60.0  # the least time between two checkpoints: what a crash can lose
CHECKPOINT_SHARE = 0.1  # and the most of the calibration time that writing them may take


def is_unfinished(path: Path) -> bool:
    """Whether `path` is the parameter file of an interrupted calibration."""
    return "partial" in read_metadata(path)


def _as_json(value):
    return json.loads(json.dumps(value, default=str))


def restore_progress(path: Path, model, config, adapter, extra: dict, fingerprint: dict | None = None) -> int:
    """Install the blocks an interrupted run of the same settings saved at `path`; returns how many."""
    if not path.exists():
        return 0
    meta = check_same_run(path, config, extra)
    blocks = len(get_module(model, adapter.layers))
    done = meta.get("partial", {}).get("blocks_done", blocks)
    if not isinstance(done, int) or not 0 <= done <= blocks or not _modules_of(done, model, config, adapter) <= set(
            meta["modules"]):
        raise ParamFileError(f"{path} claims {done} finished blocks that it does not hold; drop --resume to start over")
    if done and not onloader_of(model).keeps_full_precision:
        raise UsageError(f"{path} is an unfinished calibration, and its restored blocks' full-precision outputs need "
                         "weights that a block kept on disk no longer has; continue it with --offload cpu or without "
                         "--offload")
    load_params(path, model, config, partial_ok=True, fingerprint=fingerprint)
    return done


def check_same_run(path: Path, config, extra: dict) -> dict:
    """The metadata of `path`, refused unless it was calibrated with exactly this config and calibration data (a file
    continued by --resume, or taken as this run's result by --reuse_params)."""
    meta = read_metadata(path)
    for key, wanted in (("config", config.to_dict()), *extra.items()):
        if meta.get(key) != _as_json(wanted):
            raise ParamFileError(f"{path} was calibrated with other settings ({key}: {meta.get(key)}); drop --resume "
                                 "/ --reuse_params to calibrate anew, or pass the settings it was made with")
    return meta


def _modules_of(done: int, model, config, adapter) -> set:
    """The wrapped modules calibrated once `done` blocks are: the table (when quantized) and those blocks."""
    prefixes = tuple(f"{adapter.layers}.{index}." for index in range(done))
    table = (adapter.embedding,) if done and config.scheme("embedding") is not None else ()
    return {name for name in quant_modules(model) if name.startswith(prefixes) or name in table}


def save_on_main(path: Path, save, what: str) -> Path:
    """save_with_fallback on rank 0 only: data-parallel ranks hold the same parameters, one writes them."""
    return save_with_fallback(path, save, what) if distributed.is_main() else path


class BlockCheckpoint:
    """`after_block` of quantize(): writes the parameters of the blocks finished so far (to a fallback path, named
    in a warning, when the asked one fails) once CHECKPOINT_INTERVAL_S have passed since the last write, or
    CHECKPOINT_SHARE's multiple of that write's duration if longer; `interrupted` writes those not yet written and
    says what the file holds."""

    def __init__(self, path: Path, model, config, adapter, model_name: str, extra: dict, fingerprint: dict,
                 done: int):
        self.path, self.model, self.config, self.adapter, self.model_name = path, model, config, adapter, model_name
        self.extra, self.fingerprint, self.blocks = extra, fingerprint, None
        self.done = self.finished = done  # blocks in the file; blocks calibrated
        self.written_at, self.write_seconds = time.monotonic(), 0.0

    def __call__(self, index: int, blocks: int):
        self.finished, self.blocks = index + 1, blocks
        wait = max(CHECKPOINT_INTERVAL_S, self.write_seconds * (1 / CHECKPOINT_SHARE - 1))
        if time.monotonic() - self.written_at >= wait:
            self.write()

    def write(self):
        started, partial = time.monotonic(), {"blocks_done": self.finished, "blocks": self.blocks}
        modules = _modules_of(self.finished, self.model, self.config, self.adapter)  # not a block cut short
        self.path = save_on_main(self.path, lambda path: save_params(
            path, self.model, self.config, self.model_name, self.extra, self.fingerprint, partial=partial,
            only=modules), "parameters calibrated so far")
        self.done, self.written_at = self.finished, time.monotonic()
        self.write_seconds = self.written_at - started

    def interrupted(self, requested: Path) -> Interrupted:
        if self.finished > self.done:
            self.write()
        if not self.done:
            return Interrupted("calibration interrupted before its first block finished; nothing was saved; "
                               "rerun the same command")
        hint = RESUME_HINT if self.path == requested else f"rerun the same command with --resume --ptq_param_path {self.path}"
        of = f" of {self.blocks}" if self.blocks else ""
        return Interrupted(f"calibration interrupted; {self.done}{of} blocks are saved in {self.path}; {hint}")


def calibrate_resumable(model, config, calib, adapter, path: Path, model_name: str, extra: dict, fingerprint: dict,
                        resume: bool, release: bool = True, calibrate=calibrate_blocks):
    """Calibrate with the method's block-wise driver `calibrate` (continuing the unfinished file at `path` with
    `resume`), checkpointing as BlockCheckpoint decides, then write the finished parameters. Returns (report, the path
    written)."""
    check_overwrite(path, fingerprint)  # now, not after the calibration
    done = restore_progress(path, model, config, adapter, extra, fingerprint) if resume else 0
    checkpoint = BlockCheckpoint(path, model, config, adapter, model_name, extra, fingerprint, done)
    try:
        report = calibrate(model, config, calib, adapter, release_originals=release, restored_blocks=done,
                           after_block=checkpoint)
    except KeyboardInterrupt:
        raise checkpoint.interrupted(path) from None
    written = save_on_main(path, lambda target: save_params(target, model, config, model_name, extra,
                                                            fingerprint), "quantization parameters")
    return report, written


def calibrate_or_load(model, config, calib, adapter, files, calibrate, load, release: bool):
    """A block-wise method's use of its parameter file (a ParamFile): `load()` it when asked to reload, or to
    resume a finished file; else calibrate with `calibrate` (see calibrate_resumable), continuing an unfinished
    file in mode "resume". Returns the CalibrationReport, naming the file."""
    finished = files.path.exists() and not is_unfinished(files.path)
    if files.mode == "reload" or (files.mode == "resume" and finished):
        if files.mode == "resume":  # reused as this run's result: only a file of these very settings
            check_same_run(files.path, config, files.extra)
        load()
        if release:
            release_originals(model)
        return CalibrationReport(param_path=str(files.path), loaded=True)
    report, written = calibrate_resumable(model, config, calib, adapter, files.path, files.model_name, files.extra,
                                          files.fingerprint, resume=files.mode == "resume", release=release,
                                          calibrate=calibrate)
    report.param_path = str(written)
    return report


def matrix_blocks_saved(path: Path) -> int:
    """How many blocks a FlatQuant matrix file holds (0 when there is none yet)."""
    if not path.is_file():
        return 0
    with safe_open(str(path), "pt") as f:
        return len(json.loads((f.metadata() or {}).get("flatquant", "{}")).get("blocks", {}))
