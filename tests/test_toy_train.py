"""Fine-tuning the shapes pipeline (``TrainConfig.init_from``): stage 2 of
scripts/reproduce_shapes.sh.

A few steps on a tiny render set: the VAE is taken over unchanged, the new text encoder carries
the requested word-order bias, snapshots and ``stop_at`` work, a second call resumes, and the
exported folder loads as a ``FluxPipeline`` with its training record.
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from difract_ext.flux.defaults import read_call_defaults  # noqa: E402
from difract_ext.toy import load_shapes_pipeline, shapes_call_defaults, shapes_pipeline_path  # noqa: E402
from difract_ext.toy.train import TrainConfig, export_pipeline, train_shapes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fine_tune_from_a_trained_pipeline_resumes_and_exports(tmp_path):
    base = load_shapes_pipeline()
    run = tmp_path / "ft"
    cfg = TrainConfig(
        init_from=str(shapes_pipeline_path()),
        t5_local_strength=0.5,
        n_images=48,
        batch=4,
        steps=6,
        warmup=1,
        eval_every=2,
        eval_prompts=1,
        eval_snapshots=True,
        stop_at=2,
        threads=1,
    )
    pipe = train_shapes(run, cfg)
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 2
    assert (run / "snapshots" / "ema_000002.pt").is_file()
    for k, v in base.vae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[k], v), k
    assert pipe.vae.config.scaling_factor == base.vae.config.scaling_factor
    bias = (
        pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    )
    assert sorted(bias.unique().tolist()) == [0.0, 0.5]
    moved = [
        k
        for k, v in base.transformer.state_dict().items()
        if not torch.equal(pipe.transformer.state_dict()[k], v)
    ]
    assert moved, "fine-tuning changed nothing"
    # resume: the same run, a later stop
    train_shapes(run, TrainConfig(**{**cfg.__dict__, "stop_at": 4}))
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 4
    out = export_pipeline(run, tmp_path / "export", run / "snapshots" / "ema_000002.pt")
    record = json.loads((out / "training.json").read_text())
    assert record["step"] == 2 and record["config"]["init_from"] == str(shapes_pipeline_path())
    assert read_call_defaults(out) == shapes_call_defaults()  # the export carries its call defaults
    assert read_call_defaults(run / "init") == shapes_call_defaults()
    loaded = load_shapes_pipeline(path=out)
    snap = torch.load(run / "snapshots" / "ema_000002.pt", weights_only=True)["ema"]
    for k, v in loaded.transformer.state_dict().items():
        assert torch.equal(v, snap[k]), k
