"""
The comparison behind the paper's claim: SFR-on beside the gradient-based baselines on an embedded case.

On --dataset digits (or mnist), SFR-on's recipes and the baselines (GA, FT, RL, SalUn, SA, ESD, UNO, and those with
a remain term also with the distilled one) unlearn the same digits with the same step budget and batch through
forget.py, their checkpoints evaluated along the way against the DiT retrained without the digit.

    python bench/compare.py

Protocol (bench/protocol.py; docs/comparison.md): every method gets the same number of configurations, chosen on
the tuning digits by protocol.score(), then frozen for every held-out digit and seed; the adversarial-esd-distill
recipe (sfron-adversarial) is also run with each of its pieces removed. A checkpoint's report: forget accuracy, remain
accuracy, the Frechet distance of the remain-class samples to the real images (and as a ratio to the original
model's), their distance to the retrained model's samples, and the forget run's wall time; per run, the first
evaluated step whose forget accuracy is within 3 points of the retrained model's; and on each final model and the
references, forget accuracy after attack.py's label inversion and relearning attacks (README: "Is the class really
gone?"). Writes comparison.json, comparison.md, curves.png and tradeoff.png (remain accuracy lost against forget
accuracy after label inversion above the retrained model's, a point per method) to --report-dir; --report-only writes
them again from the comparison.json there, running nothing. Every run and evaluation is saved under --out as it
finishes: started again, the benchmark continues where it stopped.
"""
import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import attack  # noqa: E402
import demo  # noqa: E402
import forget  # noqa: E402
import generate_fisher  # noqa: E402
import generate_mask  # noqa: E402
import prepare_digits  # noqa: E402
from cli import description, run_main  # noqa: E402
from evaluate import real_image_batches  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from sfron.attack import AttackImages, AttackSettings, label_inversion, relearning  # noqa: E402
from sfron.build import ModelRequest, load_model_and_vae  # noqa: E402
from sfron.classifier import load_classifier  # noqa: E402
from sfron.data import class_folders  # noqa: E402
from sfron.files import as_read_back, atomic_json_dump, atomic_write_text  # noqa: E402
from sfron.loss import NonFinite  # noqa: E402
from sfron.mask import mask_filename  # noqa: E402
from sfron.recipes import RECIPES, mask_setting  # noqa: E402
from sfron.targets import ATTACK_KEYS, judged_targets, targets_missed  # noqa: E402
from sfron.unlearn import UnlearnSettings, without_removed_fields  # noqa: E402
from sfron.metrics import (classification_report, classify, embed, feature_space, frechet_distance,  # noqa: E402
                           frechet_statistics, nhwc_batches, reference_set)
from sfron.sampling import SamplerConfig, generate, per_sample_noise, to_uint8_nhwc  # noqa: E402
from sfron.utils import UserError  # noqa: E402
from protocol import (ABLATED, ABLATIONS, ADVERSARIAL_ROW, CONFIGURATIONS, EVAL_STEPS, HELD_OUT_DIGITS,  # noqa: E402
                      MAIN_METHODS, METHODS, TUNING_DIGITS, UNO_OWN_STEPS, Setting, score)
from report import (attack_budgets, load_result, rewrite_tuning, summarise, targets_table,  # noqa: E402
                    with_summary, write_report, write_tuning)

COMPARISON_DEFAULTS = dict(classes=list(HELD_OUT_DIGITS), steps=max(EVAL_STEPS), eval_steps=list(EVAL_STEPS),
                           batch_size=64, samples_per_class=100, sampling_steps=10, inversion_steps=100,
                           relearn_steps=10)
ALL_DIGITS_DEFAULTS = dict(classes=list(range(10)), steps=100, eval_steps=[], batch_size=128, samples_per_class=100,
                           sampling_steps=25, inversion_steps=200, relearn_steps=50)


def quiet(fn, *args, log=None):
    """Runs fn(*args) with its output (progress bars and logs of the scripts) going to the file `log`."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            return fn(*args)
    finally:
        if log:
            atomic_write_text(buffer.getvalue(), log)


def call(script, argv):
    """A script's main() in this process, as its command line would run it."""
    return script.main(script.parse_args([str(a) for a in argv]))


