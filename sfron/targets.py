"""
The embedded cases' five targets (README: the embedded digits case): which of them an unlearned model misses, judged
against the original model and the retrained reference (in bench/compare.py: the mean of the digit's references).
"""
FORGOTTEN_MARGIN = 0.03          # "forgotten": forget accuracy at most 3 points above the retrained model's
REMAIN_MARGIN = 0.01             # remain accuracy at most 1 point below the original's
DISTANCE_RATIO = 1.2             # remain Frechet distance at most 1.2x the original's
ATTACK_MARGIN = 0.10             # forget accuracy after each attack at most 10 points above the retrained model's
ATTACK_KEYS = ("inversion_fa", "relearn_fa")
TARGETS = ("F: forget acc <= retrained + 0.03; R: remain acc >= original - 0.01; D: remain FD <= 1.2x original; "
           "I, L: forget acc after label inversion, after relearning <= retrained's + 0.10 (retrained: the mean of the "
           "digit's retrained references)")


def is_forgotten(report, reference):
    """Forget accuracy at most FORGOTTEN_MARGIN above the retrained model's (accuracies are float32 shares of whole
    samples: 1e-6 absorbs their rounding)."""
    return report["forget_acc"] <= reference["retrained"]["forget_acc"] + FORGOTTEN_MARGIN + 1e-6


def target_checks(report, reference, distance="fd_remain"):
    """[(letter, value, bound, met)] of the targets a report can be judged on: F (forget accuracy), R (remain
    accuracy, bound from below), D (the remain Frechet distance under the key `distance`), and where the attacks ran
    on it I and L (forget accuracy after label inversion and after relearning). reference: {"original": report,
    "retrained": report}."""
    original, retrained = reference["original"], reference["retrained"]
    checks = [("F", report["forget_acc"], retrained["forget_acc"] + FORGOTTEN_MARGIN, is_forgotten(report, reference))]
    low = original["remain_acc"] - REMAIN_MARGIN
    checks.append(("R", report["remain_acc"], low, report["remain_acc"] >= low - 1e-6))
    high = DISTANCE_RATIO * original[distance]
    checks.append(("D", report[distance], high, report[distance] <= high))
    for letter, key in zip("IL", ATTACK_KEYS):
        if key in report:
            high = retrained[key] + ATTACK_MARGIN
            checks.append((letter, report[key], high, report[key] <= high + 1e-6))
    return checks


def targets_missed(report, reference, distance="fd_remain"):
    """The letters of the targets a report misses ("" when it meets every one it can be judged on)."""
    return "".join(letter for letter, _, _, met in target_checks(report, reference, distance) if not met)


def judged_targets(report):
    """The letters of the targets a checkpoint's report can be judged on: F R D, and I L where it was attacked."""
    return "FRD" + "".join(letter for letter, key in zip("IL", ATTACK_KEYS) if key in report)
