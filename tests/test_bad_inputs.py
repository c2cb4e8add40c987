"""No silent wrong results (issue 17): corrupt weights, mistyped configs, unreadable files, bad
values and outputs that hold a user's files are refused with errors that name the file or
argument, or answered without deleting anything. One regression test per class, plus a small
hypothesis fuzz over the JSON and config loaders.

Each test uses the entry points that existed before the fix (``load_difract_checkpoint``,
``load_dictionary_dir``, ``SAE.load_from_disk``, ``HarvestReader``, ``load_dictionaries``,
``convert_difract_dir``, ``difract`` CLI), so it fails on the old behaviour: the old code loaded,
cast, trained or deleted silently, or raised a library error that named no file.
"""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from difract_reference import make_standin_state_dict, write_standin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sae_lens import SAE
from safetensors.torch import load_file, save_file

import difract_ext  # noqa: F401  (registers our SAELens architectures)
from difract_ext.adapters.checkpoints import (
    convert_difract_dir,
    load_dictionary_dir,
    load_difract_checkpoint,
)
from difract_ext.adapters.dictionaries import SAELENS_IO
from difract_ext.capture.format import HarvestReader
from difract_ext.capture.synthetic import write_harvest
from difract_ext.cli.main import main
from difract_ext.flux.sites import Site
from difract_ext.training import DictionarySpec, TrainConfig, load_dictionaries
from difract_ext.training.specs import build_dictionary

D, F, DT = 12, 40, 8  # d_model, d_sae, d_t_embed of the small dictionaries used here


# ---- helpers ----------------------------------------------------------------------------------


def _saelens_folder(root: Path) -> Path:
    """A trained-looking SAELens folder (cfg.json, sae_weights.safetensors, training.json)."""
    spec = DictionarySpec(Site(0, "img"), "transcoder", "relu", d_sae=F, d_t_embed=DT)
    module = build_dictionary(spec, D, io=SAELENS_IO, seed=3)
    path = root / spec.resolved_name
    path.mkdir(parents=True)
    SAELENS_IO.save(module, path)
    (path / "training.json").write_text(json.dumps({"spec": spec.to_json()}))
    return path


