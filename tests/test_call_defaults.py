"""A pipeline carries its own call defaults: one loader, one steps rule, trained-range warnings."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from diffusers import FluxPipeline

from difract_ext.flux.defaults import (
    CALL_DEFAULTS_FILE,
    CallDefaults,
    TrainedRangeWarning,
    call_defaults,
    default_num_inference_steps,
    read_call_defaults,
    resolve,
    write_call_defaults,
)
from difract_ext.flux.loading import find_call_defaults, load_pipeline
from difract_ext.flux.tiny import TinyFluxConfig, build_tiny_flux_pipeline
from difract_ext.replacement.inputs import capture_step_input
from difract_ext.toy import (
    SHAPES_CALL_DEFAULTS,
    load_shapes_pipeline,
    shapes_call_defaults,
    shapes_pipeline_path,
)

TRAINED = {
    "height": 32,
    "width": 32,
    "num_inference_steps": 4,
    "guidance_scale": 0.0,
    "max_sequence_length": 16,
}
PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def shapes() -> FluxPipeline:
    torch.set_num_threads(2)
    return load_shapes_pipeline()


@pytest.fixture(scope="module")
def tiny() -> FluxPipeline:
    return build_tiny_flux_pipeline(seed=0)


@contextlib.contextmanager
def no_range_warning() -> Iterator[None]:
    """Fail on any TrainedRangeWarning inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainedRangeWarning)
        yield


# ---- the file


def test_shipped_folder_records_what_the_model_was_trained_at() -> None:
    data = json.loads((shapes_pipeline_path() / CALL_DEFAULTS_FILE).read_text())
    assert data == {
        "format": "difract_call_defaults",
        "version": 1,
        **TRAINED,
        "trained_heights": [32],
        "trained_widths": [32],
        "trained_max_sequence_lengths": [16],
    }
    assert read_call_defaults(shapes_pipeline_path()) == shapes_call_defaults()
    assert SHAPES_CALL_DEFAULTS == TRAINED


