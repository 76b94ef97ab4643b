"""The pictures the documented commands write: each a readable PNG of the size its layout gives.

bench/compare.py --report-only: curves.png and tradeoff.png; attack.py: attack.png and samples.png. demo.py --attacks
(samples.png, losses.png, attacks/): tests/test_demo.py's shortened demo."""
import json
import math
import os
import shutil
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT, make_image_folder, run_in_process

ASSETS = os.path.join(ROOT, "assets")
DPI = 120  # of every matplotlib figure here: its pixels are its inches times 120


def png_size(path):
    """(width, height) of a PNG file, decoded whole."""
    with Image.open(path) as image:
        assert image.format == "PNG", path
        image.load()
        return image.size


def pixels(inches):
    """(width, height) in pixels of a figure of (width, height) inches."""
    return tuple(round(side * DPI) for side in inches)


def row_size(count, side, min_height=96, padding=2):
    """(width, height) of a row of `count` images of side `side` (grid_image), enlarged to at least min_height."""
    width, height = count * (side + padding) + padding, side + 2 * padding
    factor = max(1, math.ceil(min_height / height))
    return width * factor, height * factor


def stacked_size(sizes, band=14, gap=6):
    """(width, height) of sfron.sampling.stacked over images of these sizes, with titles."""
    return max(w for w, _ in sizes), sum(h + band for _, h in sizes) + gap * (len(sizes) - 1)


@pytest.fixture
def bench_modules(monkeypatch):
    """bench/compare.py and bench/report.py, imported as their command line imports them."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import compare
    import report
    return compare, report


def test_trade_summary_is_the_runs_against_their_references(bench_modules):
    """A point of the trade plot: the original's remain accuracy minus the run's, the run's forget accuracy after
    inversion minus the retrained model's; mean, min and max over the runs; a diverged run is left out."""
    _, report = bench_modules
    reference = {"original": {"remain_acc": 0.99, "forget_acc": 1.0, "inversion_fa": 1.0},
                 "retrained": {"remain_acc": 0.99, "forget_acc": 0.05, "inversion_fa": 0.2}}
    final = [{"remain_acc": 0.98, "forget_acc": 0.0, "inversion_fa": 0.5},
             {"remain_acc": 0.96, "forget_acc": 0.1, "inversion_fa": 0.3}]
    runs = [{"row": "a", "forget_class": 3, "steps": {"4": f}} for f in final]
    runs.append({"row": "a", "forget_class": 3, "steps": {"2": final[0]}})  # diverged before step 4
    result = {"protocol": {"steps": 4, "inversion_steps": 2}, "references": {"3": reference}, "runs": runs}
    trade = report.trade_summary(result)
    assert trade["step"] == 4 and trade["inversion_steps"] == 2
    point = trade["rows"]["a"]
    assert point["runs"] == 2 and point["diverged"] == 1
    assert point["remain_lost"] == pytest.approx([0.02, 0.01, 0.03])
    assert point["excess"] == pytest.approx([0.2, 0.1, 0.3])
    for run in runs:  # without the attacks: forget accuracy under the label above the retrained model's
        for f in run["steps"].values():
            f.pop("inversion_fa", None)
    trade = report.trade_summary(result)
    assert trade["inversion_steps"] is None and trade["rows"]["a"]["excess"] == pytest.approx([0.0, -0.05, 0.05])


