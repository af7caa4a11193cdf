"""Differential tests against mergekit (the PyPI package, run in-process on CPU).

Deterministic methods must match mergekit's saved tensors to 1e-5 in fp32 on the same tiny
checkpoints and recipes (scalars, per-layer gradient lists, filters). DARE/DELLA use different
RNGs, so they are checked statistically (kept fraction, per-rank keep rate, L1 rescaling,
expectation) against mergekit's own sparsifiers, and exactly where no randomness is involved.
"""

from __future__ import annotations

import pytest
import torch

from required import require

try:
    import mergekit  # noqa: F401
except ImportError as exc:
    require(False, "mergekit", f"not importable ({exc}); it is a dev dependency: pip install -e '.[dev]'")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from mergekit.sparsify import bernoulli, della_magprune  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mergesearch.materializer import materialize_recipe  # noqa: E402
from mergesearch.operators import merge_tensor  # noqa: E402


def _mergekit(recipe: dict, out) -> dict[str, torch.Tensor]:
    run_merge(MergeConfiguration.model_validate(recipe), str(out),
              MergeOptions(cuda=False, copy_tokenizer=False, write_model_card=False, quiet=True))
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _recipes(base, experts) -> dict[str, dict]:
    b = str(base)
    e = [str(x) for x in experts]

    def models(params):
        return [{"model": m, "parameters": p} for m, p in zip(e, params)]

    return {
        "linear": {"merge_method": "linear", "models": models([{"weight": 0.2}, {"weight": 0.5},
                                                              {"weight": [0.1, 0.9, 0.4]}])},
        "linear_unnormalized": {"merge_method": "linear", "parameters": {"normalize": False},
                                "models": models([{"weight": 0.2}, {"weight": [0.5, 0.1]}, {"weight": 0.3}])},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b, "parameters": {"lambda": 0.8},
                            "models": models([{"weight": 0.3}, {"weight": [0.5, 1.0]}, {"weight": 0.7}])},
        "ties": {"merge_method": "ties", "base_model": b,
                 "models": models([{"weight": 0.3, "density": 0.3}, {"weight": 0.6, "density": [0.2, 0.9]},
                                   {"weight": [0.7, 0.2], "density": 0.5}])},
        "ties_unnormalized_filters": {
            "merge_method": "ties", "base_model": b, "parameters": {"normalize": False, "lambda": 1.5},
            "models": models([{"weight": 0.4, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]},
                              {"weight": 0.5, "density": 0.4}, {"weight": -0.3, "density": 0.8}])},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": b,
                        "models": models([{"weight": 0.3, "density": 0.7, "gamma": 0.05},
                                          {"weight": 0.6, "density": [0.5, 0.9], "gamma": 0.1},
                                          {"weight": 0.5, "density": 0.8, "gamma": 0.0}])},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": b, "parameters": {"normalize": True},
                             "models": models([{"weight": 0.3, "density": 0.6, "gamma": 0.1}] * 3)},
        "slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": e[0]}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]}},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": [{"model": m} for m in e]},
        # No randomness at density 1: the rest of the DARE/DELLA pipeline must match exactly.
        "dare_ties_density1": {"merge_method": "dare_ties", "base_model": b,
                               "models": models([{"weight": 0.3}, {"weight": 0.5}, {"weight": [0.2, 0.9]}])},
        "della_density1": {"merge_method": "della", "base_model": b,
                           "models": models([{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.4}])},
        # The linear (no sign election) forms: several experts, per-layer weights, lambda, normalize.
        "dare_linear_density1": {"merge_method": "dare_linear", "base_model": b, "parameters": {"lambda": 0.9},
                                 "models": models([{"weight": 0.3}, {"weight": [0.6, 0.1]}, {"weight": -0.2}])},
        "della_linear_density1_normalized": {
            "merge_method": "della_linear", "base_model": b, "parameters": {"normalize": True, "lambda": 1.2},
            "models": models([{"weight": [0.2, 0.7]}, {"weight": 0.5}, {"weight": 0.4}])},
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_deterministic_methods_match_mergekit(arch, tiny_family, tmp_path):
    base, experts = tiny_family(arch, 3, layers=3)
    failures = []
    for name, recipe in _recipes(base, experts).items():
        recipe = {**recipe, "dtype": "float32"}
        ref = _mergekit(recipe, tmp_path / f"mk-{name}")
        ours = materialize_recipe(recipe, device="cpu").state_dict()
        assert set(ours) == set(ref), name
        diff = max((ours[k] - ref[k].float()).abs().max().item() for k in ref)
        if not diff <= 1e-5:
            failures.append(f"{name}: max |ours - mergekit| = {diff:.2e}")
    assert not failures, failures


