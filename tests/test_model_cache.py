"""The offline models are converted from their GGUF into a cached HF folder on first use; two processes starting
at once (a test suite, torchrun ranks, two jobs) each convert into their own temporary folder and the one that
finishes second takes the first one's folder instead of failing."""
import os
import subprocess
import sys
from pathlib import Path

from utils.assets import cache_dir

ROOT = Path(__file__).resolve().parents[1]
CONVERT = "from utils.models import offline_model_folder; print(offline_model_folder('smollm2-135m-offline'))"


def test_two_processes_converting_the_offline_model_at_once_both_succeed(tmp_path):
    for shared in ("assets", "tasks"):  # the downloaded GGUF and texts; the converted models are this test's own
        if (cache_dir() / shared).exists():
            (tmp_path / shared).symlink_to(cache_dir() / shared)
    env = {**os.environ, "LLMFP4_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", CONVERT], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for _ in range(2)]
    results = [(run.wait(timeout=600), run.stdout.read().strip(), run.stderr.read()) for run in runs]
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert {out for _, out, _ in results} == {str(folder)} and (folder / "config.json").exists()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["SmolLM2-135M-Instruct"]  # no partial left
