"""The tiny expert zoo: a base model and skill experts trained locally, the embedded default."""

from mergesearch.zoo.build import (MANIFEST, REPORT, build_zoo, ensure_zoo, fingerprint, is_complete, load_manifest,
                                   study_inputs)
from mergesearch.zoo.presets import PRESETS, ZooPreset, get_preset
from mergesearch.zoo.skills import SKILLS, format_prompt

__all__ = [
    "MANIFEST", "REPORT", "PRESETS", "SKILLS", "ZooPreset", "build_zoo", "ensure_zoo", "fingerprint",
    "format_prompt", "get_preset", "is_complete", "load_manifest", "study_inputs",
]
