"""The method interface and registry; utils/methods/__init__.py imports every method module."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

MODES = ("calibrate", "resume", "reload")


@dataclass(frozen=True)
class ParamFile:
    """Where a run keeps its calibrated parameters and what to do with them.

    mode: "calibrate" (write `path` as blocks finish), "resume" (continue an unfinished `path`, or load it when
    it is finished), "reload" (load `path`, no calibration)."""
    path: Path
    mode: str = "calibrate"
    model_name: str = ""
    fingerprint: dict | None = None  # model_fingerprint of the model as loaded (taken before quantizing)
    extra: dict = field(default_factory=dict)  # metadata stored with the parameters (the calibration data)

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"mode must be one of {MODES}, got {self.mode!r}")


class Method:
    """A quantization method. `quantize` calibrates in place (reading or writing `files` when given) and
    returns a CalibrationReport whose `param_path` names the file it wrote or read."""

    def check(self, config) -> None:
        """Refuse, before any work, a config this method cannot run (UsageError)."""

    def calibration_windows(self, config, requested: int | None, mode: str = "calibrate") -> int:
        """How many calibration windows a run in `mode` reads when the user asked for `requested` (None: the
        method's default); 0 when it reads none."""
        raise NotImplementedError

    def resolve_path(self, path: Path) -> Path:
        """The file meant by a user-given parameter path (a method may accept a folder)."""
        return path

    def default_path(self, root, config, model_name: str, fingerprint: dict, calib_tag: str) -> Path:
        raise NotImplementedError

    def quantize(self, model, config, calib, adapter, files: ParamFile | None, *, batch_size: int, progress: bool,
                 release_originals: bool):
        raise NotImplementedError


METHODS: dict[str, Method] = {}


def register_method(*names: str):
    """Class decorator: `config.method` in `names` is handled by an instance of the class."""
    def register(cls):
        for name in names:
            METHODS[name] = cls()
        return cls
    return register


def available() -> list[str]:
    return sorted(METHODS)


def method_for(config) -> Method:
    """The handler of `config.method`, after it checked the config."""
    if config.method not in METHODS:
        raise UsageError(f"unknown method {config.method!r} in config {config.name}; registered: "
                         f"{', '.join(sorted(METHODS))}")
    method = METHODS[config.method]
    method.check(config)
    return method
