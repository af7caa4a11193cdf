"""Build a zoo: data splits, the base, one expert per skill, the report and the manifest, atomically."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import torch

from mergesearch.errors import ConfigError
from mergesearch.fileio import atomic_write
from mergesearch.threads import occupying
from mergesearch.zoo.presets import ZooPreset, get_preset
from mergesearch.zoo.skills import eval_splits, format_prompt, get_skill, train_stream
from mergesearch.zoo.tokenizer import build_bpe_tokenizer, build_char_tokenizer
from mergesearch.zoo.train import make_codec, make_model, train_base, train_expert

log = logging.getLogger(__name__)

MANIFEST = "zoo.json"
REPORT = "zoo_report.json"
FORMAT_VERSION = 1
# Training draws per skill that the BPE tokenizer is trained on (never a held-out question).
BPE_TEXTS_PER_SKILL = 2000


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def _write_jsonl(path: Path, rows) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' per-file save/load bars: the zoo shows its own, one per model."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _resolve(preset: str | ZooPreset, tokenizer: str | None = None) -> ZooPreset:
    p = preset if isinstance(preset, ZooPreset) else get_preset(preset)
    if tokenizer is not None and tokenizer != p.tokenizer:
        p = ZooPreset.model_validate({**p.model_dump(), "tokenizer": tokenizer})
    return p


def _tokenizer(p: ZooPreset, seed: int, held_out: dict[str, set[str]]):
    if p.tokenizer == "char":
        return build_char_tokenizer()
    texts = (format_prompt(q) + a + "\n" for s in p.skills
             for q, a in itertools.islice(train_stream(s, seed, held_out[s], "tokenizer"), BPE_TEXTS_PER_SKILL))
    return build_bpe_tokenizer(texts, p.bpe_vocab)


def fingerprint(preset: str | ZooPreset, seed: int) -> str:
    """A short hash of everything that decides a zoo's bytes: preset, seed, zoo source code, torch version.

    Cache folders carry it, so editing the zoo code or the preset rebuilds instead of reusing stale models.
    """
    p = _resolve(preset)
    h = hashlib.sha256()
    h.update(p.model_dump_json().encode())
    h.update(f"seed={seed};torch={torch.__version__};v={FORMAT_VERSION}".encode())
    for src in sorted(Path(__file__).parent.glob("*.py")):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()[:12]


def file_hashes(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file of a zoo folder but its manifest, by path relative to the folder (the manifest's
    `files`, checked by `verify_zoo`)."""
    root = Path(path)
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file() and f != root / MANIFEST}


def is_complete(path: str | os.PathLike) -> bool:
    """True when `path` holds a finished zoo (the manifest is written last)."""
    return (Path(path) / MANIFEST).is_file()


def _sub_seed(seed: int, name: str) -> int:
    return seed * 7919 + zlib.crc32(name.encode())


def _check_preset(p: ZooPreset) -> None:
    """Unknown skill names fail before any work."""
    for s in p.skills:
        get_skill(s)
    stray = sorted(set(p.base.mix) - set(p.skills))
    if stray:
        raise ConfigError(f"base.mix names {stray[0]!r}, which is not one of the preset's skills {list(p.skills)}")


def _draw_splits(p: ZooPreset, seed: int) -> tuple[dict, dict, dict]:
    """(splits {skill: {split: rows}}, held-out questions per skill, monitor rows per skill): the evaluation
    splits and, with `splits.train`, a training split drawn away from every held-out question."""
    sizes = {"calib": p.splits.calib, "test": p.splits.test, "monitor": p.monitor_examples}
    splits = {s: eval_splits(s, sizes, seed) for s in p.skills}
    held_out = {s: {r["question"] for rows in sp.values() for r in rows} for s, sp in splits.items()}
    monitor = {s: sp.pop("monitor") for s, sp in splits.items()} if p.monitor_examples else {}
    return splits, held_out, monitor


def _add_train_split(splits: dict, p: ZooPreset, seed: int, held_out: dict) -> None:
    for s in p.skills:
        draws = train_stream(s, seed, held_out[s], "fewshot")
        pairs = [next(draws) for _ in range(p.splits.train)]
        splits[s]["train"] = [{"id": f"{s}-train-{i:04d}", "prompt": format_prompt(q), "answer": a, "question": q,
                               "skill": s} for i, (q, a) in enumerate(pairs)]


def _write_splits(tmp: Path, splits: dict) -> dict:
    """Write data/<skill>.<split>.jsonl; returns {skill: {split: relative path}} for the manifest."""
    (tmp / "data").mkdir(parents=True)
    files = {}
    for s, sp in splits.items():
        files[s] = {}
        for split, rows in sp.items():
            rel = f"data/{s}.{split}.jsonl"
            _write_jsonl(tmp / rel, rows)
            files[s][split] = rel
    return files


