"""bench/compare.py, shortened: its table holds the numbers of the evaluations it ran, and it resumes."""
import json
import os
import re

import pytest
import torch

from helpers import run_script


def test_compare_reports_what_it_evaluated_and_resumes(tmp_path):
    argv = ("bench/compare.py", "--out", tmp_path / "cmp", "--report-dir", tmp_path / "report", "--data-path",
            tmp_path / "digits", "--cache-dir", tmp_path / "retrained", "--methods", "sfron", "ga", "--classes", 0,
            "--seeds", 0, "--tuning-classes", 5, "--no-tuning", "--steps", 4, "--eval-steps", 2, "--batch-size", 8,
            "--fisher-iters", 1, "--samples-per-class", 4, "--sampling-steps", 3, "--inversion-steps", 2,
            "--relearn-steps", 1)
    evals = tmp_path / "cmp" / "evals"
    # two shards share the held-out runs (one each) and write no report; the full run then computes nothing anew
    for shard in ("0/2", "1/2"):
        before = set(os.listdir(evals)) if evals.is_dir() else set()
        run_script(*argv, "--shard", shard, cwd=tmp_path)
        assert not (tmp_path / "report" / "comparison.json").exists()
        assert len([f for f in set(os.listdir(evals)) - before if f.endswith("-0-seed0.json")]) == 1, shard
    stamps = {f: os.path.getmtime(evals / f) for f in os.listdir(evals)}
    run_script(*argv, cwd=tmp_path)
    assert {f: os.path.getmtime(evals / f) for f in stamps} == stamps
    result = json.load(open(tmp_path / "report" / "comparison.json"))
    import demo
    more = demo.CASES["digits"].more_references(0)  # the second references shipped with another seed
    assert result["references"]["0"]["retrained_from"].startswith("shipped in assets/")
    assert result["references"]["0"].get("references", 1) == 1 + len(more)
    assert [r["row"] for r in result["runs"]] == ["ga", "sfron"]  # the protocol's order, not --methods'
    assert result["spread"]["seeds"] == 3 and len(set(result["spread"]["fd"])) == 3  # three sampling seeds differ
    original_fd = result["references"]["0"]["original"]["fd_remain"]
    for run in result["runs"]:
        assert sorted(run["steps"]) == ["2", "4"] and "--ckpt-steps" in run["flags"]
        # the shipped DiT recorded as assets/..., not as this clone's absolute path
        assert run["flags"][run["flags"].index("--ckpt") + 1] == os.path.join("assets", "digits_dit.pt")
        for step, report in run["steps"].items():
            row = result["summary"][run["row"]]["steps"][step]
            assert row["forget_acc"] == [pytest.approx(report["forget_acc"]), 0.0]  # one run: its own number
            assert row["fd_ratio"][0] == pytest.approx(report["fd_remain"] / original_fd)
            assert report["forget_acc"] * 4 == pytest.approx(round(report["forget_acc"] * 4))  # 4 forget samples
        final = run["steps"]["4"]  # the attacks ran on the final weights only, at the asked budgets
        assert "inversion_fa" in final and "inversion_fa" not in run["steps"]["2"]
        assert run["attacks"] == {"inversion_steps": 2, "relearn_steps": 1}
        assert run["evaluation"] == {"samples_per_class": 4, "sampling_steps": 3, "cfg_scale": 2.0}  # pinned
    table = open(tmp_path / "report" / "comparison.md").read()
    for run in result["runs"]:  # each method's line of the table holds its run's numbers at the last step
        final = run["steps"]["4"]
        line = next(line for line in table.splitlines() if line.startswith(f"| {run['row']} |"))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[1] == run["setting"] == result["chosen"][run["row"]]["name"]
        assert cells[2] == f"{final['forget_acc']:.3f} ± 0.000" and cells[3] == f"{final['remain_acc']:.3f} ± 0.000"
        assert cells[11:13] == [f"{final['inversion_fa']:.2f} ± 0.00", f"{final['relearn_fa']:.2f} ± 0.00"]
        official = next(r for r in result["runs"] if r["row"] == "sfron")["seconds"]
        assert cells[10] == f"{run['seconds'] / official:.2f}x"  # its wall time against the official recipe's
    reference = result["references"]["0"]
    assert f"after inversion {reference['retrained']['inversion_fa']:.2f}" in table.split("| reference |")[1]
    from PIL import Image
    for name, size in (("curves.png", (1200, 456)), ("tradeoff.png", (1080, 600))):  # 10 x 3.8 and 9 x 5 in, 120 dpi
        with Image.open(tmp_path / "report" / name) as image:
            assert (image.format, image.size) == ("PNG", size), name
    # started again with the same --out: every unit is read back, nothing is run again
    stamps = {f: os.path.getmtime(evals / f) for f in os.listdir(evals)}
    run_script(*argv, cwd=tmp_path)
    assert {f: os.path.getmtime(evals / f) for f in stamps} == stamps
    assert json.load(open(tmp_path / "report" / "comparison.json"))["runs"] == result["runs"]


