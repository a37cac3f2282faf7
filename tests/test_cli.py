"""The command line: --help everywhere, synth -> validate -> split on real files, clear errors."""

from __future__ import annotations

import json

import pytest

from raysemi.cli import build_parser, main

COMMANDS = ["synth", "validate", "split", "train-teacher", "run", "train-baseline", "demo", "config",
            "predict", "evaluate", "suggest-labels", "tune"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: raysemi" in capsys.readouterr().out


def test_synth_validate_split(tmp_path, capsys):
    root = tmp_path / "cases"
    assert main(["synth", "--out", str(root), "--cases", "4", "--shape", "32", "32", "32", "--spacing", "2", "--seed", "1"]) == 0
    assert sorted(p.name for p in root.iterdir()) == [f"SYNTH_A_{i:05d}" for i in range(4)]
    assert main(["validate", str(root)]) == 0
    assert "4 cases checked, 0 with problems" in capsys.readouterr().out
    manifest = tmp_path / "manifest.json"
    assert main(["split", "--root", str(root), "--out", str(manifest), "--set", "data.labeled_fraction=0.5",
                 "--set", "data.validation_fraction=0.25"]) == 0
    split = json.loads(manifest.read_text())
    # 4 cases: 1 validation (round(0.25*4)), 2 labeled (round(0.5*3) half-up), 1 unlabeled with hidden truth
    assert (len(split["validation"]), len(split["labeled"]), len(split["unlabeled"])) == (1, 2, 1)
    assert split["hidden_truth"] == split["unlabeled"]

    (root / "SYNTH_A_00002" / "SYNTH_A_00002_t2.nii.gz").unlink()
    assert main(["validate", str(root)]) == 1
    out = capsys.readouterr().out
    assert "SYNTH_A_00002" in out and "t2" in out


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nowhere")]) == 2
    assert "raysemi validate: error:" in capsys.readouterr().err
    assert main(["config", "--set", "loss.tau_hgh=1"]) == 2
    assert "loss.tau_hgh: unknown key" in capsys.readouterr().err


def test_parser_lists_all_commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)
