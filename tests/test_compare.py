"""bench/compare.py, shortened: its table holds the numbers of the evaluations it ran, and it resumes."""
import json
import os

import pytest
import torch

from helpers import run_script


def test_compare_reports_what_it_evaluated_and_resumes(tmp_path):
    argv = ("bench/compare.py", "--out", tmp_path / "cmp", "--data-path", tmp_path / "digits", "--cache-dir",
            tmp_path / "retrained", "--methods", "sfron", "ga", "--classes", 0, "--seeds", 0, "--no-tuning",
            "--steps", 4, "--eval-steps", 2, "--batch-size", 8, "--fisher-iters", 1, "--samples-per-class", 4,
            "--sampling-steps", 3, "--inversion-steps", 2, "--relearn-steps", 1)
    run_script(*argv, cwd=tmp_path)
    result = json.load(open(tmp_path / "cmp" / "comparison.json"))
    assert result["references"]["0"]["retrained_from"] == "shipped in assets/"
    assert sorted(r["method"] for r in result["runs"]) == ["ga", "sfron"]
    original_fd = result["references"]["0"]["original"]["fd_remain"]
    for run in result["runs"]:
        assert sorted(run["steps"]) == ["2", "4"] and "--ckpt-steps" in run["flags"]
        for step, report in run["steps"].items():
            row = result["summary"][run["method"]]["steps"][step]
            assert row["forget_acc"] == [pytest.approx(report["forget_acc"]), 0.0]  # one run: its own number
            assert row["fd_ratio"][0] == pytest.approx(report["fd_remain"] / original_fd)
            assert report["forget_acc"] * 4 == pytest.approx(round(report["forget_acc"] * 4))  # 4 forget samples
        final = run["steps"]["4"]  # the attacks ran on the final weights: 4 samples each
        assert {final["inversion_fa"] * 4, final["relearn_fa"] * 4} <= {0.0, 1.0, 2.0, 3.0, 4.0}
        row = result["summary"][run["method"]]["steps"]["4"]
        assert row["inversion_fa"][0] == pytest.approx(final["inversion_fa"])
    table = open(tmp_path / "cmp" / "comparison.md").read()
    assert "| sfron |" in table and "| ga |" in table and "FA after inversion" in table
    assert "after inversion" in table.split("| reference |")[1]  # the original's and the retrained model's
    for name in ("curves.png", "tradeoff.png"):
        assert os.path.getsize(tmp_path / "cmp" / name) > 0
    # started again with the same --out: every unit is read back, nothing is run again
    stamps = {f: os.path.getmtime(tmp_path / "cmp" / "evals" / f) for f in os.listdir(tmp_path / "cmp" / "evals")}
    run_script(*argv, cwd=tmp_path)
    assert {f: os.path.getmtime(tmp_path / "cmp" / "evals" / f) for f in stamps} == stamps
    assert json.load(open(tmp_path / "cmp" / "comparison.json"))["runs"] == result["runs"]


