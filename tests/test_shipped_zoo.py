"""The zoos shipped in the package: present, checked by sha256 on load, current with the zoo's code, re-shipped
by one command."""

from __future__ import annotations

import json
import shutil

import pytest

from mergesearch.cli import main
from mergesearch.errors import ConfigError
from mergesearch.zoo import PRESETS, SHIPPED, build_zoo, get_preset, get_zoo, load_manifest, shipped, verify_zoo
from mergesearch.zoo.presets import ZooPreset

from test_zoo import TINY


def _preset(preset: str, tokenizer: str) -> ZooPreset:
    return ZooPreset.model_validate({**get_preset(preset).model_dump(), "tokenizer": tokenizer})


@pytest.mark.parametrize("preset, seed, tokenizer", SHIPPED)
def test_every_shipped_zoo_is_there_and_intact(preset, seed, tokenizer):
    zoo = shipped.shipped_zoo(preset, seed, tokenizer)
    assert zoo is not None and zoo.parent == shipped.SHIPPED_DIR, f"run `mergesearch zoo ship {preset}`"
    man = load_manifest(zoo)
    assert (man["preset"], man["seed"], man["config"]["tokenizer"]) == (preset, seed, tokenizer)
    for folder in [man["base"], *man["experts"].values()]:
        for name in ("model.safetensors", "config.json", "tokenizer.json"):
            assert f"{folder}/{name}" in man["files"]  # weights and tokenizer are hashed
    assert verify_zoo(zoo) == zoo


@pytest.mark.parametrize("preset, seed, tokenizer", SHIPPED)
def test_shipped_zoos_are_current_with_the_presets_and_the_skills(preset, seed, tokenizer, tmp_path):
    """A change to a preset or to a skill's questions (a new skill, other splits) fails here until the zoo is
    re-shipped (`mergesearch zoo ship`): the shipped data and tokenizer equal what the code makes now."""
    zoo = shipped.shipped_zoo(preset, seed, tokenizer)
    assert zoo is not None, f"no shipped {preset!r} zoo: run `mergesearch zoo ship {preset}`"
    man = load_manifest(zoo)
    current = _preset(preset, tokenizer)
    assert man["config"] == current.model_dump(mode="json"), f"the {preset!r} preset changed: re-ship its zoo"
    # the same data and tokenizer from one training step: they do not depend on training
    quick = ZooPreset.model_validate({**current.model_dump(), "report": False,
                                      "base": {**current.base.model_dump(), "steps": 1, "warmup": 0},
                                      "expert": {**current.expert.model_dump(), "steps": 1, "warmup": 0}})
    fresh = build_zoo(tmp_path / "z", quick, seed, progress=False)
    made = load_manifest(fresh)
    assert made["data"] == man["data"]
    for rel in [f for f in made["files"] if f.startswith("data/") or f.endswith("tokenizer.json")]:
        assert man["files"][rel] == made["files"][rel], f"{rel} differs from the code's: re-ship the {preset!r} zoo"


def _damaged(tmp_path, as_name="test-s0"):
    """A copy of the shipped test zoo under tmp_path/shipped/<as_name> (intact until the test damages it)."""
    copy = tmp_path / "shipped" / as_name
    shutil.copytree(shipped.SHIPPED_DIR / "test-s0", copy)
    return copy


def test_a_damaged_zoo_is_refused_with_the_file_and_the_fix(tmp_path):
    zoo = _damaged(tmp_path)
    verify_zoo(zoo)
    weights = zoo / "expert-sort" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit
    with pytest.raises(ConfigError, match=r"expert-sort/model\.safetensors is corrupted") as err:
        verify_zoo(zoo)
    assert "\n" not in str(err.value) and "mergesearch zoo ship" in str(err.value) and "git checkout" in str(err.value)
    weights.write_bytes(good)
    (zoo / "data" / "sort.calib.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"sort\.calib\.jsonl is missing"):
        verify_zoo(zoo)
    shutil.copy(zoo / "data" / "sort.test.jsonl", zoo / "data" / "sort.calib.jsonl")
    with pytest.raises(ConfigError, match="corrupted"):  # same name, other bytes
        verify_zoo(zoo)
    unrecorded = _damaged(tmp_path / "b")
    (unrecorded / "base" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"base/extra\.bin is not in zoo\.json"):
        verify_zoo(unrecorded)
    no_hashes = _damaged(tmp_path / "c")
    man = load_manifest(no_hashes)
    del man["files"]
    (no_hashes / "zoo.json").write_text(json.dumps(man))
    with pytest.raises(ConfigError, match="records no file hashes"):
        verify_zoo(no_hashes)


def test_the_demo_refuses_a_damaged_shipped_zoo_in_one_line(tmp_path, monkeypatch, capsys):
    zoo = _damaged(tmp_path, "demo-s0")  # refused before anything reads what is inside
    weights = zoo / "base" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(shipped, "SHIPPED_DIR", zoo.parent)
    assert main(["demo", "--no-progress", "--no-report"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "base/model.safetensors is corrupted" in err, err


def test_zoo_ship_retrains_and_get_zoo_prefers_the_shipped_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(PRESETS, "test", TINY.model_copy(update={"name": "test"}))
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path / "shipped")
    cache = tmp_path / "cache"
    built = get_zoo(cache, "test", 0, progress=False)  # nothing shipped: trained here, under the cache
    assert built.parent == cache
    assert main(["zoo", "ship", "test", "--no-progress"]) == 0
    assert "shipped in" in capsys.readouterr().out
    out = tmp_path / "shipped" / "test-s0"
    assert get_zoo(cache, "test", 0, progress=False) == out
    man = load_manifest(out)
    assert set(man["files"]) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"zoo.json"}
    # re-shipping replaces it; the same seed trains the same weights on one machine
    before = man["files"]
    assert main(["zoo", "ship", "test", "--no-progress"]) == 0
    assert load_manifest(out)["files"]["base/model.safetensors"] == before["base/model.safetensors"]
    assert main(["zoo", "ship", "--no-progress"]) == 2  # neither a preset nor --all
    assert "--all" in capsys.readouterr().err