def test_report_only_redraws_the_plots_from_comparison_json(tmp_path, bench_modules, capsys):
    """python bench/compare.py --report-only: the stored comparison's report again, running nothing (the table is
    the one the comparison wrote); tradeoff.png has one panel per dataset (--trade-panels adds one); a folder
    without comparison.json is one error line."""
    compare, report = bench_modules
    stored = os.path.join(ROOT, "docs", "comparison")
    (tmp_path / "digits").mkdir()
    shutil.copy(os.path.join(stored, "comparison.json"), tmp_path / "digits")
    shutil.copy(os.path.join(stored, "tuning.json"), tmp_path / "digits")
    compare.main(compare.parse_args(["--report-only", "--report-dir", str(tmp_path / "digits")]))
    for name in ("comparison.md", "tuning.md"):
        assert open(tmp_path / "digits" / name).read() == open(os.path.join(stored, name)).read()
    # the attack budgets the I and L targets were judged at are named in every table
    assert "| FA after 100 inversion steps | FA after 10 relearning steps |" in open(tmp_path / "digits" /
                                                                                   "comparison.md").read()
    assert "judged on the FA after 100 inversion steps and FA after 10 relearning steps" in \
        open(tmp_path / "digits" / "tuning.md").read()
    # each row's wall time against the official recipe's, from the runs' own seconds
    runs = json.load(open(tmp_path / "digits" / "comparison.json"))["runs"]
    seconds = {row: statistics.mean(r["seconds"] for r in runs if r["row"] == row) for row in ("sfron", "salun")}
    (line,) = [x for x in open(tmp_path / "digits" / "comparison.md").read().splitlines() if x.startswith("| salun |")]
    assert line.split(" | ")[10] == f"{seconds['salun'] / seconds['sfron']:.2f}x" != "1.00x"
    assert png_size(tmp_path / "digits" / "curves.png") == pixels((10, 3.8))
    assert png_size(tmp_path / "digits" / "tradeoff.png") == pixels(report.trade_size(1)) == pixels((9, 5))
    other = json.load(open(tmp_path / "digits" / "comparison.json"))
    other["protocol"]["dataset"] = "mnist"
    (tmp_path / "mnist").mkdir()
    json.dump(other, open(tmp_path / "mnist" / "comparison.json", "w"))
    compare.main(compare.parse_args(["--report-only", "--report-dir", str(tmp_path / "digits"), "--trade-panels",
                                     str(tmp_path / "mnist")]))
    assert png_size(tmp_path / "digits" / "tradeoff.png") == pixels(report.trade_size(2)) == pixels((15, 5))
    from cli import run_main
    with pytest.raises(SystemExit) as stop:
        run_main(compare.main, compare.parse_args(["--report-only", "--report-dir", str(tmp_path / "none")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1 and err[0].startswith("error: no comparison.json in ")
    assert not (tmp_path / "none").exists()


def attack_argv(tmp_path, out, *extra):
    """attack.py on the shipped digits DiT and its reference retrained without 0, tiny budgets."""
    return ["--model", "DiT-T/2", "--ckpt", os.path.join(ASSETS, "digits_dit.pt"),
            os.path.join(ASSETS, "digits_dit_without_0.pt"), "--names", "original", "retrained", "--data-path",
            tmp_path / "data", "--forget-class", 0, "--classifier", "digits", "--classifier-weights",
            os.path.join(ASSETS, "digits_classifier.pt"), "--images", 4, "--batch-size", 4, "--samples", 4,
            "--num-sampling-steps", 3, "--cfg-scale", 2.0, "--out", tmp_path / out, *extra]


def test_attack_pictures(tmp_path):
    """attack.png: a line per model against several budgets, a panel per attack; bars per model after one budget.
    samples.png: a row per model under its learned label, from the noise sample.py gives digits 0-9 (with no
    inversion step the learned label is the null label's embedding: the row is the model's unconditional draw); none
    without label inversion."""
    from sfron.build import ModelRequest, load_model_and_vae
    from sfron.sampling import SamplerConfig, generate, grid_image, per_sample_noise, upscale
    make_image_folder(tmp_path / "data", num_classes=10, per_class=4, size=(8, 8))
    run_in_process("attack.py", *attack_argv(tmp_path, "curves", "--inversion-steps", 0, 2, "--relearn-steps", 0, 1),
                   cwd=tmp_path, check=True)
    assert png_size(tmp_path / "curves" / "attack.png") == pixels((10, 3.6))  # two panels of 5 x 3.6 inches
    assert png_size(tmp_path / "curves" / "samples.png") == stacked_size([row_size(10, 8)] * 2) == (816, 226)
    run_in_process("attack.py", *attack_argv(tmp_path, "bars", "--attacks", "inversion", "--inversion-steps", 0),
                   cwd=tmp_path, check=True)
    assert png_size(tmp_path / "bars" / "attack.png") == pixels((3 + 2 * 1, 3.6))  # one group of bars
    model = load_model_and_vae(ModelRequest(model="DiT-T/2", ckpt=os.path.join(ASSETS, "digits_dit.pt")),
                               torch.device("cpu")).model
    z = per_sample_noise(0, range(10), (3, 8, 8), "cpu")
    expected = upscale(grid_image(generate(model, None, torch.full((10,), 10), z, SamplerConfig("ddim", 3, 2.0)), 10),
                       96)
    with Image.open(tmp_path / "bars" / "samples.png") as figure:
        first_row = np.asarray(figure.convert("RGB").crop((0, 14, expected.width, 14 + expected.height)))
    assert np.array_equal(first_row, np.asarray(expected))
    run_in_process("attack.py", *attack_argv(tmp_path, "relearn", "--attacks", "relearning", "--relearn-steps", 1),
                   cwd=tmp_path, check=True)
    assert png_size(tmp_path / "relearn" / "attack.png") == pixels((5, 3.6))
    assert not (tmp_path / "relearn" / "samples.png").exists()
