"""Local Hugging Face checkpoints: open (safetensors only), check compatibility, map tensors, save atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from mergesearch.errors import CheckpointError
from mergesearch.fileio import atomic_write

log = logging.getLogger(__name__)

MODULE_KINDS = (
    "embed", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o",
    "mlp_gate", "mlp_up", "mlp_gate_up", "mlp_down", "norm", "lm_head", "other",
)
# Coarse groups for `per_module` search spaces: attention vs MLP vs norms vs the rest.
MODULE_GROUPS = {
    "embed": "embed", "lm_head": "lm_head", "norm": "norm", "other": "other",
    "attn_q": "attn", "attn_k": "attn", "attn_v": "attn", "attn_qkv": "attn", "attn_o": "attn",
    "mlp_gate": "mlp", "mlp_up": "mlp", "mlp_gate_up": "mlp", "mlp_down": "mlp",
}
# Architectures whose naming the kind patterns below were written for.
KNOWN_MODEL_TYPES = {
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox",
}

# (regex on the tensor name, kind); first match wins. Covers Llama/Mistral/Qwen2/Qwen3/Gemma/Phi-3
# (`model.layers.N...`), GPT-2 (`transformer.h.N...`) and GPT-NeoX (`gpt_neox.layers.N...`).
_KIND_PATTERNS = [
    (r"(embed_tokens|wte|wpe|embed_in|word_embeddings|embed_positions)\.", "embed"),
    (r"(^|\.)(lm_head|embed_out)\.", "lm_head"),
    (r"(norm|ln_\d|ln_f|layernorm|layer_norm)[^.]*\.(weight|bias)$", "norm"),
    (r"\.(q_proj|query)\.", "attn_q"),
    (r"\.(k_proj|key)\.", "attn_k"),
    (r"\.(v_proj|value)\.", "attn_v"),
    (r"\.(qkv_proj|c_attn|query_key_value|Wqkv)\.", "attn_qkv"),
    (r"\.(o_proj|out_proj|attn\.c_proj|attention\.dense|dense)\.", "attn_o"),
    (r"\.(gate_up_proj)\.", "mlp_gate_up"),
    (r"\.(gate_proj|w1)\.", "mlp_gate"),
    (r"\.(up_proj|c_fc|dense_h_to_4h|w3)\.", "mlp_up"),
    (r"\.(down_proj|mlp\.c_proj|dense_4h_to_h|w2)\.", "mlp_down"),
]
_KIND_RES = [(re.compile(p), k) for p, k in _KIND_PATTERNS]
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: where it sits in the network and what it is."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layer: int | None
    kind: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def group(self) -> str:
        return MODULE_GROUPS[self.kind]


def tensor_kind(name: str) -> tuple[int | None, str]:
    """(layer index or None, module kind) of a tensor name, from its HF naming."""
    m = _LAYER_RE.search(name)
    layer = int(m.group(1)) if m else None
    for rx, kind in _KIND_RES:
        if rx.search(name):
            return layer, kind
    return layer, "other"


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a config string such as 'bfloat16' or 'fp32'."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).lower().removeprefix("torch.")]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16") from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when present, else the CPU; an unavailable CUDA request is a user error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CheckpointError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} requested but no CUDA device is available: use device: auto or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise CheckpointError(f"device {device!r} requested but this machine has {n} CUDA device(s): "
                              f"use cuda:0{f' to cuda:{n - 1}' if n > 1 else ''}")
    if dev.type == "cuda" and dev.index is None:  # the GPU it runs on, by index: trials record it
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Checkpoint:
    """An opened local HF model folder; tensors are read from disk only when asked."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise CheckpointError(f"model folder not found: {self.path} (give a local Hugging Face model folder)")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path} has no config.json: is it a Hugging Face model folder?")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        self.model_type: str = self.config.get("model_type", "unknown")
        archs = self.config.get("architectures") or [self.model_type]
        self.architecture: str = archs[0]
        self._files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        self._file_of: dict[str, Path] = {}
        for f in self._files:
            try:
                with safe_open(f, framework="pt") as sf:
                    for name in sf.keys():
                        sl = sf.get_slice(name)
                        layer, kind = tensor_kind(name)
                        self.tensors[name] = TensorInfo(name, tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(),
                                                        torch.float32), layer, kind)
                        self._file_of[name] = f
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {f}: {exc} (is the file complete?)") from None
        layers = [t.layer for t in self.tensors.values() if t.layer is not None]
        self.num_layers: int = int(self.config.get("num_hidden_layers") or self.config.get("n_layer")
                                   or (max(layers) + 1 if layers else 0))
        if self.model_type not in KNOWN_MODEL_TYPES:
            log.warning("%s: architecture %r is not one mergesearch knows; layer indices and module kinds "
                        "are guessed from tensor names", self.path, self.model_type)

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index} is malformed ({exc}): re-save the model with save_pretrained") from None
            files = [self.path / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{self.path} is missing shard(s) {', '.join(missing)} named in its index")
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        others = sorted(self.path.glob("*.safetensors"))
        if others:
            return others
        pickles = [p.name for p in self.path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{self.path} holds only pickle weights ({', '.join(pickles[:3])}); mergesearch loads safetensors only "
                "because pickle can run code: convert with `AutoModelForCausalLM.from_pretrained(p).save_pretrained(p)`"
            )
        raise CheckpointError(f"{self.path} has no model.safetensors or model.safetensors.index.json")

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def load(self, names: Iterable[str] | None = None, *, dtype: torch.dtype | str | None = None,
             device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Read tensors (all, or `names`) as a dict, cast to `dtype`, on `device`.

        safetensors reads straight into the device's memory (no host copy of a GPU's tensors), and the
        cast happens there: a bf16 checkpoint is never widened on the host."""
        wanted = list(self.tensors) if names is None else list(names)
        unknown = [n for n in wanted if n not in self.tensors]
        if unknown:
            raise CheckpointError(f"{self.path} has no tensor {unknown[0]!r}")
        dt = parse_dtype(dtype) if dtype is not None else None
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in wanted:
            by_file.setdefault(self._file_of[n], []).append(n)
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        for f, ns in by_file.items():
            with safe_open(f, framework="pt", device=str(dev)) as sf:
                for n in ns:
                    t = sf.get_tensor(n)
                    if dt is not None and t.is_floating_point():
                        t = t.to(dt)
                    out[n] = t
        return {n: out[n] for n in wanted}

    def fingerprint(self) -> dict:
        """Path and sha256 of config and weight index (or the single weights file) for provenance."""
        index = self.path / "model.safetensors.index.json"
        weights = index if index.is_file() else self._files[0]
        return {
            "path": str(self.path.resolve()),
            "architecture": self.architecture,
            "config_sha256": _sha256(self.path / "config.json"),
            "weights_file": weights.name,
            "weights_sha256": _sha256(weights),
        }

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {self.architecture}, {self.num_layers} layers)"


def open_checkpoint(path: str | os.PathLike | Checkpoint) -> Checkpoint:
    """Open a local HF folder (config.json + safetensors); raises CheckpointError with the fix."""
    return path if isinstance(path, Checkpoint) else Checkpoint(path)


def same_path(a: Path, b: Path) -> bool:
    """Whether two paths name the same folder (a base listed among the experts is merged as a zero delta)."""
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def check_compatible(base: Checkpoint, experts: Sequence[Checkpoint], *, merge_common_vocab: bool = False) -> None:
    """Raise one CheckpointError listing every mismatch between the base and the experts."""
    problems: list[str] = []
    vocab_notes: list[str] = []
    for ex in experts:
        if ex.architecture != base.architecture:
            problems.append(f"{ex.path.name}: architecture {ex.architecture} != base {base.architecture}")
            continue
        missing = [n for n in base.tensors if n not in ex.tensors]
        extra = [n for n in ex.tensors if n not in base.tensors]
        if missing:
            problems.append(f"{ex.path.name}: missing {len(missing)} tensor(s), e.g. {missing[0]}")
        if extra:
            problems.append(f"{ex.path.name}: {len(extra)} tensor(s) not in base, e.g. {extra[0]}")
        for name, bt in base.tensors.items():
            et = ex.tensors.get(name)
            if et is None or et.shape == bt.shape:
                continue
            vocab_only = (bt.kind in ("embed", "lm_head") and len(bt.shape) == len(et.shape)
                          and bt.shape[1:] == et.shape[1:])
            if vocab_only and et.shape[0] > bt.shape[0]:
                if merge_common_vocab:
                    continue
                vocab_notes.append(f"{ex.path.name}: {name} has {et.shape[0]} vocabulary rows vs base {bt.shape[0]}")
            else:
                problems.append(f"{ex.path.name}: {name} shape {list(et.shape)} != base {list(bt.shape)}")
    if vocab_notes:
        problems.append(
            "vocabulary size mismatch (an expert added tokens): " + "; ".join(vocab_notes)
            + " -- set merge_common_vocab (--merge-common-vocab) to merge the rows shared with the base"
        )
    if problems:
        raise CheckpointError(f"{len(problems)} incompatibilit{'y' if len(problems) == 1 else 'ies'} with base "
                              f"{base.path}: " + " | ".join(problems))


def save_model(model_or_state_dict, out_dir: str | os.PathLike, *, base: Checkpoint, provenance: Mapping,
               force: bool = False, max_shard_size: str = "2GB") -> Path:
    """Write a merged model as a HF folder (safetensors, config and tokenizer of the base) plus provenance.json.

    Written into a temporary sibling folder and renamed into place, so a crash never leaves a
    half-written checkpoint; an existing `out_dir` is replaced only with `force`.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not force:
        raise CheckpointError(f"{out} already exists: choose another --out or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if isinstance(model_or_state_dict, Mapping):
            from huggingface_hub import save_torch_state_dict

            state = _own_storage({k: v.detach().contiguous().cpu() for k, v in model_or_state_dict.items()})
            save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
            shutil.copy2(base.path / "config.json", tmp / "config.json")
        else:
            model_or_state_dict.save_pretrained(tmp, max_shard_size=max_shard_size,
                                                state_dict=_own_storage(model_or_state_dict.state_dict()))
        for name in ("generation_config.json", *TOKENIZER_FILES):
            src = base.path / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        atomic_write(tmp / "provenance.json", json.dumps(dict(provenance), indent=2, default=str) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _own_storage(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each view of a larger buffer copied to the host into a tensor of its own. The materialiser's
    parameters are views of one flat buffer (mergesearch.groups), which safetensors refuses to save ("None is
    covering the entire storage"). A tied weight stays one tensor under its names, saved once by transformers."""
    out, copies = {}, {}
    for k, v in state.items():
        if v.untyped_storage().nbytes() == v.numel() * v.element_size():
            out[k] = v
            continue
        key = (v.data_ptr(), tuple(v.shape))
        if key not in copies:
            copies[key] = v.detach().to("cpu", copy=True)
        out[k] = copies[key]
    return out


def task_vector_stats(base: Checkpoint, experts: Sequence[Checkpoint]):
    """Squared task-vector norms per expert and layer, the base's per layer, and the task vectors' Gram matrix.

    Returns (delta_sq (n_experts, n_layers + 1), base_sq (n_layers + 1,), gram (n_experts, n_experts)),
    float64; the last row collects the tensors outside the layers (embeddings, final norm, head).
    Streamed one tensor at a time, so a 7B model needs only a few tensors in memory.
    """
    n, n_rows = len(experts), base.num_layers + 1
    delta_sq = torch.zeros(n, n_rows, dtype=torch.float64)
    base_sq = torch.zeros(n_rows, dtype=torch.float64)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for name, info in base.tensors.items():
        if not info.dtype.is_floating_point:
            continue
        b = base.load([name], dtype=torch.float32)[name]
        # expert rows beyond the base's vocabulary (merge_common_vocab) are not compared
        d = torch.stack([(ex.load([name], dtype=torch.float32)[name][: b.shape[0]] - b).flatten()
                         for ex in experts]).double()  # (n_experts, numel)
        row = info.layer if info.layer is not None and info.layer < base.num_layers else n_rows - 1
        delta_sq[:, row] += (d * d).sum(1)
        base_sq[row] += float(b.double().pow(2).sum())
        gram += d @ d.T
    return delta_sq, base_sq, gram


def inspect_models(base_path, expert_paths: Sequence, *, merge_common_vocab: bool = False) -> str:
    """A text report: architecture, sizes, per-layer task-vector norms and cosines between task vectors."""
    base = open_checkpoint(base_path)
    experts = [open_checkpoint(p) for p in expert_paths]
    check_compatible(base, experts, merge_common_vocab=merge_common_vocab)
    lines = [
        f"base: {base.path}",
        f"architecture: {base.architecture} (model_type {base.model_type})",
        f"layers: {base.num_layers}   tensors: {len(base.tensors)}   parameters: {base.num_parameters:,}",
    ]
    if not experts:
        return "\n".join(lines)
    n = len(experts)
    n_rows = base.num_layers + 1
    delta_sq, base_sq, gram = task_vector_stats(base, experts)
    names = [ex.path.name for ex in experts]
    width = max(8, *(len(s) for s in names))
    lines.append("")
    lines.append("task-vector norm per layer, as % of the base's norm in that layer:")
    lines.append("layer   " + "".join(f"{s:>{width + 2}}" for s in names))
    for r in range(n_rows):
        label = str(r) if r < base.num_layers else "other"
        pct = 100 * delta_sq[:, r].sqrt() / base_sq[r].sqrt().clamp_min(1e-12)
        lines.append(f"{label:<8}" + "".join(f"{float(v):>{width + 1}.2f}%" for v in pct))
    total = 100 * delta_sq.sum(1).sqrt() / base_sq.sum().sqrt().clamp_min(1e-12)
    lines.append(f"{'total':<8}" + "".join(f"{float(v):>{width + 1}.2f}%" for v in total))
    lines.append("")
    lines.append("cosine similarity between task vectors:")
    norms = gram.diag().sqrt().clamp_min(1e-12)
    cos = gram / norms[:, None] / norms[None, :]
    lines.append(" " * width + "".join(f"{s:>{width + 2}}" for s in names))
    for i, s in enumerate(names):
        lines.append(f"{s:<{width}}" + "".join(f"{float(cos[i, j]):>{width + 2}.3f}" for j in range(n)))
    return "\n".join(lines)