def _train_models(tmp: Path, p: ZooPreset, seed: int, tokenizer, held_out: dict, monitor: dict,
                  progress: bool) -> dict:
    """Train the base, then one expert per skill from it, each saved with the tokenizer; seconds per model."""
    codec = make_codec(tokenizer, p.tokenizer)
    timings = {}
    t = time.perf_counter()
    base = make_model(p.model, tokenizer, seed)
    streams = {s: train_stream(s, seed, held_out[s], "base") for s in p.skills}
    (tmp / "base").mkdir()
    hist = train_base(base, codec, streams, p.base, seed, tmp / "base" / "train_log.jsonl", monitor,
                      p.monitor_every, progress)
    base.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    timings["base"] = round(time.perf_counter() - t, 2)
    log.info("base trained in %.1fs; monitor accuracy %s", timings["base"], hist[-1].get("monitor_acc") if hist else "-")

    for s in p.skills:
        t = time.perf_counter()
        name = f"expert-{s}"
        (tmp / name).mkdir()
        replay = {r: train_stream(r, seed, held_out[r], f"replay-{s}") for r in p.skills}
        expert, hist = train_expert(base, codec, train_stream(s, seed, held_out[s], f"expert-{s}"), replay, p.expert,
                                    _sub_seed(seed, name), tmp / name / "train_log.jsonl", monitor,
                                    p.monitor_every, name, p.base.mix, progress)
        expert.save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
        timings[name] = round(time.perf_counter() - t, 2)
        log.info("%s trained in %.1fs; monitor accuracy %s", name, timings[name],
                 hist[-1].get("monitor_acc") if hist else "-")
    return timings


def _build_into(tmp: Path, p: ZooPreset, seed: int, progress: bool) -> dict:
    """Build a whole zoo into the folder `tmp`: data splits, tokenizer, models, report; returns the manifest."""
    t0 = time.perf_counter()
    _check_preset(p)
    splits, held_out, monitor = _draw_splits(p, seed)
    tokenizer = _tokenizer(p, seed, held_out)
    if p.splits.train:
        _add_train_split(splits, p, seed, held_out)
    files = _write_splits(tmp, splits)
    timings = _train_models(tmp, p, seed, tokenizer, held_out, monitor, progress)
    manifest = {
        "format_version": FORMAT_VERSION,
        "preset": p.name,
        "seed": seed,
        "fingerprint": fingerprint(p, seed),
        "skills": list(p.skills),
        "base": "base",
        "experts": {s: f"expert-{s}" for s in p.skills},
        "data": files,
        "config": p.model_dump(mode="json"),
        "torch": torch.__version__,
        "threads": p.threads,
        "train_seconds": timings,
    }
    if p.report:
        from mergesearch.zoo.tables import zoo_report

        t = time.perf_counter()
        report = zoo_report(tmp, manifest, progress=progress)
        _write_json(tmp / REPORT, report)
        manifest["report"] = REPORT
        timings["report"] = round(time.perf_counter() - t, 2)
    manifest["build_seconds"] = round(time.perf_counter() - t0, 2)
    return manifest


def build_zoo(out: str | os.PathLike, preset: str | ZooPreset = "demo", seed: int = 0, *, overwrite: bool = False,
              progress: bool = True, tokenizer: str | None = None) -> Path:
    """Train a zoo into `out` (base/, expert-<skill>/, data/, zoo.json, zoo_report.json).

    `tokenizer` ("char" or "bpe") replaces the preset's. Everything is built in a temporary sibling folder and moved into place at the end, so `out` is
    either absent, the previous zoo, or complete. Same preset + seed -> same weights on one machine.
    """
    p = _resolve(preset, tokenizer)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
        if not is_complete(out):
            raise ConfigError(f"{out} is not a zoo folder (no {MANIFEST}); refusing to overwrite it, remove it by hand")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = _build_with_manifest(tmp, p, seed, progress)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("zoo %r (seed %d) built in %.1fs at %s", p.name, seed, manifest["build_seconds"], out)
    return out


def _build_with_manifest(tmp: Path, p: ZooPreset, seed: int, progress: bool) -> dict:
    """Train the zoo into the (temporary) folder `tmp` and write its manifest, each file's sha256 included."""
    # the preset's fixed threads (the reduction order, hence the weights, depends on them), counted by the
    # fair-share processes (run, worker, demo) so that a study beside the build shrinks to its share
    with occupying(p.threads), _quiet_transformers():
        manifest = _build_into(tmp, p, seed, progress)
    manifest["files"] = file_hashes(tmp)
    _write_json(tmp / MANIFEST, manifest)
    return manifest


def ensure_zoo(cache_dir: str | os.PathLike, preset: str | ZooPreset = "test", seed: int = 0, *,
               progress: bool = True, tokenizer: str | None = None) -> Path:
    """The cached zoo for (preset, seed, code version) under `cache_dir`, built on first use.

    Safe when several processes ask at once: each builds in its own temporary folder and the
    first to finish wins the rename; the others discard their copy.
    """
    p = _resolve(preset, tokenizer)
    kind = "" if p.tokenizer == "char" else f"-{p.tokenizer}"
    path = Path(cache_dir) / f"zoo-{p.name}{kind}-s{seed}-{fingerprint(p, seed)}"
    if is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        manifest = _build_with_manifest(tmp, p, seed, progress)
        try:
            os.replace(tmp, path)  # fails if another process already put a non-empty folder there
        except OSError:
            if not is_complete(path):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a finished zoo, with paths left relative to the zoo folder."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise ConfigError(f"{path} is not a finished zoo (no {MANIFEST}); build it with `mergesearch zoo build`")
    return json.loads(f.read_text())


def study_inputs(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """A study's `models` section and its `objectives.tasks` (one task per skill, calib and test, with the
    decoding keys a chain skill is scored by) for this zoo; the paths are under `path` as given."""
    zoo = Path(path)
    m = load_manifest(zoo)
    models = {"base": str(zoo / m["base"]), "experts": {s: str(zoo / m["experts"][s]) for s in m["skills"]}}
    tasks = [{"name": s, "calib": str(zoo / m["data"][s]["calib"]), "test": str(zoo / m["data"][s]["test"]),
              **get_skill(s).task_settings()} for s in m["skills"]]
    return models, tasks