class Evaluator:
    """Samples the digits 0-9 from a model with one fixed protocol and reports the comparison's metrics."""

    def __init__(self, args):
        self.args, self.device, self.case = args, torch.device("cpu"), demo.CASES[args.dataset]
        self.classifier = load_classifier(self.case.name, self.case.classifier, 10)
        self.shape = (3, self.case.image_size, self.case.image_size)
        self.space = feature_space("classifier", classifier=self.classifier)
        self.config = SamplerConfig("ddim", args.sampling_steps, args.cfg_scale)
        self.labels = np.repeat(np.arange(10), args.samples_per_class)
        self._real = {}

    def samples(self, ckpt, seed=0):
        """uint8 images (N, S, S, 3) of every digit from a checkpoint, from the same noise (of `seed`) for every
        model."""
        model = load_model_and_vae(ModelRequest(model=self.case.model, ckpt=ckpt), self.device).model
        z = per_sample_noise(seed, range(len(self.labels)), self.shape, self.device)
        images = generate(model, None, torch.from_numpy(self.labels), z, self.config)
        return to_uint8_nhwc(images)

    def real_statistics(self, forget_class):
        """FID statistics of the real images of the remain classes (cached on disk)."""
        if forget_class not in self._real:
            classes = [c for c in range(10) if c != forget_class]
            batches = real_image_batches(class_folders(self.args.data_path, 10), classes, self.case.image_size, None,
                                         500)
            cache = os.path.join(self.args.out, "fid_cache", f"real_remain_{forget_class}.pt")
            self._real[forget_class] = reference_set(self.space, batches, cache, f"real remain {forget_class}",
                                                     self.device)
        return self._real[forget_class]

    def forget_share(self, model, label, forget_class):
        """The share of the images `model` draws for `label` (as many as per digit) that the classifier puts in
        forget_class."""
        n = self.args.samples_per_class
        z = per_sample_noise(0, range(n), self.shape, self.device, "attack/noise")
        with torch.no_grad():
            images = to_uint8_nhwc(generate(model, None, torch.full((n,), label), z, self.config))
        return float((classify(self.classifier, images, 500, self.device).argmax(1) == forget_class).float().mean())

    def attacks(self, ckpt, forget_class):
        """{inversion_fa, relearn_fa}: forget accuracy after attack.py's label inversion and relearning (8 images,
        seed 0) at the budgets of --inversion-steps and --relearn-steps."""
        model = load_model_and_vae(ModelRequest(model=self.case.model, ckpt=ckpt), self.device).model
        folders = class_folders(self.args.data_path, 10)
        images = AttackImages(attack.attacker_images(folders, forget_class, self.case.image_size, 8, 0), None)
        budgets = self.args.inversion_steps, self.args.relearn_steps
        settings = AttackSettings(forget_class, inversion_steps=(budgets[0],), relearn_steps=(budgets[1],))
        rate = lambda net, label, step: self.forget_share(net, label, forget_class)  # noqa: E731
        diffusion = create_diffusion(timestep_respacing="")
        inverted = label_inversion(model, diffusion, images, settings, rate)
        relearned = relearning(model, diffusion, images, settings, rate)
        return {"inversion_fa": inverted[budgets[0]], "relearn_fa": relearned[budgets[1]]}

    def statistics(self, images, forget_class=None):
        """FID statistics of a set of uint8 images (N, H, W, 3) of every digit (the remain digits' only, if given)."""
        if forget_class is not None:
            images = images[self.labels != forget_class]
        return frechet_statistics(embed(self.space, nhwc_batches(images, 500), self.device)[0])

    def report(self, images, forget_class, retrained_stats=None):
        """Forget and remain accuracy, remain FD to the real images and (if given) to the retrained model's."""
        logits = classify(self.classifier, images, 500, self.device)
        metrics = classification_report(logits, torch.from_numpy(self.labels), forget_class)
        remain = self.labels != forget_class
        out = {k: metrics[k] for k in ("forget_acc", "remain_acc")}
        remain_stats = self.statistics(images[remain])
        out["fd_remain"] = frechet_distance(remain_stats, self.real_statistics(forget_class))
        if retrained_stats is not None:
            out["fd_to_retrained"] = frechet_distance(remain_stats, retrained_stats)
        return out