def test_file_round_trips_and_refuses_bad_content(tmp_path: Path) -> None:
    d = CallDefaults(height=64, num_inference_steps=8, trained_heights=(64, 128))
    write_call_defaults(tmp_path, d)
    back = read_call_defaults(tmp_path)
    assert back == d and back.source == str(tmp_path / CALL_DEFAULTS_FILE)
    assert back.call_kwargs() == {"height": 64, "num_inference_steps": 8}
    assert read_call_defaults(tmp_path / "elsewhere") is None
    good = d.to_json()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hieght'\] for CallDefaults"):
        CallDefaults.from_json({**good, "hieght": 32})
    with pytest.raises(
        ValueError, match="expected format 'difract_call_defaults' version 1, got .* version 2"
    ):
        CallDefaults.from_json({**good, "version": 2})
    with pytest.raises(ValueError, match="call defaults: height: must be int or null, got '32'"):
        CallDefaults.from_json({**good, "height": "32"})
    with pytest.raises(ValueError, match="trained_widths: must be a list, got 32"):
        CallDefaults.from_json({**good, "trained_widths": 32})
    (tmp_path / CALL_DEFAULTS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_call_defaults(tmp_path)


# ---- the shipped pipeline, however it is loaded, resolves to its trained call


def test_every_way_of_loading_the_shipped_pipeline_resolves_to_its_trained_call(shapes) -> None:
    folder = shapes_pipeline_path()
    plain = FluxPipeline.from_pretrained(str(folder), local_files_only=True)
    ways = {
        "load_shapes_pipeline": shapes,
        "load_pipeline(folder)": load_pipeline(folder),
        "load_pipeline(str folder)": load_pipeline(str(folder)),
        "FluxPipeline.from_pretrained alone": plain,
        "FluxPipeline.from_pretrained + load_pipeline": load_pipeline(plain),
    }
    with no_range_warning():
        for name, pipe in ways.items():
            assert resolve(pipe) == TRAINED, name
            assert resolve(pipe, output_type="latent", height=None) == {
                **TRAINED,
                "output_type": "latent",
            }, name


@pytest.mark.parametrize("how", ["object", "folder"])
def test_flux_model_trace_runs_at_the_trained_call(shapes, how: str) -> None:
    from difract_ext.adapters.tracing import FluxModel

    flux = FluxModel(shapes if how == "object" else str(shapes_pipeline_path()))
    with no_range_warning():  # noqa: SIM117 - nnsight reads the trace block's own source
        with flux.trace(PROMPT, seed=0, output_type="latent") as tracer:
            ts = list().save()  # noqa: C408
            for _ in tracer.steps():
                ts.append(float(flux.timestep[0]))
                txt = flux.transformer.inputs[1]["encoder_hidden_states"].save()
            latents = tracer.result.save()
    assert ts == [1.0, 0.75, 0.5, 0.25]
    assert tuple(txt.shape) == (1, 16, 64)
    assert tuple(latents.images.shape) == (1, 64, 16)  # 8x8 packed patches of a 32x32 image


def test_capture_step_input_without_keywords_is_the_80_position_step(shapes) -> None:
    with no_range_warning():
        step = capture_step_input(shapes, PROMPT, step=1, seed=0)
    assert (step.n_img, step.n_txt, step.n_img + step.n_txt) == (64, 16, 80)
    assert (step.num_inference_steps, step.height, step.width, step.t) == (4, 32, 32, 0.75)
    assert len(step.text_tokens) == 16


# ---- leaving the trained range warns, with the fix


def test_a_call_outside_the_trained_size_warns_naming_it(shapes) -> None:
    with pytest.warns(
        TrainedRangeWarning,
        match=r"height=256 is outside .* \(height 32, per .*difract_call_defaults"
        r"\.json\): .*drop height= to use the trained 32",
    ) as rec:
        call = resolve(shapes, height=256)
    assert len(rec) == 1 and call == {**TRAINED, "height": 256}
    with pytest.warns(
        TrainedRangeWarning, match=r"max_sequence_length=32 .*max_sequence_length 16"
    ):
        resolve(shapes, max_sequence_length=32)
    with pytest.warns(TrainedRangeWarning) as rec:
        step = capture_step_input(shapes, PROMPT, step=0, seed=0, height=64, width=64)
    assert sorted(str(w.message).split("=")[0] for w in rec) == ["height", "width"]
    assert step.n_img == 256


# ---- real FLUX (no file): diffusers' defaults and the one steps rule


def test_a_pipeline_without_the_file_keeps_diffusers_defaults(tiny, tmp_path: Path) -> None:
    with no_range_warning():
        assert resolve(tiny) == {"num_inference_steps": 4}
        assert resolve(tiny, height=512, max_sequence_length=300) == {
            "num_inference_steps": 4,
            "height": 512,
            "max_sequence_length": 300,
        }
        assert call_defaults(tiny) == CallDefaults(num_inference_steps=4)
        tiny.save_pretrained(str(tmp_path / "tiny"))
        assert not (tmp_path / "tiny" / CALL_DEFAULTS_FILE).exists()
        assert resolve(load_pipeline(tmp_path / "tiny")) == {"num_inference_steps": 4}


def test_the_one_steps_rule() -> None:
    dev = build_tiny_flux_pipeline(TinyFluxConfig(guidance_embeds=True), seed=0)
    assert default_num_inference_steps(dev) == 28 and resolve(dev) == {"num_inference_steps": 28}
    fake = SimpleNamespace(
        transformer=SimpleNamespace(config=SimpleNamespace(guidance_embeds=False))
    )
    assert default_num_inference_steps(fake) == 4
    # a file may leave the steps to the rule
    assert resolve(dev, height=64)["num_inference_steps"] == 28


# ---- the loader's errors


def test_loader_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"missing model_index\.json.*save_pretrained\(\), or a Hub id"
    ):
        load_pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match="no pipeline at shapes"):
        load_pipeline("shapes")  # the CLI's name, not a path or a hub id
    with pytest.raises(TypeError, match="not int"):
        load_pipeline(3)
    with pytest.raises(ValueError, match="unknown dtype 'float33'"):
        load_pipeline(shapes_pipeline_path(), dtype="float33")
    assert find_call_defaults("nobody/no-such-flux") is None  # offline, not cached: no defaults


def test_shapes_folder_without_the_file_gets_the_shapes_defaults(shapes, tmp_path: Path) -> None:
    shapes.save_pretrained(str(tmp_path / "copy"))
    assert not (tmp_path / "copy" / CALL_DEFAULTS_FILE).exists()
    assert resolve(load_shapes_pipeline(path=tmp_path / "copy")) == TRAINED


# ---- the CLI


def test_cli_harvest_shapes_without_size_flags_runs_at_32(tmp_path: Path) -> None:
    from difract_ext.capture import HarvestReader
    from difract_ext.cli.main import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    out = tmp_path / "harvest"
    assert (
        main(
            [
                "harvest",
                "--model",
                "shapes",
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--sites",
                "img_0",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    reader = HarvestReader(out)
    assert reader.config["call_kwargs"] == TRAINED
    assert reader.n_rows("img") == 4 * 64  # 4 steps x 8x8 patches of a 32x32 image