def test_compare_tunes_every_method_on_its_grid_and_ablates_adversarial_esd_distill(tmp_path, monkeypatch):
    """The protocol end to end, shortened: each method tried on its whole grid on the tuning digit, the chosen
    configuration evaluated, UNO also at its own step count, a distilled baseline, and adversarial-esd-distill with
    each piece removed in turn (the mask's removal runs without a mask)."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import compare
    from protocol import ABLATIONS, CONFIGURATIONS, UNO_OWN_STEPS
    monkeypatch.chdir(tmp_path)
    argv = ["--out", "cmp", "--report-dir", "report", "--data-path", "digits", "--cache-dir", "ret", "--methods",
            "sfron-adversarial", "uno", "ft+distill", "--classes", "0", "--seeds", "0", "--tuning-classes", "5",
            "--steps", "2", "--eval-steps", "1", "--batch-size", "8", "--fisher-iters", "1", "--samples-per-class",
            "2", "--sampling-steps", "2", "--no-attacks", "--threads", "1"]
    compare.main(compare.parse_args(argv))
    result = json.load(open(tmp_path / "report" / "comparison.json"))
    for method in ("sfron-adversarial", "uno", "ft+distill"):
        grid = [c["name"] for c in result["grids"][method]]
        assert len(grid) == CONFIGURATIONS and sorted(result["tuning"][method]) == sorted(grid)
        assert all(list(trial) == ["5"] for trial in result["tuning"][method].values())
        assert result["chosen"][method]["name"] in grid
    rows = {r["row"]: r for r in result["runs"]}
    assert sorted(rows["uno"]["steps"], key=int) == ["1", "2", str(UNO_OWN_STEPS)]
    assert "--remain-loss" in rows["ft+distill"]["flags"] and "distill" in rows["ft+distill"]["flags"]
    ablated = [row for row in rows if row.startswith("sfron-adversarial, ")]
    assert len(ablated) == len(ABLATIONS)
    for row, extra in ABLATIONS.items():
        flags = rows[f"sfron-adversarial, {row}"]["flags"]
        assert ("--mask-path" in flags) == ("--no-mask" not in extra)
        assert all(f in flags for f in extra if f != "--no-mask")
    table = open(tmp_path / "report" / "comparison.md").read()
    assert f"| uno (step {UNO_OWN_STEPS}) |" in table and "| sfron-adversarial, no mask (gamma 0) |" in table
    tuning = open(tmp_path / "report" / "tuning.md").read().splitlines()
    assert tuning[0].endswith("Retrained references judged against: digit 5: 2.")  # assets/ ships two for digit 5
    for method in ("sfron-adversarial", "uno", "ft+distill"):  # one line per configuration, the chosen one marked
        mine = [line for line in tuning if line.startswith(f"| {method} |")]
        assert len(mine) == CONFIGURATIONS
        assert [line.split(" | ")[1] for line in mine if "**chosen**" in line] == [result["chosen"][method]["name"]]


def test_compare_refuses_a_tuning_class_it_evaluates(tmp_path):
    proc = run_script("bench/compare.py", "--out", tmp_path / "cmp", "--classes", 0, 5, "--tuning-classes", 5, 7,
                      cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == \
        "error: --tuning-classes 5 must not be among the evaluated --classes"


def test_sfron_variants_checks_each_run_against_the_three_targets(tmp_path, monkeypatch):
    """bench/sfron_variants.py, shortened: every row holds its evaluation's numbers and the targets they miss."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import sfron_variants
    monkeypatch.chdir(tmp_path)
    argv = ["--name", "small-mask", "--lr", "1e-3", "--flags", "--threshold 5 --mask-remain-step", "--digits", "3",
            "--seeds", "0", "--steps", "2", "4", "--out", "out", "--data-path", "digits", "--cache-dir", "ret",
            "--batch-size", "8", "--fisher-iters", "1", "--samples-per-class", "4", "--sampling-steps", "3",
            "--no-attacks"]
    sfron_variants.main(sfron_variants.parse_args(argv))
    result = json.load(open(tmp_path / "out" / "variants-small-mask.json"))
    assert result["flags"][-3:] == ["--threshold", "5", "--mask-remain-step"]
    reference = json.load(open(tmp_path / "out" / "references" / "3.json"))
    run = json.load(open(tmp_path / "out" / "evals" / "small-mask-lr0.001-3-seed0.json"))
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
    # a setting trains in the mask its flags ask for: SalUn's gradient mask where its recipe or a flag sets a sparsity
    kinds = {(): "fisher", ("--recipe", "salun-distill"): "gradient", ("--sparsity", "0.8"): "gradient",
             ("--recipe", "adversarial-esd-distill", "--threshold", "2"): "fisher"}
    assert {flags: sfron_variants.compare.mask_kind(list(flags)) for flags in kinds} == kinds