def _big_delta(seed=0, shape=(64, 512)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, base + 0.05 * torch.randn(shape, generator=g)


def test_dare_keeps_density_fraction_and_preserves_l1_like_mergekit():
    base, expert = _big_delta()
    d = expert - base
    n = d.numel()
    for density in (0.2, 0.5, 0.9):
        ours = merge_tensor("dare_linear", base, [expert], density=density, seed=1) - base
        torch.manual_seed(1)
        theirs = bernoulli(d, density, rescale_norm="l1")
        sigma = (density * (1 - density) / n) ** 0.5
        for got in (ours, theirs):
            kept = (got != 0).float().mean().item()
            assert abs(kept - density) < 5 * sigma, (density, kept)
            # rescale: the L1 norm of the task vector is preserved exactly
            assert abs(got.abs().sum().item() / d.abs().sum().item() - 1) < 1e-4
            # kept entries are the original scaled by one common factor (about 1 / density)
            ratio = got[got != 0] / d[got != 0]
            assert ratio.std().item() < 1e-4 and abs(ratio.mean().item() * density - 1) < 0.05
        # without rescale the kept entries are unchanged
        raw = merge_tensor("dare_linear", base, [expert], density=density, rescale=0, seed=2) - base
        keep = raw != 0
        torch.testing.assert_close(raw[keep], d[keep], rtol=0, atol=1e-6)


def test_dare_expectation_is_the_task_vector():
    base, expert = _big_delta(shape=(32, 64))
    d = expert - base
    mean = torch.stack([merge_tensor("dare_linear", base, [expert], density=0.5, seed=s) - base
                        for s in range(200)]).mean(0)
    slope = (mean * d).sum() / (d * d).sum()
    assert abs(slope.item() - 1) < 0.02
    assert ((mean - d).norm() / d.norm()).item() < 0.15


def test_della_keep_rate_follows_magnitude_rank_like_mergekit():
    base, expert = _big_delta(shape=(64, 512))
    d = expert - base
    density, eps = 0.5, 0.2
    ours = merge_tensor("della_linear", base, [expert], density=density, epsilon=eps, seed=3) - base
    torch.manual_seed(3)
    theirs = della_magprune(d, density, eps, rescale_norm="l1")
    ranks = d.abs().argsort(dim=1).argsort(dim=1).float() / (d.shape[1] - 1)  # 0 = smallest in its row
    for got in (ours, theirs):
        kept = (got != 0).float()
        assert abs(kept.mean().item() - density) < 0.01
        for lo, hi in [(0.0, 0.2), (0.4, 0.6), (0.8, 1.0)]:
            sel = (ranks >= lo) & (ranks <= hi)
            want = (density - eps + 2 * eps * ranks[sel]).mean().item()
            sigma = (want * (1 - want) / sel.sum().item()) ** 0.5
            assert abs(kept[sel].mean().item() - want) < 5 * sigma, (lo, hi)
        assert abs(got.abs().sum().item() / d.abs().sum().item() - 1) < 1e-4
    # the two implementations agree on the per-bucket keep rates
    for lo, hi in [(0.0, 0.1), (0.9, 1.0)]:
        sel = (ranks >= lo) & (ranks <= hi)
        a, b = (ours[sel] != 0).float().mean().item(), (theirs[sel] != 0).float().mean().item()
        assert abs(a - b) < 0.05


def test_dare_ties_statistics_on_a_checkpoint(tiny_family, tmp_path):
    """dare_ties through both tools on one checkpoint: same kept fraction of each task vector, and the kept
    entries are the task vector's rescaled so that its L1 norm is preserved (d * |d|_1 / |kept|_1)."""
    base, experts = tiny_family("llama", 1, layers=2)
    recipe = {"merge_method": "dare_ties", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(experts[0]), "parameters": {"weight": 1.0, "density": 0.3}}]}
    ref = _mergekit(recipe, tmp_path / "mk")
    m = materialize_recipe(recipe, device="cpu")
    ours = m.state_dict()
    b = load_file(base / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    e = load_file(experts[0] / "model.safetensors")
    d = e[name] - b[name]
    for got in (ours[name], ref[name]):
        kept = got - b[name]
        keep = kept != 0
        assert abs(keep.float().mean().item() - 0.3) < 0.03
        factor = d.abs().sum() / d[keep].abs().sum()  # written out: DARE's L1 rescale of one expert
        torch.testing.assert_close(kept[keep], d[keep] * factor, rtol=1e-4, atol=1e-6)


# --- exactly k at ties (bf16 task vectors) --------------------------------------------------------


def _tied_delta(n: int = 40_000, seed: int = 0, levels: int = 12) -> torch.Tensor:
    """(n,) bf16 task vector with few distinct magnitudes: nearly every threshold falls inside a tie."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.linspace(1e-3, 2e-2, levels)[torch.randint(levels, (n,), generator=g)]
    signs = torch.randint(2, (n,), generator=g) * 2 - 1
    rounded = (0.01 * torch.randn(n, generator=g)).abs() + 1e-4  # realistic bf16 rounding: ~1e3 values
    return torch.where(torch.arange(n) % 2 == 0, mags, rounded).mul(signs).bfloat16()


def _order_mask(d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Independent formula: entries at positions [lo, hi) of the order 'larger |d| first, then lower
    index first' (Python's stable sort on (-|d|, index))."""
    mags = d.abs().float().tolist()
    order = sorted(range(len(mags)), key=lambda j: (-mags[j], j))
    keep = torch.zeros(len(mags), dtype=torch.bool)
    keep[order[lo:hi]] = True
    return keep


class _StableSortTorch:
    """`torch` as mergekit.sparsify sees it, with its sorts made stable in our tie order (its own
    order among equal magnitudes is whatever torch's unstable sort gives)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def argsort(w, descending=False):
        idx = torch.sort(w, descending=True, stable=True).indices  # larger first, then lower index
        return idx if descending else idx.flip(0)

    @staticmethod
    def sort(w, descending=False):
        idx = _StableSortTorch.argsort(w, descending=descending)
        return torch.return_types.sort((w[idx], idx))


@pytest.mark.parametrize("density, gamma", [(0.5, 0.05), (0.3, 0.05), (0.7, 0.05), (0.123, 0.05), (0.4, 0.0),
                                            (0.95, 0.1)])  # the last: density + gamma > 1, fewer outliers dropped
def test_ties_and_breadcrumbs_keep_exactly_k_at_bf16_ties(density, gamma, monkeypatch):
    import mergekit.sparsify as sp

    d = _tied_delta()
    n = d.numel()
    assert d.abs().unique().numel() < n // 10  # many ties
    zero = torch.zeros_like(d)
    k = max(1, int(density * n))
    # ties (one expert, weight 1): base + the k largest entries, exactly
    ties = merge_tensor("ties", zero, [d], weight=1.0, density=density)
    assert int((ties != 0).sum()) == k
    assert torch.equal(ties != 0, _order_mask(d, 0, k))
    # breadcrumbs: drop the int(gamma n) largest and the smallest, exactly int(density n) remain
    target, n_top = int(density * n), int(gamma * n)
    n_top = min(n_top, n - target)
    crumbs = merge_tensor("breadcrumbs", zero, [d], weight=1.0, density=density, gamma=gamma)
    assert int((crumbs != 0).sum()) == target
    assert torch.equal(crumbs != 0, _order_mask(d, n_top, n_top + target))

    # mergekit as published: also exactly k, the same magnitudes kept; only which of the tied entries
    # at the threshold differs (torch's unstable sort).
    theirs = sp.magnitude(d, density) != 0
    assert int(theirs.sum()) == k
    assert torch.equal(d.abs()[theirs].float().sort().values, d.abs()[ties != 0].float().sort().values)
    # mergekit with a stable sort in our order: the same entries.
    monkeypatch.setattr(sp, "torch", _StableSortTorch())
    assert torch.equal(sp.magnitude(d, density) != 0, ties != 0)
    assert torch.equal(sp.magnitude_outliers(d, density, gamma=gamma) != 0, crumbs != 0)


def test_bf16_checkpoints_with_ties_match_mergekit(tiny_family, tmp_path, monkeypatch):
    """Checkpoints stored in bf16 (task vectors full of equal magnitudes), merged in float32 by both
    tools: TIES and breadcrumbs at the issue's densities match mergekit (given a stable sort) to 1e-6."""
    import mergekit.sparsify as sp
    from safetensors.torch import save_file

    base, experts = tiny_family("llama", 3, layers=3)
    for folder in (base, *experts):
        w = load_file(folder / "model.safetensors")
        save_file({k: v.bfloat16() for k, v in w.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    b = load_file(base / "model.safetensors")
    split = 0  # thresholds that fall inside a tie: keeping every |d| >= threshold would keep more than k
    for folder, density in zip(experts, (0.5, 0.3, 0.7)):
        e = load_file(folder / "model.safetensors")
        for name in b:
            d = (e[name].float() - b[name].float()).abs().reshape(-1)
            top, k = d.sort(descending=True).values, max(1, int(density * d.numel()))
            split += bool(k < d.numel() and top[k - 1] == top[k])
    assert split >= 5, split
    be, ex = str(base), [str(x) for x in experts]
    recipes = {
        "ties": {"merge_method": "ties", "base_model": be, "models": [
            {"model": ex[0], "parameters": {"weight": 0.4, "density": 0.5}},
            {"model": ex[1], "parameters": {"weight": 0.3, "density": 0.3}},
            {"model": ex[2], "parameters": {"weight": 0.3, "density": 0.7}}]},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": be, "models": [
            {"model": m, "parameters": {"weight": 0.3, "density": dn, "gamma": 0.05}}
            for m, dn in zip(ex, (0.5, 0.3, 0.7))]},
    }
    monkeypatch.setattr(sp, "torch", _StableSortTorch())
    for method, recipe in recipes.items():
        recipe = {**recipe, "dtype": "float32"}
        ref = _mergekit(recipe, tmp_path / f"mk-{method}")
        ours = materialize_recipe(recipe, device="cpu").state_dict()
        diff = max((ours[k] - ref[k].float()).abs().max().item() for k in ref)
        assert diff <= 1e-6, (method, diff)
