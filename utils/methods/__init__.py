"""Quantization methods, registered by name: a config's `method` picks its handler.

A method is one module in this package that subclasses `Method` and registers it with `@register_method(NAME)`;
the package imports all its modules, so adding one changes no other file
(README "Adding a method"). `utils.calibrate.quantize` is the one entry point, for the library and the CLI.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import METHODS, Method, ParamFile, UsageError, available, method_for, register_method  # noqa: F401

# every other module of this package registers its methods when imported
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
