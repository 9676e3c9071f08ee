"""Errors that are the user's to fix: main.py prints them as one line instead of a traceback."""
from .assets import AssetError
from .data import DatasetUnavailable
from .lm_eval_tasks import TaskUnavailable
from .models import UnsupportedModel
from .params import ParamFileError

USER_ERRORS = (AssetError, DatasetUnavailable, TaskUnavailable, UnsupportedModel, ParamFileError, FileNotFoundError, ValueError)