def _edit_cfg(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in changes.items():
        if key.startswith("metadata."):
            cfg["metadata"][key.split(".", 1)[1]] = value
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _edit_weights(folder: Path, **tensors: torch.Tensor) -> None:
    path = folder / "sae_weights.safetensors"
    sd = load_file(str(path))
    sd.update(tensors)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def _flip_byte_in_record(path: Path, record_suffix: str, offset: int = 17) -> None:
    """Flip one byte inside the data of the zip record whose name ends with ``record_suffix``."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(record_suffix))
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len = int.from_bytes(f.read(2), "little")
        extra_len = int.from_bytes(f.read(2), "little")
        pos = info.header_offset + 30 + name_len + extra_len + offset
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x40]))


def _pt_record_of(path: Path, key: str) -> str:
    """The zip record (``.../data/N``) of ``key``'s storage: torch.save numbers storages in the
    order it meets them (dict order; every tensor of a standin has its own storage)."""
    return f"data/{list(torch.load(path, weights_only=True)).index(key)}"


# ---- weights ----------------------------------------------------------------------------------


def test_pt_with_flipped_bytes_is_refused(tmp_path: Path) -> None:
    path = write_standin(tmp_path / "transcoder_img_3.pt", d_model=D, d_feat=F, d_t=DT)
    good = load_difract_checkpoint(path).W_enc.detach().clone()  # (a memory map of the file)
    _flip_byte_in_record(path, _pt_record_of(path, "encoder.weight"))
    with pytest.raises(difract_ext.CheckpointError, match=r"transcoder_img_3.pt: record .* CRC-32"):
        load_difract_checkpoint(path)
    # the flip was real: without the check the weights load, silently different
    bad = load_difract_checkpoint(path, verify=False)
    assert not torch.equal(bad.W_enc, good)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("encoder.weight", float("nan")),
        ("decoder.weight", float("nan")),
        ("mod_linear.bias", -math.inf),
    ],
)
def test_pt_with_nonfinite_weights_is_refused(tmp_path: Path, key: str, value: float) -> None:
    sd = make_standin_state_dict(D, F, DT)
    sd[key].view(-1)[5] = value  # decoder NaN: the unit-norm check used to pass it (nan > atol)
    path = tmp_path / "transcoder_img_1.pt"
    torch.save(sd, path)
    with pytest.raises(
        difract_ext.CheckpointError, match=rf"transcoder_img_1.pt: key '{key}' holds 1 NaN/inf"
    ):
        load_difract_checkpoint(path)


def test_saelens_folder_with_nan_weights_is_refused(tmp_path: Path) -> None:
    folder = _saelens_folder(tmp_path)
    w = load_file(str(folder / "sae_weights.safetensors"))["W_dec"]
    w[3, 4] = float("nan")
    _edit_weights(folder, W_dec=w)
    with pytest.raises(difract_ext.CheckpointError, match=r"sae_weights.safetensors: key 'W_dec'"):
        load_dictionary_dir(tmp_path, role="transcoder")
    with pytest.raises(ValueError, match=r"key 'W_dec' holds 1 NaN/inf .* index \[3, 4\]"):
        SAE.load_from_disk(str(folder))  # SAELens' own loader is covered too


def test_saelens_folder_with_int_weights_is_refused(tmp_path: Path) -> None:
    folder = _saelens_folder(tmp_path)
    w = load_file(str(folder / "sae_weights.safetensors"))["W_enc"]
    _edit_weights(folder, W_enc=(w * 100).to(torch.int32))
    with pytest.raises(
        difract_ext.CheckpointError, match=r"sae_weights.safetensors: tensor 'W_enc' has dtype I32"
    ):
        load_dictionary_dir(tmp_path)


def test_huge_declared_shape_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _saelens_folder(tmp_path)
    real = load_file(str(folder / "sae_weights.safetensors"))
    # a self-consistent header that declares W_enc [12, 2^22] float32 (192 MiB) on a sparse file
    header: dict[str, Any] = {}
    offset = 0
    shapes = {k: list(v.shape) for k, v in real.items()}
    shapes["W_enc"] = [D, 1 << 22]
    for key, shape in shapes.items():
        n = math.prod(shape) * 4
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    path = folder / "sae_weights.safetensors"
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)
    import difract_ext.adapters.dictionaries as dictionaries

    def no_reads(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tensor data was read before the declared shapes were checked")

    monkeypatch.setattr(dictionaries, "safe_open", no_reads, raising=False)
    with pytest.raises(
        difract_ext.CheckpointError,
        match=r"tensor 'W_enc' is declared F32 \[12, 4194304\], but cfg.json implies \[12, 40\]",
    ):
        load_dictionary_dir(tmp_path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"", "too short"),
        (b"\xff" * 8 + b"{}", "header claims"),
        ((20).to_bytes(8, "little") + b'{"W_enc": 3}' + b" " * 8, "header entry is not an object"),
    ],
)
def test_corrupt_safetensors_names_the_file(tmp_path: Path, content: bytes, pattern: str) -> None:
    folder = _saelens_folder(tmp_path)
    (folder / "sae_weights.safetensors").write_bytes(content)
    with pytest.raises(difract_ext.CheckpointError, match=rf"sae_weights.safetensors: .*{pattern}"):
        load_dictionary_dir(tmp_path)


# ---- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"t_embed_flip_sin_to_cos": "false"}, "t_embed_flip_sin_to_cos: must be true or false"),
        ({"d_sae": 40.0}, "d_sae: must be an integer"),
        ({"t_embed_max_period": float("nan")}, "t_embed_max_period: must be a finite number"),
        ({"trained_timesteps": ["0.5"]}, r"trained_timesteps\[0\]: must be a number"),
        ({"dtype": "int32"}, "dtype: must be one of|Invalid dtype: int32"),
        ({"metadata.layer": "x"}, "metadata.layer: must be a non-negative integer"),
        ({"metadata.stream": "audio"}, "metadata.stream: must be one of"),
        ({"metadata.hook_name": "transformer_blocks.0.ff.output"}, "does not fit a transcoder"),
        # SAE.load_from_disk drops d_out unseen; the metadata still gives the transcoder away
        (
            {"architecture": "difract_timestep_sae"},
            "d_out=12 is a transcoder's field|hook_name_out=.* only a transcoder has",
        ),
    ],
)
def test_mistyped_or_contradictory_cfg_is_refused(
    tmp_path: Path, change: dict[str, Any], pattern: str
) -> None:
    folder = _saelens_folder(tmp_path)
    _edit_cfg(folder, **change)
    with pytest.raises(difract_ext.CheckpointError, match=rf"cfg.json: .*({pattern})"):
        load_dictionary_dir(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        SAE.load_from_disk(str(folder))


def test_string_bool_would_have_changed_the_encoding(tmp_path: Path) -> None:
    """Why it matters: the typo flips the embedding, and the features change."""
    from difract_ext.adapters.dictionaries import TimestepTranscoder, TimestepTranscoderConfig

    folder = _saelens_folder(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    sd = load_file(str(folder / "sae_weights.safetensors"))
    sd["mod_linear.weight"] = torch.randn_like(sd["mod_linear.weight"])  # a non-trivial FiLM
    x = torch.randn(5, D)

    def encode(flip: bool) -> torch.Tensor:
        m = TimestepTranscoder(
            TimestepTranscoderConfig(**{**_fields(cfg), "t_embed_flip_sin_to_cos": flip})
        )
        m.load_state_dict(sd)
        with torch.no_grad():
            return m.encode(x, t=0.5)

    assert not torch.equal(encode(True), encode(False))


def _fields(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k != "architecture"}


def test_transcoder_cfg_without_d_out_is_refused(tmp_path: Path) -> None:
    folder = _saelens_folder(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["d_out"]  # SAELens would default it to 768
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(difract_ext.CheckpointError, match=r"missing key\(s\) \['d_out'\]"):
        load_dictionary_dir(tmp_path)


def test_two_dictionaries_for_one_site_are_refused(tmp_path: Path) -> None:
    a = _saelens_folder(tmp_path / "a")
    shutil.copytree(a, tmp_path / "b" / "copy")
    with pytest.raises(difract_ext.CheckpointError, match=r"several transcoders for one site"):
        load_dictionary_dir(tmp_path)
    pts = tmp_path / "pts"
    write_standin(pts / "transcoder_img_3.pt", d_model=D, d_feat=F, d_t=DT)
    write_standin(pts / "transcoder_img_03.pt", d_model=D, d_feat=F, d_t=DT, seed=1)
    with pytest.raises(difract_ext.CheckpointError, match=r"two files for transcoder img_3"):
        load_dictionary_dir(pts)


@pytest.mark.timeout(60)
def test_cfg_symlinked_to_dev_zero_is_refused_at_once(tmp_path: Path) -> None:
    folder = _saelens_folder(tmp_path)
    (folder / "cfg.json").unlink()
    (folder / "cfg.json").symlink_to("/dev/zero")
    with pytest.raises(difract_ext.CheckpointError, match=r"cfg.json: not a regular file"):
        load_dictionary_dir(tmp_path)


# ---- unclear errors ---------------------------------------------------------------------------


def _harvest(root: Path, n: int = 64, nan_row: int | None = None) -> Path:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    if nan_row is not None:
        y[nan_row, 2] = float("nan")
    t = torch.full((n,), 0.5)
    prompt = torch.arange(n) // 8
    return write_harvest(
        root, {Site(0, "img"): (x, y)}, {"img": t}, shard_rows=32, prompt={"img": prompt}
    )


@pytest.mark.parametrize(
    ("target", "load"),
    [
        ("harvest_config.json", lambda root: HarvestReader(root)),
        ("manifest.rank0.json", lambda root: HarvestReader(root)),
        (
            "dict/transcoders/img_0/relu_l1-3e-04_d40/training.json",
            lambda root: load_dictionaries(root / "dict", io=SAELENS_IO),
        ),
        (
            "dict/transcoders/img_0/relu_l1-3e-04_d40/cfg.json",
            lambda root: load_dictionary_dir(root / "dict"),
        ),
    ],
)
@pytest.mark.parametrize("content", ['{"sites": [1,}', "\udcff", "[1, 2]"])
def test_malformed_json_names_the_file(
    tmp_path: Path, target: str, load: Any, content: str
) -> None:
    _harvest(tmp_path)
    _saelens_folder(tmp_path / "dict")
    path = tmp_path / target
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(
        ValueError,
        match=rf"{path.name}: (not valid JSON \(.* line 1 column|not a |a .* must hold a JSON obj)",
    ):
        load(tmp_path)


@pytest.mark.parametrize(
    ("target", "drop", "load", "pattern"),
    [
        (
            "harvest_config.json",
            "sites",
            HarvestReader,
            r"harvest_config.json: missing key 'sites'",
        ),
        (
            "harvest_config.json",
            "d_model",
            HarvestReader,
            r"harvest_config.json: missing key 'd_model'",
        ),
        (
            "manifest.rank0.json",
            "shards",
            HarvestReader,
            r"manifest.rank0.json: missing key\(s\) \['shards'\]",
        ),
    ],
)
def test_missing_keys_are_named(
    tmp_path: Path, target: str, drop: str, load: Any, pattern: str
) -> None:
    root = _harvest(tmp_path / "h")
    data = json.loads((root / target).read_text())
    del data[drop]
    (root / target).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=pattern):
        load(root)


def test_missing_training_spec_is_named(tmp_path: Path) -> None:
    folder = _saelens_folder(tmp_path)
    (folder / "training.json").write_text("{}")
    with pytest.raises(ValueError, match=r"training.json: missing key\(s\) \['spec'\]"):
        load_dictionaries(tmp_path, io=SAELENS_IO)


def test_corrupt_shard_names_the_file(tmp_path: Path) -> None:
    root = _harvest(tmp_path)
    shard = next((root / "shards").glob("*.safetensors"))
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    reader = HarvestReader(root)
    with pytest.raises(ValueError, match=rf"{shard.name}: unreadable shard"):
        reader.site_rows(Site(0, "img"))


# ---- values -----------------------------------------------------------------------------------


def test_nan_row_in_a_harvest_is_located_and_refused(tmp_path: Path) -> None:
    root = _harvest(tmp_path / "h", nan_row=37)  # shard 1 (rows 32..63), row 5, prompt 4
    reader = HarvestReader(root)
    with pytest.raises(
        ValueError,
        match=r"c000001-000001.safetensors: img_0.y has 1 NaN/inf value\(s\) in 1 row\(s\); the "
        r"first is row 5 \(prompt 4, seed 0, step 0, pos 37\)",
    ):
        reader.site_rows(Site(0, "img"))
    spec = DictionarySpec(Site(0, "img"), d_sae=F, d_t_embed=DT)
    with pytest.raises(ValueError, match="NaN/inf"):
        difract_ext.training.train_dictionaries(
            root,
            [spec],
            tmp_path / "out",
            TrainConfig(batch_size=16, log_every=0),
            io=SAELENS_IO,
            progress=False,
        )
    assert not (tmp_path / "out" / spec.resolved_name).exists()


def test_diverged_dictionary_is_not_written(tmp_path: Path) -> None:
    spec = DictionarySpec(Site(0, "img"), d_sae=F, d_t_embed=DT)
    module = build_dictionary(spec, D, io=SAELENS_IO)
    with torch.no_grad():
        module.b_enc[0] = float("inf")
    with pytest.raises(ValueError, match="key 'b_enc' holds 1 NaN/inf"):
        SAELENS_IO.save(module, tmp_path)
    assert not any(tmp_path.iterdir())


BAD_CLI_VALUES = [
    (["train", "--d-sae", "0"], "--d-sae: must be an integer >= 1, got 0"),
    (["train", "--expansion", "0"], "--expansion: must be a finite number > 0, got 0.0"),
    (["train", "--k", "0"], "--k: must be an integer >= 1"),
    (["train", "--l1-img", "-0.001"], "--l1-img: must be a finite number >= 0"),
    (["train", "--l1-txt", "nan"], "--l1-txt: must be a finite number >= 0, got nan"),
    (["train", "--lr", "inf"], "--lr: must be a finite number > 0"),
    (["train", "--dead-window", "0"], "--dead-window: must be an integer >= 1"),
    (["train", "--stop-after-steps", "0"], "--stop-after-steps: must be an integer >= 1"),
    (["train", "--batch-size", "1.5"], "--batch-size: must be an integer, got '1.5'"),
    (
        ["train", "--resample-min-rate", "1"],
        "--resample-min-rate: must be a finite number >= 0 and < 1",
    ),
    (["harvest", "--height", "0"], "--height: must be an integer >= 1"),
    (["harvest", "--num-inference-steps", "0"], "--num-inference-steps: must be an integer >= 1"),
    (["harvest", "--device", "bogus"], "--device: 'bogus' is not a torch device"),
    (["harvest", "--commit-seconds", "-1"], "--commit-seconds: must be a finite number >= 0"),
    (["eval", "--device", "cuda:x"], "--device: 'cuda:x' is not a torch device"),
    (["eval", "--dense-threshold", "0"], "--dense-threshold: must be a finite number > 0 and <= 1"),
    (["attribute", "--edge-threshold", "nan"], "--edge-threshold: must be a finite number > 0"),
    (
        ["attribute", "--node-threshold", "1.5"],
        "--node-threshold: must be a finite number > 0 and <= 1",
    ),
    (["attribute", "--steps", "0"], "--steps: must be an integer >= 1"),
    (["attribute", "--max-feature-nodes", "0"], "--max-feature-nodes: must be an integer >= 1"),
    (["serve", "--port", "70000"], "--port: must be an integer >= 0 and <= 65535"),
    (["convert", "--norm-atol", "nan"], "--norm-atol: must be a finite number >= 0"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_CLI_VALUES)
def test_cli_refuses_bad_values(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"difract {argv[0]}: error: argument {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: TrainConfig(dead_window=0), "dead_window must be an integer >= 1, got 0"),
        (lambda: TrainConfig(stop_after_steps=0), "stop_after_steps must be an integer >= 1"),
        (lambda: TrainConfig(lr_end_fraction=float("nan")), "lr_end_fraction must be a finite"),
        (lambda: TrainConfig(betas=(0.9, 1.0)), r"betas\[1\] must be a finite number >= 0 and < 1"),
        (lambda: DictionarySpec(Site(0, "img"), d_sae=0), "d_sae must be an integer >= 1"),
        (lambda: DictionarySpec(Site(0, "img"), expansion_factor=0), "expansion_factor must be"),
        (lambda: DictionarySpec(Site(0, "img"), l1_coefficient=-1.0), "l1_coefficient must be"),
        (lambda: DictionarySpec(Site(0, "img"), l1_coefficient=math.nan), "l1_coefficient must be"),
        (lambda: DictionarySpec(Site(0, "img"), lr=0.0), "lr must be a finite number > 0"),
        (lambda: DictionarySpec(Site(0, "img"), d_t_embed=7), "d_t_embed must be even"),
        (
            lambda: DictionarySpec(Site(0, "img"), activation="topk", k=41, d_sae=40).width(D),
            "k=41 active features of only 40",
        ),
        (
            lambda: DictionarySpec(Site(0, "img"), expansion_factor=0.01).width(D),
            "gives 0 features",
        ),
    ],
)
def test_python_configs_refuse_bad_values(make: Any, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        make()


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        ({"height": 0}, r"call_kwargs\['height'\] must be an integer >= 1"),
        ({"num_inference_steps": 0}, r"call_kwargs\['num_inference_steps'\] must be"),
        ({"guidance_scale": math.nan}, r"call_kwargs\['guidance_scale'\] must be a finite"),
    ],
)
def test_harvest_config_refuses_bad_call_values(call: dict[str, Any], pattern: str) -> None:
    from difract_ext.capture import HarvestConfig

    with pytest.raises(ValueError, match=pattern):
        HarvestConfig(sites=[Site(0, "img")], call_kwargs=call)


# ---- files ------------------------------------------------------------------------------------


@pytest.fixture()
def release(tmp_path: Path) -> Path:
    src = tmp_path / "release"
    write_standin(src / "transcoder_img_0.pt", d_model=D, d_feat=F, d_t=DT)
    write_standin(src / "transcoder_txt_0.pt", d_model=D, d_feat=F, d_t=DT, seed=1)
    return src


def test_convert_never_deletes_a_users_files(release: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    mine = dst / "transcoders" / "img_0" / "my_notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    with pytest.raises(
        FileExistsError, match=r"not empty and was not written by `difract convert`"
    ):
        convert_difract_dir(release, dst)
    assert mine.read_text() == "mine" and sorted(dst.rglob("*")) == sorted(
        [dst / "transcoders", mine.parent, mine]
    )


def test_convert_replaces_only_its_own_files(release: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    convert_difract_dir(release, dst)
    notes = dst / "notes.txt"
    notes.write_text("mine")
    convert_difract_dir(release, dst)  # again: its own folders are replaced, notes.txt kept
    assert notes.read_text() == "mine"
    inside = dst / "transcoders" / "txt_0" / "extra.bin"
    inside.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"holds files this tool did not write \(extra.bin\)"):
        convert_difract_dir(release, dst)
    assert inside.read_bytes() == b"mine"
    assert (dst / "transcoders" / "img_0" / "cfg.json").is_file()  # nothing half-done
    manifest = json.loads((dst / "manifest.json").read_text())
    assert sorted(e["path"] for e in manifest["files"]) == [
        "transcoders/img_0",
        "transcoders/txt_0",
    ]


def test_save_model_never_deletes_a_users_files(tmp_path: Path) -> None:
    spec = DictionarySpec(Site(0, "img"), d_sae=F, d_t_embed=DT)
    module = build_dictionary(spec, D, io=SAELENS_IO)
    (tmp_path / "results.csv").write_text("mine")
    with pytest.raises(FileExistsError, match=r"results.csv"):
        module.save_model(tmp_path)
    assert (tmp_path / "results.csv").read_text() == "mine"
    module.save_model(tmp_path / "fresh")
    module.save_model(tmp_path / "fresh")  # its own files: replaced atomically
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]


def test_hidden_temporary_folder_is_not_a_dictionary(tmp_path: Path) -> None:
    folder = _saelens_folder(tmp_path)
    # what a kill inside the final atomic write leaves: a hidden, complete-looking sibling
    shutil.copytree(folder, folder.with_name(f".{folder.name}.tmp-4242-deadbeef"))
    found = load_dictionaries(tmp_path, io=SAELENS_IO)
    assert [d.name for d in found] == ["transcoders/img_0/relu_l1-3e-04_d40"]


# ---- the CLI's one-line errors -----------------------------------------------------------------


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _harvest(tmp_path / "h")
    (root / "harvest_config.json").write_text('{"format": ')
    argv = ["train", "--data", str(root), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("difract train: error: ") and "harvest_config.json: not valid JSON" in err
    with pytest.raises(ValueError, match="not valid JSON"):
        main(["--debug", *argv])
    with pytest.raises(ValueError, match="not valid JSON"):
        main([*argv, "--debug"])
    out_file = tmp_path / "a_file"
    out_file.write_text("x")
    release = tmp_path / "rel"
    write_standin(release / "transcoder_img_0.pt", d_model=D, d_feat=F, d_t=DT)
    assert main(["convert", str(release), str(out_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a_file exists and is not a folder" in err


# ---- fuzz -------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(raw=st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode()))
def test_fuzz_read_json_answers_only_with_named_errors(tmp_path: Path, raw: bytes) -> None:
    from difract_ext.util.files import BadFileError, read_json

    path = tmp_path / "fuzz.json"
    path.write_bytes(raw)
    try:
        data = read_json(path, required=["a"])
    except BadFileError as e:
        assert str(path) in str(e)
    else:
        assert isinstance(data, dict) and "a" in data


_TC_FIELDS = [
    "d_in",
    "d_sae",
    "d_out",
    "d_t_embed",
    "t_embed_max_period",
    "t_embed_flip_sin_to_cos",
    "activation",
    "k",
    "trained_timesteps",
    "dtype",
    "metadata.layer",
    "metadata.stream",
    "metadata.hook_name",
]


@FUZZ
@given(key=st.sampled_from(_TC_FIELDS), value=JSON)
def test_fuzz_transcoder_cfg_is_typed_or_refused(tmp_path: Path, key: str, value: Any) -> None:
    from difract_ext.adapters.dictionaries import FLOAT_DTYPES, TimestepTranscoderConfig

    base = dict(
        d_in=D,
        d_sae=F,
        d_out=D,
        d_t_embed=DT,
        architecture="difract_timestep_transcoder",
        metadata={"layer": 0, "stream": "img", "hook_name": "transformer_blocks.0.ff.input"},
    )
    if key.startswith("metadata."):
        base["metadata"] = {**base["metadata"], key.split(".", 1)[1]: value}
    else:
        base[key] = value
    try:
        cfg = TimestepTranscoderConfig.from_dict(base)
    except ValueError:
        return  # ConfigError or SAELens' own ValueError: refused with a message
    assert type(cfg.t_embed_flip_sin_to_cos) is bool
    for name in ("d_in", "d_sae", "d_out", "d_t_embed"):
        assert type(getattr(cfg, name)) is int and getattr(cfg, name) >= 1
    assert math.isfinite(cfg.t_embed_max_period) and cfg.dtype in FLOAT_DTYPES
    assert cfg.k is None  # relu: a k would have been refused
    assert cfg.trained_timesteps is None or all(
        type(v) is float and math.isfinite(v) for v in cfg.trained_timesteps
    )


@FUZZ
@given(key=st.sampled_from(["sites", "d_model", "prompts", "format"]), value=JSON)
def test_fuzz_harvest_config_is_checked_or_refused(tmp_path: Path, key: str, value: Any) -> None:
    from difract_ext.capture.format import HarvestFormatError

    root = tmp_path / "h"
    if not root.exists():
        _harvest(root)
    path = root / "harvest_config.json"
    original = path.read_text()
    data = json.loads(original)
    data[key] = value
    path.write_text(json.dumps(data))
    try:
        reader = HarvestReader(root)
    except HarvestFormatError as e:
        assert "harvest_config.json" in str(e)
    else:
        assert isinstance(reader.d_model, int) and all(isinstance(s, Site) for s in reader.sites)
    finally:
        path.write_text(original)


@FUZZ
@given(key=st.sampled_from(sorted(TrainConfig().to_json())), value=JSON)
def test_fuzz_train_config_is_checked_or_refused(key: str, value: Any) -> None:
    from difract_ext.util.config import ConfigError

    data = {**TrainConfig().to_json(), key: value}
    try:
        cfg = TrainConfig.from_json(data, "fuzz.json")
    except ConfigError as e:
        assert "fuzz.json" in str(e)
    else:
        assert cfg.batch_size >= 1 and cfg.dead_window >= 1 and math.isfinite(cfg.lr_end_fraction)
