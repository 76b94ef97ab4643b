"""The forget and remain terms behind one interface (sfron/terms/): every recipe's and baseline's first steps are
those of the code before the terms moved there, bit for bit (tests/first_steps.py); records of settings removed since still read back."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from first_steps import FIXTURE, RECORDED_AS, cases, run_case

RECORDED = load_file(FIXTURE)


@pytest.mark.parametrize("name", sorted(cases()))
def test_first_steps_equal_the_recorded_ones(name):
    got = run_case(name)
    prefix = RECORDED_AS.get(name, name) + "/"
    recorded = {key.split("/", 1)[1]: value for key, value in RECORDED.items() if key.startswith(prefix)}
    assert recorded.keys() == got.keys()
    for key, value in got.items():
        assert torch.equal(value, recorded[key]), f"{name}: {key} differs from the recorded first steps"


def test_no_code_outside_the_registry_branches_on_a_terms_name():
    """Only sfron/terms/ knows the terms: the step, the settings and forget.py ask the term, never its name."""
    import glob
    import re
    from helpers import ROOT
    files = glob.glob(os.path.join(ROOT, "sfron", "*.py")) + [os.path.join(ROOT, "forget.py")]
    pattern = re.compile(r"unlearn_loss (==|in)|remain_loss (==|in)")
    found = [f"{os.path.basename(f)}: {line.strip()}" for f in files for line in open(f) if pattern.search(line)]
    assert found == []


def test_every_term_is_registered_under_its_own_name_and_checks_its_settings():
    from sfron.terms import ADVERSARIAL_LOSSES, FORGET_TERMS, REMAIN_TERMS
    from sfron.unlearn import UnlearnSettings
    from sfron.utils import UserError
    assert list(FORGET_TERMS) == ["ga", "adaga", "rl", "salun", "sa", "esd", "uno"]
    assert list(REMAIN_TERMS) == ["diffusion", "distill"]
    assert all(t.name == n for n, t in {**FORGET_TERMS, **REMAIN_TERMS}.items())
    assert ADVERSARIAL_LOSSES == ("ga", "adaga", "esd")
    with pytest.raises(UserError, match="--unlearn-loss uno is one step on UNO's whole objective: use --method joint"):
        UnlearnSettings.from_fields({"forget_class": 0, "unlearn_loss": "uno"}).check()
    with pytest.raises(UserError, match="--unlearn-loss must be one of ga, adaga, rl, salun, sa, esd, uno, got x"):
        UnlearnSettings.from_fields({"forget_class": 0, "unlearn_loss": "x"}).check()
    with pytest.raises(UserError, match="--remain-loss must be one of diffusion, distill, got x"):
        UnlearnSettings.from_fields({"forget_class": 0, "remain_loss": "x"}).check()
    assert UnlearnSettings.from_fields({"forget_class": 0, "unlearn_loss": "esd"}).needs_frozen_model
    assert UnlearnSettings.from_fields({"forget_class": 0, "remain_loss": "distill"}).needs_frozen_model
    assert not UnlearnSettings.from_fields({"forget_class": 0, "unlearn_loss": "salun"}).needs_frozen_model


REMOVED_AT_DEFAULTS = {"step": {"lr_scale": "none"}, "forget": {"lambd": 0.5, "forget_label_dropout": True},
                       "remain": {"remain_drift_budget": 0.0, "remain_drift_action": "skip-forget"}}


def with_removed(sections, **override):
    """sections with the removed fields added (at their old defaults, or as override says)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in sections.items()}
    for part, values in REMOVED_AT_DEFAULTS.items():
        out.setdefault(part, {}).update(values)
    for key, value in override.items():
        (part,) = [p for p, v in REMOVED_AT_DEFAULTS.items() if key in v]
        out[part][key] = value
    return out


def test_a_run_recorded_with_a_removed_setting_at_its_default_resumes_and_another_value_is_refused(tmp_path):
    """forget.py --resume (a folder, and auto) continues a run whose checkpoint and run.json hold --lr-scale,
    --remain-drift-budget, --remain-drift-action, --lambd and --forget-label-dropout at the values that computed what
    runs compute now; a run recorded with another value is one error line."""
    from helpers import make_tiny_run_folder, run_in_process
    make_tiny_run_folder(tmp_path)
    argv = ["--model", "DiT-T/2", "--data-path", tmp_path / "data", "--batch-size", 2, "--ckpt", tmp_path / "tiny.pt",
            "--n-iters", 2, "--ckpt-every", 1, "--snapshot-every", 0, "--forget-class", 0, "--lr", "1e-3",
            "--results-dir", tmp_path / "res", "--num-workers", 0]
    run_in_process("forget.py", *argv, cwd=tmp_path, check=True)
    (run,) = (tmp_path / "res").glob("*-forget-0-*")
    finished = torch.load(run / "checkpoints" / "0000002.pt", weights_only=False)
    written = json.dumps(json.load(open(run / "run.json")))
    assert not any(key in written for key in ("lr_scale", "remain_drift", '"lambd"', "forget_label_dropout"))

    def rewrite_as_before(**override):
        """The run as an earlier version would have left it after step 1, with the removed fields recorded."""
        one = torch.load(run / "checkpoints" / "0000001.pt", weights_only=False)
        one["run"] = with_removed(one["run"], **override)
        torch.save(one, run / "checkpoints" / "0000001.pt")
        (run / "checkpoints" / "0000002.pt").unlink(missing_ok=True)
        record = json.load(open(run / "run.json"))
        json.dump(with_removed(record, **override), open(run / "run.json", "w"))

    rewrite_as_before()
    proc = run_in_process("forget.py", *argv, "--resume", "auto", cwd=tmp_path, check=True)
    assert "(step 1)" in proc.stdout + open(run / "log.txt").read()
    assert len(list((tmp_path / "res").iterdir())) == 1  # continued, not started anew
    again = torch.load(run / "checkpoints" / "0000002.pt", weights_only=False)
    for k, v in finished["model"].items():
        assert torch.equal(v, again["model"][k]), k
    rewrite_as_before(lr_scale="guidance")
    proc = run_in_process("forget.py", *argv, "--resume", run, cwd=tmp_path)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the run was recorded with --lr-scale guidance")
    log = open(run / "log.txt").read()
    settings_lines = [line for line in log.splitlines() if "Settings, " in line]
    assert settings_lines
    for removed in ("lr_scale=", "remain_drift", " lambd=", "forget_label_dropout"):
        assert not any(removed in line for line in settings_lines)  # a run's settings lines name none of them


def test_a_comparison_unit_recorded_with_a_removed_setting_at_its_default_reads_back(monkeypatch):
    """bench/compare.py's same_settings: a unit saved with the removed fields at their defaults is the same run; one
    saved with another value is one error line."""
    from dataclasses import asdict

    from helpers import ROOT
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import compare
    from sfron.files import as_read_back
    from sfron.unlearn import UnlearnSettings
    from sfron.utils import UserError
    resolved = as_read_back(asdict(UnlearnSettings.from_fields({"forget_class": 3, "lr": 1e-3})))
    assert compare.same_settings(with_removed(resolved), resolved)
    assert not compare.same_settings(with_removed({**resolved, "step": {**resolved["step"], "lr": 2e-3}}), resolved)
    with pytest.raises(UserError, match="recorded with --remain-drift-budget 0.5, a setting removed since"):
        compare.same_settings(with_removed(resolved, remain_drift_budget=0.5), resolved)