def test_all_digits_measures_both_recipes_against_the_targets(tmp_path, monkeypatch):
    """compare.py --all-digits, shortened: forget.py's two recipes as demo.py runs them, each row traced to its run's
    flags, resolved settings and evaluation."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import compare
    import demo
    from sfron.recipes import RECIPES
    from sfron.targets import is_forgotten
    monkeypatch.chdir(tmp_path)
    argv = ["--all-digits", "--classes", "3", "--seeds", "0", "--steps", "4", "--eval-steps", "2", "--out", "out",
            "--data-path", "digits", "--cache-dir", "ret", "--batch-size", "8", "--fisher-iters", "1",
            "--samples-per-class", "4", "--sampling-steps", "3", "--inversion-steps", "2", "--relearn-steps", "2",
            "--recipes", "official", "salun-distill"]
    compare.main(compare.parse_args(argv))
    result = json.load(open(tmp_path / "out" / "all_digits.json"))
    assert [r["name"] for r in result["rows"]] == ["sfron-official"] * 2 + ["sfron-salun-distill"] * 2
    assert [r["targets"] for r in result["rows"]] == ["FRD", "FRDIL"] * 2  # the attacks ran on the last step's
    # the five targets: a row misses I or L when its attack forget accuracy is more than 0.10 above the retrained's
    ref = {"original": {"remain_acc": 0.99, "fd_remain": 10.0},
           "retrained": {"forget_acc": 0.0, "inversion_fa": 0.2, "relearn_fa": 0.5}}
    report = {"forget_acc": 0.0, "remain_acc": 0.99, "fd_remain": 10.0, "inversion_fa": 0.3, "relearn_fa": 0.61}
    assert compare.targets_missed(report, ref) == "L"
    assert compare.targets_missed(dict(report, inversion_fa=0.31, relearn_fa=0.6), ref) == "I"
    reference = json.load(open(tmp_path / "out" / "references" / "3.json"))

    def unit(recipe):
        lr = demo.recipe_value(demo.parse_args(["--recipe", recipe]), "lr")
        return tmp_path / "out" / "evals" / f"sfron-{recipe}-lr{lr}-3-seed0.json"
    for recipe in ("official", "salun-distill"):
        run = json.load(open(unit(recipe)))
        flags, settings = run["flags"], run["settings"]
        assert flags[flags.index("--recipe") + 1] == recipe
        assert settings["forget"]["unlearn_loss"] == RECIPES[recipe].values["unlearn_loss"]
        assert settings["step"]["lr"] == {"official": 1.5e-4, "salun-distill": 4.5e-4}[recipe]
        for row in (r for r in result["rows"] if r["name"] == f"sfron-{recipe}"):
            report = run["steps"][str(row["step"])]
            assert row["remain_acc"] == report["remain_acc"]
            assert row["missed"] == compare.targets_missed(report, reference)
    # each recipe's own mask: official's Fisher mask at its threshold, salun-distill's SalUn gradient mask
    for recipe, mask in (("official", "fisher_1.0.pt"), ("salun-distill", "gradient_0.5.pt")):
        log = open(tmp_path / "out" / "logs" / (unit(recipe).stem + ".txt")).read()
        assert re.search(rf"Saliency mask \S*{re.escape(os.path.join('mask', 'seed0', '3', mask))}:", log), recipe
    share = float(torch.tensor(0.05)), {"retrained": {"forget_acc": float(torch.tensor(0.02))}}  # float32 shares
    assert is_forgotten({"forget_acc": share[0]}, share[1])  # 5 of 100 against 2 of 100: 3 points
    assert not is_forgotten({"forget_acc": float(torch.tensor(0.06))}, share[1])
    table = open(tmp_path / "out" / "all_digits.md").read()
    assert "sfron-official, step 4: " in table and "sfron-salun-distill, step 2: " in table
    assert "runs meet all 5 targets (F R D I L)" in table and "runs meet all 3 targets (F R D)" in table
    assert "| FA after 2 inversion steps (retrained) | FA after 2 relearning steps (retrained) |" in table
    # a unit evaluated at more steps than asked is read back; one whose recipe changed since is run again
    stamp = os.path.getmtime(unit("salun-distill"))
    compare.main(compare.parse_args(argv[:argv.index("--eval-steps")] + argv[argv.index("--eval-steps") + 2:]))
    assert os.path.getmtime(unit("salun-distill")) == stamp
    assert "sfron-salun-distill, step 2" not in open(tmp_path / "out" / "all_digits.md").read()
    changed = RECIPES["official"]
    monkeypatch.setitem(RECIPES, "official", type(changed)(changed.name, changed.summary,
                                                           {**changed.values, "grad_clip": 0.5}))
    compare.main(compare.parse_args(argv[:-3] + ["--recipes", "official"]))
    assert json.load(open(unit("official")))["settings"]["step"]["grad_clip"] == 0.5


def test_tuning_picks_by_the_stated_criterion_on_every_tuning_digit(monkeypatch):
    """choose_setting: the configuration missing the fewest targets summed over the tuning digits (seed 0, last
    step), ties broken by the mean remain distance ratio; --no-tuning: the base configuration, untried."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import compare
    from protocol import METHODS
    reference = {"original": {"fd_remain": 10.0, "remain_acc": 1.0}, "retrained": {"forget_acc": 0.02}}
    base, third, triple, knob = METHODS["esd"].configurations()

    class Bench:
        def __init__(self, reports):
            self.reports, self.asked = reports, []

        def reference(self, digit):
            return reference

        def run(self, setting, digit, seed, steps):
            self.asked.append((setting.name, digit, seed, tuple(steps)))
            return {"steps": {str(steps[-1]): self.reports[setting.name][digit]}}
    good, forgets_not = {"forget_acc": 0.0, "remain_acc": 1.0}, {"forget_acc": 0.5, "remain_acc": 1.0}
    reports = {base.name: {2: dict(good, fd_remain=11.0), 7: dict(good, fd_remain=11.0)},
               third.name: {2: dict(good, fd_remain=9.0), 7: dict(forgets_not, fd_remain=9.0)},   # misses F on 7
               triple.name: {2: dict(good, fd_remain=10.0), 7: dict(good, fd_remain=10.5)},     # all met, closest
               knob.name: {2: dict(good, fd_remain=13.0), 7: dict(good, fd_remain=30.0)}}       # misses D on 7
    bench, args = Bench(reports), compare.parse_args(["--steps", "50"])
    chosen, trials = compare.choose_setting(bench, METHODS["esd"], args)
    assert chosen == triple and trials[third.name][7]["missed"] == "F" and trials[knob.name][7]["missed"] == "D"
    assert sorted(bench.asked) == sorted((c.name, d, 0, (50,)) for c in (base, third, triple, knob) for d in (2, 7))
    args.no_tuning = True
    assert compare.choose_setting(Bench({}), METHODS["esd"], args) == (base, {})


