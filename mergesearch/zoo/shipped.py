"""The zoos stored in the package: trained once, shipped, checked by sha256 on load.

A trained zoo's weights depend on the machine (float reduction order), so the demo's numbers and the
tests would differ between machines if each trained its own. The demo zoo and the test zoos of seed 0
are therefore trained once by `mergesearch zoo ship PRESET` and stored under `zoo/shipped/`, each file's
sha256 in the zoo's manifest (`files`), checked before the zoo is used. Other seeds, and zoos from
`mergesearch zoo build`, are still trained on the machine (`ensure_zoo`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mergesearch.errors import ConfigError
from mergesearch.zoo.build import MANIFEST, build_zoo, ensure_zoo, file_hashes, load_manifest
from mergesearch.zoo.presets import get_preset

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
# What `mergesearch zoo ship --all` re-trains: the demo's zoo and the two test zoos the suite uses.
SHIPPED = (("demo", 0, "char"), ("test", 0, "char"), ("test", 0, "bpe"))

_verified: set[Path] = set()


def shipped_name(preset: str, seed: int = 0, tokenizer: str | None = None) -> str:
    """The folder name of a shipped zoo under SHIPPED_DIR: `demo-s0`, `test-bpe-s0`."""
    kind = tokenizer or get_preset(preset).tokenizer
    return f"{preset}{'' if kind == 'char' else f'-{kind}'}-s{seed}"


def verify_zoo(path: str | os.PathLike) -> Path:
    """Check every file of a zoo against the sha256 its manifest records; return the path.

    A changed, missing or extra file is refused with the file's name and the way to restore it.
    """
    zoo = Path(path)
    recorded = load_manifest(zoo).get("files")
    if not recorded:
        raise ConfigError(f"{zoo / MANIFEST} records no file hashes: re-ship the zoo with `mergesearch zoo ship`")
    actual = file_hashes(zoo)
    fix = ("restore it (`git checkout -- mergesearch/zoo/shipped`, or re-install mergesearch) or re-train it with "
           "`mergesearch zoo ship`")
    for rel, digest in sorted(recorded.items()):
        if rel not in actual:
            raise ConfigError(f"zoo file {zoo / rel} is missing: {fix}")
        if actual[rel] != digest:
            raise ConfigError(f"zoo file {zoo / rel} is corrupted (its sha256 differs from {MANIFEST}'s): {fix}")
    extra = sorted(set(actual) - set(recorded))
    if extra:
        raise ConfigError(f"zoo file {zoo / extra[0]} is not in {MANIFEST}'s list of files: remove it, or {fix}")
    return zoo


def shipped_zoo(preset: str, seed: int = 0, tokenizer: str | None = None) -> Path | None:
    """The shipped zoo of (preset, seed, tokenizer), checked once per process; None when none is shipped."""
    path = SHIPPED_DIR / shipped_name(preset, seed, tokenizer)
    if not (path / MANIFEST).is_file():
        return None
    if path not in _verified:
        verify_zoo(path)
        _verified.add(path)
    return path


def get_zoo(cache_dir: str | os.PathLike, preset: str = "test", seed: int = 0, *, tokenizer: str | None = None,
            progress: bool = True) -> Path:
    """The shipped zoo where there is one, else the zoo trained on this machine and cached under `cache_dir`."""
    return shipped_zoo(preset, seed, tokenizer) or ensure_zoo(cache_dir, preset, seed, progress=progress,
                                                               tokenizer=tokenizer)


def ship_zoo(preset: str, seed: int = 0, tokenizer: str | None = None, *, out_dir: str | os.PathLike | None = None,
             progress: bool = True) -> Path:
    """Train (preset, seed, tokenizer) from scratch and store it as the shipped zoo, replacing the previous one.

    Run it whenever the zoo's code or presets change (`tests/test_zoo.py` fails until then), and copy the
    demo's new tables into the README (`mergesearch demo`). `out_dir`: default SHIPPED_DIR.
    """
    out = Path(out_dir or SHIPPED_DIR) / shipped_name(preset, seed, tokenizer)
    build_zoo(out, preset, seed, overwrite=True, progress=progress, tokenizer=tokenizer)
    _verified.discard(out)
    log.info("shipped zoo written to %s", out)
    return verify_zoo(out)
