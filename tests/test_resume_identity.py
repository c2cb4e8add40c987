"""A resume refuses a changed identity (issue 17, "Resume", "Files"): another model or dtype for a
harvest, other data under the same shard names for training, a checkpoint whose fields do not fit
the run, journal entries outside the harvest folder or listed twice.

Each refusal is paired with the unchanged resume still working, so the checks cannot simply
refuse everything.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from difract_ext import SAELENS_IO
from difract_ext.capture import HarvestConfig, HarvestFormatError, HarvestReader, harvest
from difract_ext.capture.synthetic import synthetic_harvest
from difract_ext.cli.sources import load_pipeline
from difract_ext.flux.sites import Site
from difract_ext.training import DictionarySpec, TrainConfig, train_dictionaries
from difract_ext.training.trainer import CHECKPOINT
from difract_ext.util.digest import file_digest, module_digest

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle", "dog"]
IMG0 = Site(0, "img")


# ---- the digests ----------------------------------------------------------------------------


def test_module_digest_sees_one_changed_weight_and_dtype() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 7))
    same = copy.deepcopy(net)
    assert module_digest(net) == module_digest(same)
    with torch.no_grad():  # an element between the sampled ones: caught by the sums
        same[0].weight.view(-1)[12345] += 1e-3
    assert module_digest(net) != module_digest(same)
    assert module_digest(net) != module_digest(copy.deepcopy(net).to(torch.float64))


def test_file_digest_is_content_not_name(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(data)
    assert file_digest(tmp_path / "a") == file_digest(tmp_path / "b")
    changed = bytearray(data)
    changed[-1] ^= 0xFF  # the last byte lies in the last sampled block
    (tmp_path / "b").write_bytes(bytes(changed))
    assert file_digest(tmp_path / "a") != file_digest(tmp_path / "b")


# ---- harvest: another model or dtype --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> Any:
    return load_pipeline("tiny")


def _harvest(pipe: Any, tiny: Any, root: Path, resume: bool = False) -> Any:
    cfg = HarvestConfig(
        sites=[IMG0],
        seeds=[0],
        batch_size=2,
        shard_rows=100,
        dtype="float32",
        call_kwargs=tiny.call_kwargs,
        model_name=tiny.model_name,
    )
    return harvest(pipe, PROMPTS, root, cfg, resume=resume, progress=False)


def test_harvest_resume_refuses_another_model_or_dtype(tiny: Any, tmp_path: Path) -> None:
    root = tmp_path / "h"
    _harvest(tiny.pipe, tiny, root)
    other = copy.deepcopy(tiny.pipe)
    with torch.no_grad():
        other.transformer.proj_out.weight.mul_(1.01)
    with pytest.raises(HarvestFormatError, match="model_digest"):
        _harvest(other, tiny, root, resume=True)
    other = copy.deepcopy(tiny.pipe)
    other.transformer.to(torch.float64)
    with pytest.raises(HarvestFormatError, match="model_dtype"):
        _harvest(other, tiny, root, resume=True)
    assert _harvest(tiny.pipe, tiny, root, resume=True).complete  # the same model resumes


# ---- training: other data under the same names, a corrupt checkpoint ------------------------


SPECS = [DictionarySpec(IMG0, "transcoder", "relu", l1_coefficient=1e-3, d_sae=32, d_t_embed=16)]
CFG = TrainConfig(batch_size=256, epochs=2, mix_shards=1, log_every=0)


def _data(root: Path, row_seed: int | None) -> Path:
    kw = dict(sites=[IMG0], d_model=16, n_latents=32, threshold=1.0, n_rows=2048, shard_rows=1024)
    return synthetic_harvest(root, row_seed=row_seed, **kw)


def _stopped_run(tmp_path: Path) -> tuple[Path, Path]:
    data = _data(tmp_path / "data", None)
    out = tmp_path / "out"
    stop = TrainConfig(**{**CFG.to_json(), "stop_after_steps": 5})
    part = train_dictionaries(data, SPECS, out, stop, progress=False, io=SAELENS_IO)
    assert not part.finished and part.global_step == 5
    return data, out


def test_train_resume_refuses_other_data_under_the_same_names(tmp_path: Path) -> None:
    data, out = _stopped_run(tmp_path)
    other = _data(tmp_path / "other", 7)
    same_names = sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    assert same_names == sorted(p.relative_to(data) for p in data.rglob("*") if p.is_file())
    swapped = tmp_path / "swapped"
    shutil.copytree(other, swapped)
    with pytest.raises(ValueError, match="different specs, config or data"):
        train_dictionaries(swapped, SPECS, out, CFG, resume=True, progress=False, io=SAELENS_IO)
    done = train_dictionaries(data, SPECS, out, CFG, resume=True, progress=False, io=SAELENS_IO)
    assert done.finished


@pytest.mark.parametrize(
    ("field", "value"),
    [("global_step", 10**6), ("global_step", 4), ("batch", -1), ("group", 9), ("group", "0")],
)
def test_corrupt_checkpoint_field_is_refused(tmp_path: Path, field: str, value: Any) -> None:
    data, out = _stopped_run(tmp_path)
    ck = torch.load(out / CHECKPOINT, weights_only=True)
    ck[field] = value
    torch.save(ck, out / CHECKPOINT)
    with pytest.raises(ValueError, match=rf"is corrupt: fields .*{field}"):
        train_dictionaries(data, SPECS, out, CFG, resume=True, progress=False, io=SAELENS_IO)


def test_checkpoint_missing_a_dictionary_or_unreadable_is_refused(tmp_path: Path) -> None:
    data, out = _stopped_run(tmp_path)
    ck = torch.load(out / CHECKPOINT, weights_only=True)
    saved = dict(ck)
    ck["dictionaries"] = {}
    torch.save(ck, out / CHECKPOINT)
    with pytest.raises(ValueError, match="is corrupt: dictionaries"):
        train_dictionaries(data, SPECS, out, CFG, resume=True, progress=False, io=SAELENS_IO)
    (out / CHECKPOINT).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"trainer_state\.pt cannot be read"):
        train_dictionaries(data, SPECS, out, CFG, resume=True, progress=False, io=SAELENS_IO)
    torch.save(saved, out / CHECKPOINT)  # the intact checkpoint resumes
    done = train_dictionaries(data, SPECS, out, CFG, resume=True, progress=False, io=SAELENS_IO)
    assert done.finished


# ---- harvest journals: entries outside the folder, a shard or unit listed twice -------------


@pytest.mark.parametrize(
    "edit",
    [
        {"file": "../outside.safetensors"},
        {"file": "/etc/hostname"},
        {"file": "shards/../../outside.safetensors"},
        {"file": "shards/sub/x.safetensors"},
        {"chunks": []},
    ],
)
def test_journal_entry_outside_the_folder_is_refused(tiny: Any, tmp_path: Path, edit) -> None:
    root = tmp_path / "h"
    _harvest(tiny.pipe, tiny, root)
    journal = root / "manifest.rank0.json"
    data = json.loads(journal.read_text())
    data["shards"][0].update(edit)
    journal.write_text(json.dumps(data))
    with pytest.raises(HarvestFormatError, match="manifest.rank0.json: shards\\[0\\]"):
        HarvestReader(root)
    with pytest.raises(HarvestFormatError):
        _harvest(tiny.pipe, tiny, root, resume=True)


@pytest.mark.parametrize("what", ["file", "units"])
def test_journal_listing_a_shard_twice_is_refused(tiny: Any, tmp_path: Path, what: str) -> None:
    root = tmp_path / "h"
    _harvest(tiny.pipe, tiny, root)
    HarvestReader(root)  # intact: reads
    journal = root / "manifest.rank0.json"
    data = json.loads(journal.read_text())
    first = data["shards"][0]
    twin = dict(first, chunks=[max(c for s in data["shards"] for c in s["chunks"]) + 1])
    if what == "units":
        twin["file"] = "shards/copy.safetensors"
        shutil.copy(root / first["file"], root / twin["file"])
    data["shards"].append(twin)
    journal.write_text(json.dumps(data))
    with pytest.raises(HarvestFormatError, match="listed twice .*read twice"):
        HarvestReader(root)