def test_compare_refuses_a_tuning_class_it_evaluates(tmp_path):
    proc = run_script("bench/compare.py", "--out", tmp_path / "cmp", "--classes", 0, 5, "--tuning-class", 5,
                      cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: --tuning-class 5")


def test_sfron_variants_checks_each_run_against_the_three_targets(tmp_path, monkeypatch):
    """bench/sfron_variants.py, shortened: every row holds its evaluation's numbers and the targets they miss."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import sfron_variants
    monkeypatch.chdir(tmp_path)
    argv = ["--name", "small-mask", "--lr", "1e-3", "--flags", "--threshold 5 --mask-remain-step", "--digits", "3",
            "--seeds", "0", "--steps", "2", "4", "--out", "out", "--data-path", "digits", "--cache-dir", "ret",
            "--batch-size", "8", "--fisher-iters", "1", "--samples-per-class", "4", "--sampling-steps", "3"]
    sfron_variants.main(sfron_variants.parse_args(argv))
    result = json.load(open(tmp_path / "out" / "variants-small-mask.json"))
    assert result["flags"][-3:] == ["--threshold", "5", "--mask-remain-step"]
    reference = json.load(open(tmp_path / "out" / "references" / "3.json"))
    run = json.load(open(tmp_path / "out" / "evals" / "small-mask-3-seed0-lr0.001.json"))
    assert "--mask-remain-step" in run["flags"] and os.path.isfile(tmp_path / "out" / "mask" / "seed0" / "3" /
                                                                    "fisher_5.0.pt")
    for row in result["rows"]:
        report = run["steps"][str(row["step"])]
        assert row["forget_acc"] == report["forget_acc"]
        assert row["fd_ratio"] == pytest.approx(report["fd_remain"] / reference["original"]["fd_remain"])
        expected = ("F" if report["forget_acc"] > reference["retrained"]["forget_acc"] + 0.03 else "") + \
                   ("R" if report["remain_acc"] < reference["original"]["remain_acc"] - 0.01 else "") + \
                   ("D" if row["fd_ratio"] > 1.2 else "")
        assert row["missed"] == expected
    table = open(tmp_path / "out" / "variants-small-mask.md").read()
    assert table.count("\n| small-mask | 3 | 0 |") == 2 and "small-mask, step 4: " in table
    with pytest.raises(sfron_variants.UserError, match="is a method of bench/compare.py"):
        sfron_variants.main(sfron_variants.parse_args(["--name", "ga", "--lr", "1e-3"]))


def test_all_digits_measures_both_recipes_against_the_targets(tmp_path, monkeypatch):
    """compare.py --all-digits, shortened: demo.py's two SFR-on recipes, each row traced to its run's flags and
    evaluation."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import compare
    import demo
    monkeypatch.chdir(tmp_path)
    argv = ["--all-digits", "--classes", "3", "--seeds", "0", "--steps", "4", "--eval-steps", "2", "--out", "out",
            "--data-path", "digits", "--cache-dir", "ret", "--batch-size", "8", "--fisher-iters", "1",
            "--samples-per-class", "4", "--sampling-steps", "3"]
    compare.main(compare.parse_args(argv))
    result = json.load(open(tmp_path / "out" / "all_digits.json"))
    assert [r["name"] for r in result["rows"]] == ["sfron-recommended"] * 2 + ["sfron-paper"] * 2
    reference = json.load(open(tmp_path / "out" / "references" / "3.json"))
    for recipe in demo.RECIPES:
        run = json.load(open(tmp_path / "out" / "evals" / f"sfron-{recipe}-3-seed0-lr{demo.RECIPES[recipe]['lr']}.json"))
        flags = run["flags"]
        assert flags[flags.index("--threshold") + 1] == str(demo.RECIPES[recipe]["threshold"])
        assert all(str(f) in flags for f in demo.RECIPES[recipe]["flags"])
        for row in (r for r in result["rows"] if r["name"] == f"sfron-{recipe}"):
            report = run["steps"][str(row["step"])]
            assert row["remain_acc"] == report["remain_acc"]
            assert row["missed"] == compare.targets_missed(report, reference)
    share = float(torch.tensor(0.05)), {"retrained": {"forget_acc": float(torch.tensor(0.02))}}  # float32 shares
    assert compare.is_forgotten({"forget_acc": share[0]}, share[1])  # 5 of 100 against 2 of 100: 3 points
    assert not compare.is_forgotten({"forget_acc": float(torch.tensor(0.06))}, share[1])
    table = open(tmp_path / "out" / "all_digits.md").read()
    assert "sfron-recommended, step 4: " in table and "sfron-paper, step 2: " in table
    # a unit evaluated at more steps than asked is read back; one whose recipe changed since is run again
    unit = tmp_path / "out" / "evals" / f"sfron-recommended-3-seed0-lr{demo.RECIPES['recommended']['lr']}.json"
    stamp = os.path.getmtime(unit)
    compare.main(compare.parse_args(argv[:argv.index("--eval-steps")] + argv[argv.index("--eval-steps") + 2:]))
    assert os.path.getmtime(unit) == stamp and "sfron-recommended, step 2" not in open(tmp_path / "out" /
                                                                                         "all_digits.md").read()
    monkeypatch.setitem(demo.RECIPES, "paper", {**demo.RECIPES["paper"],
                                                "flags": demo.RECIPES["paper"]["flags"] + ["--grad-clip", 0.5]})
    compare.main(compare.parse_args(argv + ["--recipes", "paper"]))
    rerun = json.load(open(tmp_path / "out" / "evals" / f"sfron-paper-3-seed0-lr{demo.RECIPES['paper']['lr']}.json"))
    assert rerun["flags"][-4:-2] == ["--grad-clip", "0.5"]


def test_label_dropout_benchmark_runs_both_settings(tmp_path, monkeypatch, capsys):
    """bench/label_dropout.py, shortened: one run per setting, each with its switch, each reported."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import label_dropout
    monkeypatch.chdir(tmp_path)
    label_dropout.main(label_dropout.parse_args([
        "--out", "out", "--seeds", "0", "--samples-per-class", "2", "--demo-flags",
        "--data-path digits --batch-size 8 --fisher-iters 1 --forget-iters 2 --sampling-steps 3"]))
    lines = capsys.readouterr().out.splitlines()
    reported = [line for line in lines if "seed 0: forget_acc" in line]
    assert len(reported) == 2 and sum(line.startswith("mean, label dropout") for line in lines) == 2
    for name, dropout in (("both-seed0", True), ("remain-only-seed0", False)):
        (run,) = os.listdir(tmp_path / "out" / "results" / name)
        settings = json.load(open(tmp_path / "out" / "results" / name / run / "run.json"))["settings"]
        assert settings["forget_label_dropout"] is dropout and settings["unlearn_loss"] == "ga"
