"""difract_ext.util: the one seed mixer, LR schedule, config (de)serialiser and atomic writer.

The seed and schedule tests compare against the formulas the shipped artifacts were made with
(written out here as they stood before they were unified), value for value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from difract_ext.flux.sites import Site
from difract_ext.util.atomic import atomic_write_with
from difract_ext.util.config import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    read_config,
    write_config,
)
from difract_ext.util.schedules import warmup_cosine
from difract_ext.util.seeds import HARVEST_BASIS, derive_seed, shapes_step_seed, text_seed

SHIPPED = Path(__file__).resolve().parents[1] / "difract_ext" / "toy" / "dictionaries"

# ---------------------------------------------------------------- the formulas as they were


def _old_training_seed(*parts: int) -> int:  # training/data.py derive_seed
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ int(p)) * 0x100000001B3) % (1 << 61)
    return h


def _old_harvest_seed(*parts: int) -> int:  # capture/harvest.py _mix_seed
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


def _old_step_seed(seed: int, step: int, salt: int = 0) -> int:  # toy/train.py _step_generator
    return (seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1)


def _old_trainer_lr(
    total: int, warmup: int, end_fraction: float, step: int
) -> float:  # trainer _lr_lambda
    if warmup and step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return end_fraction + (1 - end_fraction) * 0.5 * (1 + math.cos(math.pi * frac))


def _old_toy_lr(cfg: Any, step: int) -> float:  # toy/train.py _lr_at
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if step >= cfg.steps:
        frac = (step - cfg.steps) / max(1, cfg.restart_steps)
        return cfg.restart_lr * (
            cfg.min_lr_ratio
            + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        )
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    )


# ---------------------------------------------------------------- seeds

PARTS = [
    (0,),
    (0, 0),
    (7, 3),
    (0, 3, 1, 2, 1),
    (123456, 40, 9, 3, 0),
    (2**47 - 1, 5),
    (1, 2**40, 3, 4, 1),
]


def test_training_and_harvest_seeds_are_the_old_values() -> None:
    for parts in PARTS:
        assert derive_seed(*parts) == _old_training_seed(*parts)
        assert derive_seed(*parts, basis=HARVEST_BASIS) == _old_harvest_seed(*parts)
    # the harvest's 48-bit mask is gone: seeds s and s + 2**48 no longer draw the same positions
    assert derive_seed(2**48 + 3, basis=HARVEST_BASIS) != derive_seed(3, basis=HARVEST_BASIS)
    assert derive_seed(1, 2) != derive_seed(1, 2, basis=HARVEST_BASIS)  # domains separated
    for seed, step, salt in [(0, 0, 0), (0, 5, 2), (3, 3199, 1), (2**40, 10**6, 2)]:
        assert shapes_step_seed(seed, step, salt) == _old_step_seed(seed, step, salt)


# the init and resampling seeds of the shipped dictionaries, computed with the old formulas
SHIPPED_SEEDS = {
    # layers 0 and 3 (added by --add-saes; the old formula gives the same values)
    "saes/img_0/relu_l1-1e-02_x2": (973446778541856203, 1212997809120456236),
    "saes/txt_0/relu_l1-1e-02_x0.75": (1037984977161040873, 1896751239403438386),
    "saes/img_3/relu_l1-1e-02_x2": (1729682213386427264, 2257709511918861213),
    "saes/txt_3/relu_l1-1e-02_x0.75": (867582950112510638, 1860370339377758835),
    "saes/img_1/relu_l1-1e-02_x2": (528134294796532152, 47896023687993557),
    "saes/img_2/relu_l1-1e-02_x2": (1465019944412919175, 306762297543606712),
    "saes/txt_1/relu_l1-1e-02_x0.75": (2292871539909463682, 1856024078999349559),
    "saes/txt_2/relu_l1-1e-02_x0.75": (1165384239740809125, 1309866162321621182),
    "transcoders/img_0/relu_l1-3e-03_x2": (1946985577462142859, 1885935342183871724),
    "transcoders/img_1/relu_l1-1e-03_x2": (219299318208409277, 1733932130187483990),
    "transcoders/img_2/relu_l1-1e-03_x2": (1747105267662030271, 619524449583425776),
    "transcoders/img_3/relu_l1-1e-03_x2": (1574223086096567718, 47168996994221323),
    "transcoders/txt_0/relu_l1-2e-04_x0.75": (1906515967834522322, 1760926851974888359),
    "transcoders/txt_1/relu_l1-1.2e-03_x0.75": (557437750637663533, 843589451190860454),
    "transcoders/txt_2/relu_l1-1.2e-03_x0.75": (1463926851343546064, 172650879139095309),
    "transcoders/txt_3/relu_l1-1.2e-03_x0.75": (1246336583165742753, 1080529407831749770),
}


def test_shipped_dictionaries_keep_their_seeds() -> None:
    from difract_ext.training import trainer
    from difract_ext.training.specs import DictionarySpec, TrainConfig

    files = sorted(SHIPPED.rglob("training.json"))
    assert len(files) == len(SHIPPED_SEEDS)
    for f in files:
        record = json.loads(f.read_text())
        spec = DictionarySpec.from_json(record["spec"], source=str(f))
        cfg = TrainConfig.from_json(record["config"], source=str(f))
        init, resample = SHIPPED_SEEDS[spec.resolved_name]
        name_seed = trainer._spec_seed(spec)
        assert name_seed == text_seed(spec.resolved_name)
        assert derive_seed(cfg.seed, name_seed) == init  # trainer.py: build_dictionary(seed=...)
        assert derive_seed(cfg.seed, name_seed, 7919) == resample  # trainer.py: _State.gen
        assert (
            TrainConfig.from_json(cfg.to_json()) == cfg
            and DictionarySpec.from_json(spec.to_json()) == spec
        )


# ---------------------------------------------------------------- schedules


def test_one_schedule_gives_the_trainers_old_values_exactly() -> None:
    for total, warmup, end in [(100, 10, 0.1), (700, 0, 0.0), (1000, 50, 0.05), (3, 5, 0.2)]:
        for step in range(total + 20):
            assert warmup_cosine(
                step, total=total, warmup=warmup, end_fraction=end
            ) == _old_trainer_lr(total, warmup, end, step)


def test_toy_schedule_is_the_old_one_exactly() -> None:
    from difract_ext.toy.train import TrainConfig, _lr_at

    for cfg in [
        TrainConfig(),
        TrainConfig(steps=1000, warmup=100, lr=1e-3, restart_steps=400),
        TrainConfig(steps=20, warmup=50, restart_steps=10),
    ]:
        for step in range(cfg.steps + cfg.restart_steps + 5):
            assert _lr_at(cfg, step) == _old_toy_lr(cfg, step)


# ---------------------------------------------------------------- configs


@dataclass
class _Inner:
    x: int = 1


@dataclass
class _Cfg:
    site: Site
    flag: bool = False
    n: int = 3
    lr: float = 1e-3
    maybe: int | None = None
    pair: tuple[float, float] = (0.9, 0.999)
    words: tuple[str, ...] = ("a", "b")
    seq: Sequence[int] = (0, 1)
    by_layer: dict[int, int] = field(default_factory=lambda: {0: 4})
    extra: dict[str, Any] = field(default_factory=dict)
    inner: _Inner = field(default_factory=_Inner)


def test_config_round_trip_and_json_form(tmp_path: Path) -> None:
    cfg = _Cfg(
        Site(3, "img"), flag=True, maybe=5, by_layer={2: 8}, extra={"a": [1, 2]}, inner=_Inner(7)
    )
    d = config_to_dict(cfg)
    assert d == {
        "site": "img_3",
        "flag": True,
        "n": 3,
        "lr": 1e-3,
        "maybe": 5,
        "pair": [0.9, 0.999],
        "words": ["a", "b"],
        "seq": [0, 1],
        "by_layer": {"2": 8},
        "extra": {"a": [1, 2]},
        "inner": {"x": 7},
    }
    assert config_from_dict(_Cfg, json.loads(json.dumps(d))) == _Cfg(
        Site(3, "img"),
        flag=True,
        maybe=5,
        by_layer={2: 8},
        extra={"a": [1, 2]},
        inner=_Inner(7),
        seq=[0, 1],
    )
    path = write_config(tmp_path / "c.json", cfg)
    assert read_config(_Cfg, path).site == Site(3, "img")
    assert config_from_dict(_Cfg, {"site": "txt_0", "lr": 1}).lr == 1.0  # an int is a fine float


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"site": "img_3", "flag": 1}, "c.json: flag: must be true or false, got 1"),
        ({"site": "img_3", "n": True}, "c.json: n: must be an integer, got True"),
        ({"site": "img_3", "n": 2.0}, "c.json: n: must be an integer, got 2.0"),
        ({"site": "img_3", "lr": "fast"}, "c.json: lr: must be a number"),
        ({"site": "img_3", "pair": [1.0]}, r"c.json: pair: must have 2 items, got 1"),
        ({"site": "img_3", "by_layer": {"a": 1}}, "c.json: by_layer: key 'a' must be an integer"),
        (
            {"site": "img_3", "inner": {"x": 1, "y": 2}},
            r"c.json: inner: unknown key\(s\) \['y'\] for _Inner",
        ),
        ({"site": "3:img"}, r"c.json: site: not a site: '3:img'; write a site as 'img_3'"),
        (
            {"site": "img_3", "colour": "red"},
            r"c.json: unknown key\(s\) \['colour'\] for _Cfg; known keys",
        ),
        ({"flag": True}, r"c.json: missing key\(s\) \['site'\] of _Cfg"),
    ],
)
def test_config_errors_name_the_file_and_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_Cfg, data, source="c.json")


def test_config_file_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match=r"bad.json: not valid JSON \(.* at line 1 column 2\)"):
        read_config(_Cfg, tmp_path / "bad.json")
    with pytest.raises(TypeError, match="needs a dataclass instance"):
        config_to_dict({"a": 1})


def test_project_configs_round_trip() -> None:
    from difract_ext.attribution.graph_meta import GraphMeta
    from difract_ext.capture.format import HarvestFormatError, ShardInfo
    from difract_ext.capture.harvest import HarvestConfig
    from difract_ext.flux.tiny import TinyFluxConfig
    from difract_ext.toy.train import TrainConfig as ShapesTrainConfig
    from difract_ext.training.specs import DictionarySpec, TrainConfig

    tiny = TinyFluxConfig(t5_local_offsets=(1, -1))
    assert TinyFluxConfig.from_dict(json.loads(json.dumps(tiny.to_dict()))) == tiny
    meta = GraphMeta(
        "p", 0, 1, 0.75, 4, 2, (2, 2), ["a", "b"], 2, 3, {0: 4, 1: 4}, ["x0"], height=32
    )
    assert GraphMeta.from_dict(json.loads(meta.to_json())) == meta
    spec = DictionarySpec(Site(1, "txt"), activation="topk", k=4)
    assert DictionarySpec.from_json(spec.to_json()) == DictionarySpec(
        Site(1, "txt"), activation="topk", k=4, name=spec.resolved_name
    )
    train = TrainConfig(betas=(0.8, 0.9), stop_after_steps=7)
    assert TrainConfig.from_json(json.loads(json.dumps(train.to_json()))) == train
    shapes = ShapesTrainConfig(steps=10)
    assert config_from_dict(ShapesTrainConfig, config_to_dict(shapes)) == shapes
    harvest = HarvestConfig([Site(0, "img"), (1, "txt")], seeds=[3, 4], call_kwargs={"height": 32})
    assert config_from_dict(HarvestConfig, config_to_dict(harvest)) == harvest
    shard = ShardInfo(
        "shards/c000000-000001.safetensors",
        (0, 1),
        ((0, 3), (1, 3)),
        {"img": 8},
        {"img": 8},
        (1.0,),
    )
    assert ShardInfo.from_json(json.loads(json.dumps(shard.to_json()))) == shard
    with pytest.raises(
        HarvestFormatError,
        match=r"manifest.rank0.json: shards\[2\]: rows\['img'\]: must be an integer",
    ):
        ShardInfo.from_json(
            {**shard.to_json(), "rows": {"img": "8"}}, "manifest.rank0.json: shards[2]"
        )


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_with_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.pt"
    atomic_write_with(path, lambda tmp: torch.save({"a": 1}, tmp))
    assert torch.load(path, weights_only=True) == {"a": 1}

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_with(path, broken)
    assert torch.load(path, weights_only=True) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.pt"]  # no temporary left behind

    import numpy as np

    npz = tmp_path / "images.npz"
    atomic_write_with(
        npz, lambda tmp: np.savez(tmp, a=np.arange(3)), keep_suffix=True
    )  # savez keeps the .npz name
    assert np.load(npz)["a"].tolist() == [0, 1, 2] and sorted(
        p.name for p in tmp_path.iterdir()
    ) == ["images.npz", "sub"]