def test_every_method_gets_the_same_number_of_configurations():
    """The protocol's grids: CONFIGURATIONS each; the base first; the others differ from it in the rate or in the
    method's one knob only; the distilled baselines add the distilled remain term and nothing else."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from protocol import CONFIGURATIONS, DISTILLED, METHODS
    names = set(METHODS)
    assert {"ga", "ft", "rl", "salun", "sa", "esd", "uno", "sfron", "sfron-adversarial"} < names and len(DISTILLED) == 4
    for method in METHODS.values():
        grid = method.configurations()
        assert len(grid) == CONFIGURATIONS == len({c.name for c in grid}) == len({c.flags for c in grid})
        base = grid[0].flags
        for config in grid[1:]:
            changed = [i for i, (a, b) in enumerate(zip(base, config.flags)) if a != b]
            extra = config.flags[len(base):]
            assert (changed and not extra) or (not changed and len(extra) == 2 and extra[0] == method.knob[0])
            assert all(config.flags[i - 1] in ("--lr", "--remain-lr") for i in changed)
    for method in DISTILLED:
        parent = METHODS[method.name.split("+")[0]]
        assert method.flags == parent.flags + ("--remain-loss", "distill") and method.knob == parent.knob


def test_each_dataset_keeps_its_own_working_folder_and_report(monkeypatch):
    """--dataset mnist without --out or --report-dir never writes over the digits' comparison, nor --all-digits (the
    same unit names at another protocol) over either; given ones win."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import compare
    digits, mnist = compare.parse_args([]), compare.parse_args(["--dataset", "mnist"])
    assert (digits.out, digits.report_dir) == ("bench_results/compare", "docs/comparison")
    assert (mnist.out, mnist.report_dir) == ("bench_results/compare_mnist", "docs/comparison_mnist")
    assert compare.parse_args(["--all-digits"]).out == "bench_results/all_digits"
    assert compare.parse_args(["--all-digits", "--dataset", "mnist"]).out == "bench_results/all_digits_mnist"
    given = compare.parse_args(["--dataset", "mnist", "--out", "o", "--report-dir", "r"])
    assert (given.out, given.report_dir) == ("o", "r")


