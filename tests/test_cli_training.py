"""`difract harvest / train / eval`: documented options and an end-to-end run on a tiny pipeline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from difract_ext.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["harvest", "train", "eval"])
def test_every_option_is_explained(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    sub = _subparsers()[command]
    assert sub.description and len(sub.description) > 80
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--resume" in capsys.readouterr().out or command == "eval"


def test_existing_commands_still_parse() -> None:
    args = build_parser().parse_args(["convert", "src", "dst", "--roles", "sae"])
    assert args.func.__name__ == "_cmd_convert" and args.roles == ["sae"]
    assert build_parser().parse_args(["demo"]).func.__name__ == "_cmd_demo"


def test_sites_are_written_stream_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.txt").write_text("a red circle\n")
    base = [
        "harvest",
        "--model",
        "tiny",
        "--prompts",
        str(tmp_path / "p.txt"),
        "--out",
        str(tmp_path / "h"),
        "--no-progress",
        "--sites",
    ]
    assert main([*base, "1:img"]) == 2
    assert "site '1:img': write it as img_1 (STREAM_LAYER)" in capsys.readouterr().err
    assert main([*base, "img_9"]) == 2
    assert "layer 9 does not exist" in capsys.readouterr().err
    assert not (tmp_path / "h" / "shards").exists()


def test_harvest_train_eval_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    words = [
        "a red circle",
        "the cat",
        "a big blue square",
        "dog on the left",
        "a small green triangle",
    ]
    (tmp_path / "train.txt").write_text(
        "\n".join(f"{a} and {b}" for a in words for b in words[:3]) + "\n"
    )
    (tmp_path / "held.txt").write_text("# held out\nthe purple dog at the top\nan orange circle\n")
    common = [
        "--model",
        "tiny",
        "--sites",
        "all",
        "--batch-size",
        "4",
        "--shard-rows",
        "1000",
        "--dtype",
        "float32",
        "--no-progress",
    ]
    assert (
        main(
            [
                "harvest",
                "--prompts",
                str(tmp_path / "train.txt"),
                "--out",
                str(tmp_path / "h"),
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "harvest",
                "--prompts",
                str(tmp_path / "held.txt"),
                "--out",
                str(tmp_path / "ho"),
                "--text-padding",
                "mask",
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "harvest",
                "--prompts",
                str(tmp_path / "held.txt"),
                "--out",
                str(tmp_path / "ho"),
                *common,
            ]
        )
        == 2
    )
    assert "--resume" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--data",
                str(tmp_path / "h"),
                "--out",
                str(tmp_path / "d"),
                "--sites",
                "img_0",
                "txt_1",
                "--roles",
                "transcoder",
                "sae",
                "--l1-img",
                "1e-4",
                "1e-3",
                "--l1-txt",
                "1e-4",
                "--expansion",
                "2",
                "--d-t-embed",
                "16",
                "--lr",
                "3e-3",
                "--batch-size",
                "256",
                "--epochs",
                "2",
                "--resample-every",
                "20",
                "--resample-min-rate",
                "1e-3",
                "--no-progress",
            ]
        )
        == 0
    )
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert len(index["dictionaries"]) == 2 * 2 + 2 * 1
    training = json.loads(
        (tmp_path / "d" / index["dictionaries"][0]["name"] / "training.json").read_text()
    )
    assert (
        training["config"]["resample_min_rate"] == 1e-3
        and training["config"]["resample_every"] == 20
    )
    assert (
        main(
            [
                "eval",
                "--dictionaries",
                str(tmp_path / "d"),
                "--data",
                str(tmp_path / "ho"),
                "--out",
                str(tmp_path / "e"),
                "--model",
                "tiny",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "splice all (2)" in out and "transcoders/img_0/relu_l1-1e-04_x2: EV" in out
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert [r["spliced"] for r in report["splice"]] == ["none", "img_0", "txt_1", "all (2)"]
    assert (tmp_path / "e" / "sparsity_faithfulness.png").is_file()
