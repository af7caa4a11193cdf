"""The tiny expert zoo: a base model and skill experts trained locally, the embedded default."""

from mergesearch.zoo.build import (MANIFEST, REPORT, build_zoo, ensure_zoo, fingerprint, is_complete, load_manifest,
                                   study_inputs)
from mergesearch.zoo.presets import PRESETS, ZooPreset, get_preset
from mergesearch.zoo.shipped import SHIPPED, SHIPPED_DIR, get_zoo, ship_zoo, shipped_zoo, verify_zoo
from mergesearch.zoo.skills import SKILLS, format_prompt
from mergesearch.zoo.tables import composition_report, format_composition, format_report, zoo_report

__all__ = [
    "MANIFEST", "REPORT", "PRESETS", "SHIPPED", "SHIPPED_DIR", "SKILLS", "ZooPreset", "build_zoo", "composition_report",
    "ensure_zoo", "fingerprint", "format_composition", "format_prompt", "format_report", "get_preset", "get_zoo",
    "is_complete", "load_manifest", "ship_zoo", "shipped_zoo", "study_inputs", "verify_zoo", "zoo_report",
]