def test_the_default_row_runs_every_held_out_digit_and_seed(monkeypatch):
    """plan(): salun+distill, the row of demo.py's default recipe, runs on every held-out digit and seed like the
    main methods; the other distilled baselines on the first --few-classes digits, first seed; the report names it."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import compare
    import report
    from protocol import DEFAULT_ROW, METHODS
    assert DEFAULT_ROW == "salun+distill"
    args = compare.parse_args(["--classes", "0", "3", "5", "--seeds", "0", "1", "--few-classes", "1"])
    chosen = {name: METHODS[name].configurations()[0] for name in ("salun", "salun+distill", "ft+distill")}
    units = {row: (digits, seeds) for row, _, digits, seeds in compare.plan(chosen, args)}
    assert units == {"salun": ([0, 3, 5], [0, 1]), "salun+distill": ([0, 3, 5], [0, 1]), "ft+distill": ([0], [0])}
    def names(default_setting):
        """The table's row names where the default's row chose default_setting."""
        summary = {row: {"steps": {100: dict.fromkeys(("forget_acc", "remain_acc", "fd_ratio", "fd_to_retrained",
                                                       "inversion_fa", "relearn_fa"))}, "runs": 1, "setting": setting,
                         "forgotten_runs": 0, "steps_to_forget": None, "runs_meeting_targets": 0, "seconds": [1.0, 0]}
                   for row, setting in (("salun", "salun-lr0.00045"), ("salun+distill", default_setting))}
        table = report.markdown(summary, {}, {"steps": 100}, {"seeds": 3, "relative": 0.01})
        return [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| salun")]
    assert names("salun+distill-lr0.00045") == ["| salun", "| salun+distill (the default: `--recipe salun-distill`)"]
    # another dataset's tuning chose another rate: the row is the default's method, not the default
    assert names("salun+distill-lr0.00015")[1] == \
        "| salun+distill (the default's method, tuned here; `--recipe salun-distill` is its lr 0.00045)"


def test_a_saved_run_counts_as_the_same_only_if_its_settings_are(monkeypatch):
    """covers(): a saved unit is read back when its settings equal the resolved ones, a field added since counting
    only while it holds its default; any other difference (here the recipe's adversary) makes it another run."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import compare
    flags = ["--model", "DiT-T/2", "--data-path", "d", "--forget-class", "4", "--ckpt-steps", "50", "100",
             "--recipe", "masked-esd-distill"]
    settings = compare.resolved_settings(flags)
    saved = {"flags": flags, "settings": settings, "steps": {"50": {}, "100": {}}}
    assert compare.covers(saved, flags, [50, 100]) and not compare.covers(saved, flags, [50, 100, 150])
    older = json.loads(json.dumps(saved))  # saved before --adversarial-steps and --remain-projection existed
    del older["settings"]["forget"]["adversarial_steps"], older["settings"]["step"]["remain_projection"]
    assert compare.covers(older, flags, [100])
    adversarial = [*flags[:-1], "adversarial-esd-distill"]
    assert not compare.covers({**older, "flags": adversarial}, adversarial, [100])
    changed = json.loads(json.dumps(saved))
    changed["settings"]["step"]["remain_lr"] = 1e-3
    assert not compare.covers(changed, flags, [100])


def test_a_diverged_run_is_a_result_not_a_crash(tmp_path, monkeypatch):
    """A run stopped by a non-finite loss is recorded (diverged_at, its checkpoints before the divergence
    evaluated), read back as it is, and counted in the table as a run that misses the targets."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import compare
    from protocol import METHODS
    from report import markdown, summarise
    monkeypatch.chdir(tmp_path)
    args = compare.parse_args(["--out", "cmp", "--data-path", "digits", "--cache-dir", "ret", "--classes", "0",
                               "--seeds", "0", "--tuning-classes", "5", "--batch-size", "8", "--samples-per-class",
                               "2", "--sampling-steps", "2", "--no-attacks", "--threads", "1"])
    compare.quiet(compare.call, compare.prepare_digits, ["--dataset", "digits", "--out", args.data_path])
    bench = compare.Benchmark(args)
    ascent = METHODS["ga"].setting(1e30)  # every weight moves by the rate at the first step
    run = bench.run(ascent, 0, 0, [1, 4])
    assert run["diverged_at"] == 2 and sorted(run["steps"]) == ["1"]  # the second step's loss is not finite
    saved = os.path.getmtime(tmp_path / "cmp" / "evals" / f"{ascent.name}-0-seed0.json")
    assert bench.run(ascent, 0, 0, [1, 4]) == run  # read back, not run again
    assert os.path.getmtime(tmp_path / "cmp" / "evals" / f"{ascent.name}-0-seed0.json") == saved
    summary = summarise([{"row": "ga", **run}], {0: bench.reference(0)})
    assert summary["ga"]["diverged_runs"] == 1 and summary["ga"]["runs_meeting_targets"] == 0
    protocol = {"steps": 4, "attacks": True, "inversion_steps": 7, "relearn_steps": 3}
    table = markdown(summary, {0: bench.reference(0)}, protocol, {"seeds": 3, "relative": 0.01})
    assert "| ga (1 of 1 runs diverged: figures over the rest) |" in table
    assert "| FA after 7 inversion steps | FA after 3 relearning steps |" in table  # the budgets, named
    assert "| FA after inversion | FA after relearning |" in markdown(summary, {}, dict(protocol, attacks=False),
                                                                     {"seeds": 3, "relative": 0.01})


def test_references_are_judged_by_their_mean_and_reported_with_their_range(tmp_path, monkeypatch):
    """With a second retrained reference for a digit, a reference's figures are the mean over both models and its
    range their [min, max]; the targets read the mean."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import compare
    import demo
    from sfron.targets import targets_missed
    second = os.path.join(demo.ASSETS, "digits_dit_without_1.pt")  # draws digit 0 well: far from the first
    monkeypatch.setattr(demo.EmbeddedCase, "more_references", lambda self, c: [second])
    import prepare_digits
    prepare_digits.main(prepare_digits.parse_args(["--out", str(tmp_path / "digits")]))
    args = compare.parse_args(["--out", str(tmp_path / "cmp"), "--data-path", str(tmp_path / "digits"),
                               "--samples-per-class", "4", "--sampling-steps", "3", "--no-attacks"])
    bench = compare.Benchmark(args)
    reference = bench.reference(0)
    each = [bench.evaluator.report(bench.evaluator.samples(p), 0)
            for p in (os.path.join(demo.ASSETS, "digits_dit_without_0.pt"), second)]
    assert reference["references"] == 2 and "digits_dit_without_1.pt" in reference["retrained_from"]
    for key in ("forget_acc", "remain_acc", "fd_remain"):
        assert reference["retrained"][key] == pytest.approx((each[0][key] + each[1][key]) / 2)
        assert reference["retrained_range"][key] == pytest.approx(sorted([each[0][key], each[1][key]]))
        assert [reference["retrained_each"][f"digits_dit_without_{n}.pt"][key] for n in (0, 1)] == \
            pytest.approx([each[0][key], each[1][key]])  # each reference's own figures, by file
    assert each[1]["forget_acc"] - each[0]["forget_acc"] > 0.5  # the mean lies between two distant models
    mean_fa = reference["retrained"]["forget_acc"]
    assert targets_missed({**reference["original"], "forget_acc": mean_fa + 0.02}, reference) == ""
    assert "F" in targets_missed({**reference["original"], "forget_acc": mean_fa + 0.05}, reference)


def test_all_digits_runs_a_method_at_its_tuned_configuration(tmp_path, monkeypatch):
    """compare.py --all-digits --methods: the method's configuration that --report-dir's tuning.json chose, with its
    gradient mask, judged like the recipes; without that file one clear error."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import compare
    monkeypatch.chdir(tmp_path)
    argv = ["--all-digits", "--methods", "salun+distill", "--classes", "3", "--seeds", "0", "--steps", "2", "--out",
            "out", "--data-path", "digits", "--cache-dir", "ret", "--batch-size", "8", "--fisher-iters", "1",
            "--samples-per-class", "4", "--sampling-steps", "3", "--no-attacks", "--report-dir", "tuned"]
    with pytest.raises(compare.UserError, match="tuned/tuning.json"):
        compare.main(compare.parse_args(argv))
    flags = ["--method", "joint", "--unlearn-loss", "salun", "--remain-loss", "distill", "--sparsity", "0.8",
             "--lr", "3e-4"]
    os.makedirs("tuned")
    json.dump({"chosen": {"salun+distill": {"name": "salun+distill-lr3e-4", "flags": flags, "mask": "gradient"}}},
              open("tuned/tuning.json", "w"))
    with pytest.raises(compare.UserError, match="no chosen configuration for sfron"):
        compare.main(compare.parse_args(argv[:2] + ["sfron"] + argv[3:]))
    compare.main(compare.parse_args(argv))
    rows = json.load(open("out/all_digits.json"))["rows"]
    assert [(r["name"], r["step"], r["targets"]) for r in rows] == [("salun+distill", 2, "FRD")]
    run = json.load(open("out/evals/salun+distill-lr3e-4-3-seed0.json"))
    assert run["flags"][-len(flags) - 2:-2] == flags and run["settings"]["step"]["lr"] == 3e-4
    assert run["settings"]["remain"]["remain_loss"] == "distill"
    assert os.path.isfile("out/mask/seed0/3/gradient_0.8.pt")  # SalUn's own mask, at the tuned sparsity
    assert compare.parse_args(["--all-digits"]).recipes and not compare.parse_args(argv).recipes
