"""bench/compare.py, shortened: its table holds the numbers of the evaluations it ran, and it resumes."""
import json
import os

import pytest

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
