"""Every complete_scripts/ script must give main.py a command line that parses and builds its config
(a dry run through the scripts themselves, DRY_RUN=1), so none of them rots."""
import os
import subprocess
from pathlib import Path

import pytest

import main

SCRIPTS = sorted(p for p in (Path(__file__).resolve().parents[1] / "complete_scripts").rglob("*.sh")
                 if p.name != "common.sh")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_command_line_parses(script):
    printed = subprocess.run(["bash", str(script), "--limit", "2"], env={**os.environ, "DRY_RUN": "1"},
                             capture_output=True, text=True, check=True).stdout
    args = main.build_parser().parse_args(printed.splitlines())
    config = main.make_config(args)
    assert config.name == args.quant_config and args.limit == 2 and args.tasks


def test_there_are_scripts():
    assert len(SCRIPTS) >= 6
