import pytest
import torch

from mergesearch.checkpoints import open_checkpoint
from mergesearch.config import SpaceConfig
from mergesearch.errors import ConfigError, OperatorError
from mergesearch.plan import Plan
from mergesearch.space import SearchSpace, allocate_chunks, parse_key, slot_key

from conftest import make_tiny_model


@pytest.fixture(scope="module")
def tensors(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", layers=4)
    return list(open_checkpoint(path).tensors.values())


EXPERTS = ["a", "b", "c"]


@pytest.mark.parametrize("cfg, method, expected", [
    # 3 experts x 1 group x weight (lambda fixed)
    (dict(granularity="global", parameters={"lambda": {"fixed": 1}}), "task_arithmetic", 3),
    # 3 experts x (4 layers + io) x (weight, density)
    (dict(parameters={"lambda": {"fixed": 1}}), "ties", 3 * 5 * 2),
    # 2 layer groups + io
    (dict(layer_groups=2, parameters={"lambda": {"fixed": 1}}), "task_arithmetic", 3 * 3),
    # per layer x (attn, mlp, norm) + io split into (embed, norm, lm_head)
    (dict(per_module=True, parameters={"lambda": {"fixed": 1}}), "task_arithmetic", 3 * (4 * 3 + 3)),
    # 2 chunks everywhere
    (dict(chunks=2, parameters={"lambda": {"fixed": 1}}), "task_arithmetic", 3 * 5 * 2),
    # lambda searched: one per group, not per expert
    (dict(granularity="global"), "task_arithmetic", 3 + 1),
])
def test_slot_counts(tensors, cfg, method, expected):
    sp = SearchSpace(SpaceConfig(**cfg), method, tensors, EXPERTS, 4)
    assert sp.n_params == expected
    arr = sp.arrays(sp.point())
    assert arr["weight"].shape == (len(tensors), 3, sp.max_chunks)
    assert torch.allclose(arr["weight"], torch.full_like(arr["weight"], 1 / 3))


def test_values_land_in_their_layer(tensors):
    sp = SearchSpace(SpaceConfig(parameters={"lambda": {"fixed": 1}}), "task_arithmetic", tensors, EXPERTS, 4)
    values = {s.key: (0.1 * (s.chunk + 1) if s.group == "L02" and s.expert == "b" else 0.5) for s in sp.slots}
    arr = sp.arrays(values)["weight"]
    for i, t in enumerate(tensors):
        want = 0.1 if (t.layer == 2) else 0.5
        assert float(arr[i, 1, 0]) == pytest.approx(want)
        assert float(arr[i, 0, 0]) == pytest.approx(0.5)


def test_keys_round_trip():
    key = slot_key("density", "upper", "L03", "mlp", 2)
    assert key == "density[upper]@L03.mlp#2"
    assert parse_key(key) == {"param": "density", "expert": "upper", "group": "L03", "layer": 3,
                              "module": "mlp", "chunk": 2}
    assert parse_key("lambda@all")["expert"] is None
    with pytest.raises(ValueError):
        parse_key("not a key")


def test_allocate_chunks():
    counts = allocate_chunks([1.0, 5.0, 2.0, 2.0], budget=10, max_chunks=4)
    assert sum(counts) == 10 and min(counts) >= 1 and max(counts) <= 4
    assert counts[1] == max(counts)  # the heaviest layer gets the most chunks
    assert allocate_chunks([1.0, 1.0], budget=100, max_chunks=3) == [3, 3]
    assert allocate_chunks([0.0, 0.0, 0.0], budget=2, max_chunks=4) == [1, 1, 1]


def test_bad_parameters(tensors):
    with pytest.raises(OperatorError, match="did you mean 'density'"):
        SearchSpace(SpaceConfig(parameters={"densty": {"low": 0.2}}), "ties", tensors, EXPERTS, 4)
    with pytest.raises(OperatorError, match="outside its allowed range"):
        SearchSpace(SpaceConfig(parameters={"density": {"fixed": 1.5}}), "ties", tensors, EXPERTS, 4)
    with pytest.raises(OperatorError, match="leaves its allowed range"):
        SearchSpace(SpaceConfig(parameters={"weight": {"low": -5, "high": 1}}), "ties", tensors, EXPERTS, 4)
    with pytest.raises(ConfigError, match="missing"):
        SearchSpace(SpaceConfig(), "ties", tensors, EXPERTS, 4).arrays({})


def test_della_epsilon_is_capped_to_a_valid_plan(tensors):
    sp = SearchSpace(SpaceConfig(granularity="global"), "della", tensors, EXPERTS, 4)
    values = {s.key: {"density": 0.12, "epsilon": 0.2}.get(s.param, 0.5) for s in sp.slots}
    arr = sp.arrays(values)
    assert float(arr["epsilon"].max()) < 0.12
    Plan("della", tuple(t.name for t in tensors), tuple(sp.chunk_counts), 3, arr).validate()


def test_fingerprint_changes_with_the_space(tensors):
    a = SearchSpace(SpaceConfig(), "ties", tensors, EXPERTS, 4).fingerprint()
    assert a == SearchSpace(SpaceConfig(), "ties", tensors, EXPERTS, 4).fingerprint()
    assert a != SearchSpace(SpaceConfig(parameters={"density": {"low": 0.5}}), "ties", tensors, EXPERTS,
                            4).fingerprint()