class Benchmark:
    """The work of the comparison as units that save their result to a file and are skipped when it exists."""

    def __init__(self, args):
        self.args, self.out = args, args.out
        self.evaluator = Evaluator(args)
        self.case = self.evaluator.case
        self._retrained_stats = {}

    def path(self, *parts):
        """A path under --out whose folder exists."""
        path = os.path.join(self.out, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def cached(self, path, compute, still_valid=None):
        """The JSON at path, computed and saved there first if missing or if still_valid(saved) says it is outdated;
        read back either way (string keys)."""
        if os.path.isfile(path) and still_valid is not None and not still_valid(json.load(open(path))):
            print(f"{path} was computed with other settings: computing it again", flush=True)
            os.remove(path)
        if not os.path.isfile(path):
            atomic_json_dump(compute(), path)
        return json.load(open(path))

    def mask_folder(self, seed):
        """The --mask-path of one seed's masks."""
        return self.path("mask", f"seed{seed}")

    def saliency_statistics(self, forget_class, seed):
        """The mask folder of one seed, holding the Fisher diagonals and the summed forget gradient of one class (step
        1 of the README; computed if missing)."""
        folder = self.mask_folder(seed)
        if not os.path.isfile(os.path.join(folder, str(forget_class), "forget_gradient.pt")):  # written last
            common = ["--model", self.case.model, "--data-path", self.args.data_path, "--ckpt", self.case.dit,
                      "--num-workers", 0, "--batch-size", self.args.batch_size, "--seed", seed]
            log = self.path("logs", f"mask-{forget_class}-{seed}.txt")
            quiet(call, generate_fisher, common + ["--n-iters", self.args.fisher_iters, "--forget-class", forget_class,
                                                    "--mask-path", folder, "--results-dir", self.path("runs", "fisher"),
                                                    "--gradient-saliency"], log=log)
        return folder

    def mask_for(self, setting, forget_class, seed):
        """The mask folder of one class and seed holding the mask `setting` asks for (its --threshold's Fisher
        mask, or its --sparsity's gradient mask; step 2 of the README), made if missing."""
        folder = self.saliency_statistics(forget_class, seed)
        if setting.mask == "fisher":
            threshold = threshold_of(setting.flags)
            name, argv = mask_filename(threshold=threshold), ["--thresholds", threshold]
        else:
            sparsity = mask_setting(setting.flags, "sparsity") or 0.5
            name, argv = mask_filename(sparsity=sparsity), ["--criterion", "gradient", "--sparsity", sparsity]
        if not os.path.isfile(os.path.join(folder, str(forget_class), name)):
            quiet(call, generate_mask, ["--mask-path", folder, "--forget-class", forget_class, *argv])
        return folder

    def retrained(self, forget_class):
        """(path of the DiT retrained without the class, where it came from); trained once if missing."""
        path = demo.retrained_reference(self.case, forget_class, self.args.cache_dir, self.args.data_path,
                                        train_missing=False)
        if path is not None:
            return path, "shipped in assets/" if path.startswith(demo.ASSETS) else f"cached in {self.args.cache_dir}"
        start = time.time()
        path = quiet(demo.retrained_reference, self.case, forget_class, self.args.cache_dir, self.args.data_path,
                     log=self.path("logs", f"retrain-{forget_class}.txt"))
        return path, f"trained now with train.py --exclude-class {forget_class} ({time.time() - start:.0f} s)"

    def retrained_report(self, path, images, forget_class):
        """The report of one retrained model from its samples (with its attacks' where they run)."""
        report = self.evaluator.report(images, forget_class)
        if self.args.attacks:
            report.update(self.evaluator.attacks(path, forget_class))
        return report

    def reference(self, forget_class):
        """Reports of the original and the retrained models for one forget class: "retrained" is the mean over the
        references (the first, and those retrained with other seeds that assets/ ships), "retrained_range" each
        figure's [min, max] over them, "retrained_each" each reference's by file name; the targets are judged against
        the mean."""
        more = self.case.more_references(forget_class)

        def compute():
            path, origin = self.retrained(forget_class)
            retrained = self.evaluator.samples(path)
            out = {"original": self.evaluator.report(self.evaluator.samples(self.case.dit), forget_class,
                                                     self.evaluator.statistics(retrained, forget_class))}
            if self.args.attacks:
                out["original"].update(self.evaluator.attacks(self.case.dit, forget_class))
            reports = [self.retrained_report(path, retrained, forget_class)]
            reports += [self.retrained_report(p, self.evaluator.samples(p), forget_class) for p in more]
            out["retrained_each"] = {os.path.basename(p): r for p, r in zip([path, *more], reports)}
            out["retrained"] = {k: statistics.fmean(r[k] for r in reports) for k in reports[0]}
            out["retrained_range"] = {k: [min(r[k] for r in reports), max(r[k] for r in reports)] for k in reports[0]}
            out["retrained_from"] = "; ".join([origin, *(f"and {os.path.basename(p)}" for p in more)])
            return {**out, "references": 1 + len(more), "attacks": self.attack_budgets(),
                    "evaluation": self.evaluation()}
        return self.cached(self.path("references", f"{forget_class}.json"), compute,
                           lambda saved: saved.get("attacks") == self.attack_budgets()
                           and saved.get("evaluation") == self.evaluation()
                           and saved.get("references", 1) == 1 + len(more))

    def evaluation(self):
        """How a unit's samples were drawn: a unit saved under other values is computed again."""
        return {k: getattr(self.args, k) for k in ("samples_per_class", "sampling_steps", "cfg_scale")}

    def attack_budgets(self):
        """{inversion_steps, relearn_steps} of the attacks a unit runs, or None without attacks."""
        return attack_budgets(vars(self.args))

    def retrained_stats(self, forget_class):
        if forget_class not in self._retrained_stats:
            path, _ = self.retrained(forget_class)
            self._retrained_stats[forget_class] = self.evaluator.statistics(self.evaluator.samples(path), forget_class)
        return self._retrained_stats[forget_class]

    def run(self, setting, forget_class, seed, steps):
        """One forget.py run of a Setting, evaluated at each of `steps`: {"steps": {step: report}, "seconds": s}."""
        name = f"{setting.name}-{forget_class}-seed{seed}"
        flags = list(setting.flags) + (["--mask-path", self.mask_folder(seed)] if setting.mask else [])
        results = os.path.dirname(self.path("runs", name, "log"))
        argv = ["--model", self.case.model, "--data-path", self.args.data_path, "--ckpt", self.case.dit,
                "--batch-size", self.args.batch_size, "--n-iters", max(steps), "--ckpt-steps", *steps,
                "--snapshot-every", 0, "--log-every", 10, "--num-workers", 0, "--forget-class", forget_class,
                "--seed", seed, "--results-dir", results, *flags]

        def compute():
            if setting.mask:
                self.mask_for(setting, forget_class, seed)
            shutil.rmtree(results, ignore_errors=True)  # a killed or outdated run's folder
            start, diverged_at = time.time(), None
            try:
                quiet(call, forget, argv, log=self.path("logs", f"{name}.txt"))
            except NonFinite as e:  # a result, not a failure: its checkpoints before the divergence are evaluated
                diverged_at = e.diverged_at
            seconds = time.time() - start
            (run_dir,) = [os.path.join(results, d) for d in os.listdir(results)]
            reports = {}
            for step in steps:
                ckpt = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
                if diverged_at is None or os.path.isfile(ckpt):
                    reports[step] = self.evaluator.report(self.evaluator.samples(ckpt), forget_class,
                                                          self.retrained_stats(forget_class))
            if self.args.attacks and max(steps) in reports:  # the attacks on the final weights
                reports[max(steps)].update(self.evaluator.attacks(ckpt, forget_class))
            return {"setting": setting.name, "forget_class": forget_class, "seed": seed, "seconds": seconds,
                    "diverged_at": diverged_at, "steps": reports, "flags": [str(f) for f in argv],
                    "settings": resolved_settings(argv), "attacks": self.attack_budgets(),
                    "evaluation": self.evaluation()}
        return self.cached(self.path("evals", f"{name}.json"), compute,
                           lambda saved: covers(saved, [str(f) for f in argv], steps)
                           and saved.get("attacks") == self.attack_budgets()
                           and saved.get("evaluation") == self.evaluation())


def portable_flags(runs):
    """The runs with each recorded flag that is a path inside the repository written relative to it (the shipped
    DiT as assets/...), so that a stored report reads the same on every clone."""
    def portable(flag):
        inside = isinstance(flag, str) and flag.startswith(ROOT + os.sep)
        return os.path.relpath(flag, ROOT) if inside else flag
    return [{**run, "flags": [portable(f) for f in run["flags"]]} for run in runs]


def resolved_settings(argv):
    """The unlearning settings forget.py resolves from a command line (its recipe's values included), as JSON."""
    return as_read_back(asdict(forget.unlearn_settings(forget.parse_args(argv))))


def covers(saved, flags, steps):
    """Whether a saved run is the run of forget.py `flags` evaluated at (at least) `steps`: the same flags but for
    its --ckpt-steps, resolving to the same settings (a recipe changed since is another run), and every one of
    steps evaluated (for a run that diverged, those before the step it diverged in)."""
    def without_steps(argv):
        start = argv.index("--ckpt-steps")
        end = next((i for i in range(start + 1, len(argv)) if argv[i].startswith("--")), len(argv))
        return argv[:start] + argv[end:]
    diverged_at = saved.get("diverged_at")
    return (without_steps(saved["flags"]) == without_steps(flags)
            and same_settings(saved.get("settings"), resolved_settings(flags))
            and {str(s) for s in steps if diverged_at is None or s < diverged_at} <= set(saved["steps"]))


def same_settings(saved, resolved):
    """Whether saved settings are resolved ones; a field added to the settings since the run (absent from the saved
    JSON) counts as the same when it now holds its default, the value that leaves the update as it was."""
    if saved is None:
        return False
    defaults = as_read_back(asdict(UnlearnSettings.from_fields({"forget_class": 0})))  # its class is in both
    saved = without_removed_fields(saved)  # a field removed since: at the value it had then, or one error line
    return all({**defaults[section], **saved.get(section, {})} == values for section, values in resolved.items())


def threshold_of(flags):
    """The mask threshold of forget.py flags: the last --threshold, else the recipe's."""
    return mask_setting(flags, "threshold")


def mask_kind(flags):
    """The saliency mask forget.py flags train in: "gradient" (SalUn's, at a --sparsity given or the recipe's), else
    "fisher"."""
    return "gradient" if mask_setting(flags, "sparsity") is not None else "fisher"


def setting_rows(bench, setting, digits, seeds, steps, label=None):
    """Runs (or reads back) a Setting on every digit and seed: one row per checkpoint of `steps`, named label (default
    the setting's name), with the targets it misses."""
    rows = []
    for digit in digits:
        reference = bench.reference(digit)
        for seed in seeds:
            run = bench.run(setting, digit, seed, steps)
            for step in steps:
                report = run["steps"].get(str(step))
                if report is None:  # after the run's divergence: it misses every target there
                    rows.append({"name": label or setting.name, "digit": digit, "seed": seed, "step": step,
                                 "diverged_at": run["diverged_at"], "targets": "FRD", "missed": "diverged",
                                 "seconds": run["seconds"]})
                    continue
                rows.append({"name": label or setting.name, "digit": digit, "seed": seed, "step": step, **report,
                             "fd_ratio": report["fd_remain"] / reference["original"]["fd_remain"],
                             "retrained_fa": reference["retrained"]["forget_acc"],
                             "original_ra": reference["original"]["remain_acc"],
                             **{f"retrained_{k}": reference["retrained"][k] for k in ATTACK_KEYS if k in report},
                             "targets": judged_targets(report), "missed": targets_missed(report, reference),
                             "seconds": run["seconds"]})
    return rows


def recipe_methods(recipes):
    """{sfron-<recipe>: (forget.py flags, lr)} of forget.py's recipes as demo.py runs them on the digits."""
    out = {}
    for recipe in recipes:
        args = demo.parse_args(["--recipe", recipe])
        lr = demo.recipe_value(args, "lr")
        flags = tuple(str(f) for f in demo.forget_flags(args))
        out[f"sfron-{recipe}"] = Setting(f"sfron-{recipe}-lr{lr}", flags, mask_kind(flags))
    return out


def chosen_methods(names, report_dir):
    """{method: its Setting chosen by the comparison's tuning} read from --report-dir's tuning.json."""
    if not names:
        return {}
    path = os.path.join(report_dir, "tuning.json")
    if not os.path.isfile(path):
        raise UserError(f"--all-digits --methods reads each method's chosen configuration from {path}: run "
                        f"bench/compare.py --tuning-only --report-dir {report_dir} first")
    chosen = json.load(open(path))["chosen"]
    missing = [n for n in names if n not in chosen]
    if missing:
        raise UserError(f"{path} has no chosen configuration for {' '.join(missing)}: run bench/compare.py "
                        f"--tuning-only --methods {' '.join(missing)} --report-dir {report_dir} first")
    return {n: Setting(chosen[n]["name"], tuple(chosen[n]["flags"]), chosen[n]["mask"]) for n in names}


def all_digits(bench, args):
    """--all-digits: forget.py's recipes, as demo.py runs them, and the comparison's methods at their chosen
    configuration, on every digit and seed against the five targets (three without --attacks); writes
    all_digits.json and all_digits.md."""
    recipes = {**recipe_methods(args.recipes), **chosen_methods(args.methods, args.report_dir)}
    rows = []
    for name, setting in recipes.items():
        rows += setting_rows(bench, setting, args.classes, args.seeds, sorted(set(args.eval_steps) | {args.steps}),
                             label=name)
    command = "python bench/compare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    table = targets_table(rows, command, bench.attack_budgets())
    atomic_json_dump({"recipes": {name: asdict(setting) for name, setting in recipes.items()}, "rows": rows},
                     os.path.join(args.out, "all_digits.json"))
    atomic_write_text(table, os.path.join(args.out, "all_digits.md"))
    print(table)
    print(f"Saved all_digits.json and all_digits.md to {args.out}")


def tuning_run(bench, setting, args):
    """{digit: report of the final checkpoint, with its missed targets and remain FD ratio} of one configuration on
    the tuning digits, seed 0."""
    out = {}
    for digit in args.tuning_classes:
        reference = bench.reference(digit)
        judged_against = {"references": reference.get("references", 1)}  # how many retrained models the mean holds
        report = bench.run(setting, digit, 0, [args.steps])["steps"].get(str(args.steps))
        if report is None:  # diverged before the last step: every target missed, no distance to rank it by
            out[digit] = {"missed": "FRDIL" if args.attacks else "FRD", "fd_ratio": float("inf"), "diverged": True,
                          **judged_against}
            continue
        out[digit] = {**report, "missed": targets_missed(report, reference),
                      "fd_ratio": report["fd_remain"] / reference["original"]["fd_remain"], **judged_against}
    return out


def choose_setting(bench, method, args):
    """(the chosen Setting of a protocol Method, {setting name: its tuning_run}): the configuration with the best
    protocol.score() on the tuning digits; with --no-tuning the method's base configuration, untried."""
    configurations = method.configurations()
    if args.no_tuning:
        return configurations[0], {}
    trials = {c.name: tuning_run(bench, c, args) for c in configurations}

    def rank(setting):
        reports = trials[setting.name].values()
        return score([r["missed"] for r in reports], [r["fd_ratio"] for r in reports])
    return min(configurations, key=rank), trials


def plan(chosen, args):
    """[(row, Setting, digits, seeds)] of the evaluation, in chosen's order: every main method on --classes x --seeds;
    the other distilled baselines and the ablation of sfron-adversarial on the first --few-classes digits, the first
    seed."""
    few = (args.classes[:args.few_classes], args.seeds[:1])
    units = [(name, setting, *(((args.classes, args.seeds)) if name in MAIN_METHODS else few))
             for name, setting in chosen.items()]
    if args.ablation and ADVERSARIAL_ROW in chosen:
        base = chosen[ADVERSARIAL_ROW]
        for row, extra in ABLATIONS.items():
            slug = "".join(c if c.isalnum() else "-" for c in row)
            units.append((f"{ABLATED}{row}", base.over(f"{base.name}-without-{slug}", extra), *few))
    return units


def run_steps(row, args):
    """The steps a run of this row is evaluated at: --eval-steps and --steps, and UNO's own step count for UNO."""
    return sorted(set(args.eval_steps) | {args.steps} | ({UNO_OWN_STEPS} if row == "uno" else set()))


def parse_shard(text):
    """(index, count) of --shard K/N, or one clear error."""
    try:
        index, count = map(int, text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N, such as 0/2, got {text}")
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"K/N needs 0 <= K < N, got {text}")
    return index, count


def sampling_spread(bench, args):
    """{relative, seeds, fd}: the remain FD of the original model (forget class: the first evaluated digit) over
    three sampling seeds, and its standard deviation over the mean."""
    def compute():
        digit = args.classes[0]
        fds = [bench.evaluator.report(bench.evaluator.samples(bench.case.dit, seed), digit)["fd_remain"]
               for seed in range(3)]
        return {"relative": statistics.stdev(fds) / statistics.mean(fds), "seeds": 3, "fd": fds, "digit": digit,
                "samples_per_class": args.samples_per_class}
    return bench.cached(bench.path("spread.json"), compute,
                        lambda saved: saved.get("samples_per_class") == args.samples_per_class)


def main(args):
    """Runs (or continues) the comparison and writes its report."""
    if args.report_only:
        result = with_summary(load_result(args.report_dir))
        rewrite_tuning(args.report_dir, result["protocol"])
        return write_report(result, args)
    overlap = sorted(set(args.tuning_classes) & set(args.classes))
    if overlap and not args.all_digits:
        raise UserError(f"--tuning-classes {' '.join(map(str, overlap))} must not be among the evaluated --classes")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    os.makedirs(args.out, exist_ok=True)
    if not os.path.isdir(os.path.join(args.data_path, "train")):
        quiet(call, prepare_digits, ["--dataset", args.dataset, "--out", args.data_path])
    bench = Benchmark(args)
    if args.all_digits:
        return all_digits(bench, args)
    start = time.time()
    spread = sampling_spread(bench, args)
    chosen, tuning = {}, {}
    for name in tqdm(args.methods, desc=f"Tuning (digits {args.tuning_classes})", dynamic_ncols=True):
        chosen[name], tuning[name] = choose_setting(bench, METHODS[name], args)
    # the reports list methods in the protocol's order, whatever order --methods ran them in
    order = [name for name in METHODS if name in chosen]
    by_protocol = {name: chosen[name] for name in order}
    if not args.no_tuning:
        write_tuning({name: tuning[name] for name in order},
                     {name: asdict(setting) for name, setting in by_protocol.items()}, args)
        if args.tuning_only:
            print(f"Saved tuning.json and tuning.md to {args.report_dir}")
            return
    references = {c: bench.reference(c) for c in tqdm(args.classes, desc="References", dynamic_ncols=True)}
    jobs = [(row, setting, c, s) for row, setting, digits, seeds in plan(chosen, args) for c in digits for s in seeds]
    index, count = args.shard or (0, 1)  # a shard runs its share of the held-out runs; a full run gathers them all
    runs = [{"row": row, **bench.run(setting, c, s, run_steps(row, args))} for row, setting, c, s in
            tqdm(jobs[index::count], desc="Runs" + (f", shard {index}/{count}" if args.shard else ""),
                 dynamic_ncols=True)]
    if args.shard:
        print(f"Shard {index}/{count} done: run bench/compare.py without --shard to write the report")
        return
    rank = {row: i for i, (row, *_) in enumerate(plan(by_protocol, args))}
    runs.sort(key=lambda r: rank[r["row"]])  # stable: digits and seeds keep their order within a row
    result = {"protocol": {k: v for k, v in vars(args).items()
                              if k not in ("out", "report_dir", "report_only", "trade_panels")},
              "configurations_per_method": CONFIGURATIONS,
              "grids": {name: [asdict(c) for c in METHODS[name].configurations()] for name in order},
              "chosen": {name: asdict(setting) for name, setting in by_protocol.items()},
              "tuning": {name: tuning[name] for name in order},
              "spread": spread, "references": references, "runs": portable_flags(runs),
              "summary": summarise(runs, references),
              "seconds": round(time.time() - start, 1)}
    write_report(result, args)


def parse_args(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--out", type=str, default=None,
                        help="working folder: every run and evaluation, saved as it finishes (resumable; default "
                             "bench_results/compare, with --all-digits bench_results/all_digits; with --dataset mnist "
                             "the same with _mnist)")
    parser.add_argument("--report-dir", type=str, default=None,
                        help="where comparison.json, comparison.md and the plots go (default docs/comparison, with "
                             "--dataset mnist docs/comparison_mnist)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write comparison.md, curves.png and tradeoff.png again from the "
                             "comparison.json in --report-dir")
    parser.add_argument("--trade-panels", type=str, nargs="+", default=[], metavar="REPORT_DIR",
                        help="report folders of comparisons on other datasets: each adds its panel to tradeoff.png")
    parser.add_argument("--dataset", type=str, choices=list(demo.CASES), default="digits",
                        help="the embedded case: digits (8x8, DiT-T/2) or mnist (28x28, DiT-T/4)")
    parser.add_argument("--data-path", type=str, default=None,
                        help="the images' folder (default data/<dataset>; made if missing)")
    parser.add_argument("--cache-dir", type=str, default="retrained",
                        help="retrained references not shipped in assets/ are trained once and kept here")
    parser.add_argument("--methods", type=str, nargs="+", choices=list(METHODS), default=None,
                        help="methods to compare (default: all; bench/protocol.py; sfron: forget.py --recipe "
                             "official, sfron-adversarial: --recipe adversarial-esd-distill, <baseline>+distill: with "
                             "the distilled remain term; salun+distill at its chosen configuration is --recipe "
                             "salun-distill); with --all-digits: methods to run at the configuration --report-dir's "
                             "tuning.json chose (default: none)")
    parser.add_argument("--classes", type=int, nargs="+", default=None,
                        help="held-out digits to forget (default: 0 3 5 6 9; with --all-digits 0-9)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of each run")
    parser.add_argument("--tuning-classes", type=int, nargs="+", default=list(TUNING_DIGITS),
                        help="the digits every method's configuration is chosen on (seed 0; never evaluated)")
    parser.add_argument("--no-tuning", action="store_true", help="use each method's base configuration")
    parser.add_argument("--tuning-only", action="store_true",
                        help="stop after the tuning stage (tuning.json and tuning.md in --report-dir)")
    parser.add_argument("--shard", type=parse_shard, default=None, metavar="K/N",
                        help="run only every N-th held-out run from the K-th (N processes share the benchmark; tune "
                             "first with --tuning-only, or every shard tunes), and write no report")
    parser.add_argument("--few-classes", type=int, default=3,
                        help="the distilled baselines other than salun+distill (the default's row) and the "
                             "ablation run on this many of --classes, first seed")
    parser.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                        help="sfron-adversarial with each of its pieces removed in turn (needs sfron-adversarial)")
    parser.add_argument("--steps", type=int, default=None,
                        help="unlearning steps of every run (default: 100)")
    parser.add_argument("--eval-steps", type=int, nargs="*", default=None,
                        help="checkpoints evaluated along the way, and --steps (default: 10 25 50; with --all-digits "
                             "none)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="forget and remain samples per step (default: 64; with --all-digits the demo's 128)")
    parser.add_argument("--fisher-iters", type=int, default=8, help="generate_fisher.py --n-iters")
    parser.add_argument("--samples-per-class", type=int, default=None,
                        help="generated images per digit evaluated (default: 100, as the demo)")
    parser.add_argument("--sampling-steps", type=int, default=None,
                        help="DDIM steps of the evaluation samples (default: 10; with --all-digits the demo's 25)")
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="guidance scale of the evaluation samples")
    parser.add_argument("--all-digits", action="store_true",
                        help="instead of the comparison: forget.py's recipes as demo.py runs them on --classes x "
                             "--seeds, against the embedded case's five targets (README: the embedded digits case); "
                             "writes all_digits.md and all_digits.json to --out")
    parser.add_argument("--recipes", type=str, nargs="+", choices=list(RECIPES), default=None,
                        help="--all-digits: the recipes to measure (default: all, none when --methods is given)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--attacks", action=argparse.BooleanOptionalAction, default=True,
                        help="attack.py's label inversion and relearning on each final model and the references "
                             "(--no-attacks: skip)")
    parser.add_argument("--inversion-steps", type=int, default=None,
                        help="the label-inversion budget (default: 100; with --all-digits 200)")
    parser.add_argument("--relearn-steps", type=int, default=None,
                        help="the relearning budget (default: 10; with --all-digits 50)")
    args = parser.parse_args(argv)
    # the comparison's budget, or the demo's protocol that the embedded case's targets are stated at
    defaults = ALL_DIGITS_DEFAULTS if args.all_digits else COMPARISON_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.data_path = args.data_path or prepare_digits.data_folder(args.dataset)
    # each dataset, and --all-digits apart from the comparison, keeps its own working folder and report: their units
    # share names (<setting>-<digit>-seed<seed>) but not their protocol, so one would overwrite the other's
    suffix = "" if args.dataset == "digits" else f"_{args.dataset}"
    args.out = args.out or f"bench_results/{'all_digits' if args.all_digits else 'compare'}{suffix}"
    args.report_dir = args.report_dir or f"docs/comparison{suffix}"
    if args.recipes is None:
        args.recipes = [] if args.all_digits and args.methods else list(RECIPES)
    if args.methods is None:
        args.methods = [] if args.all_digits else list(METHODS)
    return args


if __name__ == "__main__":
    run_main(main, parse_args())
