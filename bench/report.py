"""
The comparison's report: the tables of bench/compare.py and bench/sfron_variants.py, the summary over runs and the
plots (the targets themselves: sfron/targets.py).
"""
import json
import os
import statistics

from protocol import ABLATED, ADVERSARIAL_ROW, DEFAULT_ROW, METHODS, UNO_OWN_STEPS, score
from sfron.files import atomic_json_dump, atomic_save_figure, atomic_write_text
from sfron.recipes import DEFAULT_RECIPE, RECIPES
from sfron.targets import (ATTACK_KEYS, ATTACK_MARGIN, FORGOTTEN_MARGIN, REMAIN_MARGIN, TARGETS, is_forgotten,
                           targets_missed)
from sfron.utils import UserError

OFFICIAL_ROW = "sfron"           # the official SFR-on update: every row's wall time is also given against its own


def attack_budgets(settings):
    """{inversion_steps, relearn_steps} of the attacks a comparison's settings (its command line's, or a stored
    comparison's protocol) run, or None without attacks."""
    if not settings.get("attacks"):
        return None
    return {"inversion_steps": settings["inversion_steps"], "relearn_steps": settings["relearn_steps"]}


def attack_columns(budgets):
    """The two attack columns' headers, naming the budgets ({inversion_steps, relearn_steps}) the I and L targets
    were judged at."""
    if not budgets:
        return "FA after inversion", "FA after relearning"
    return (f"FA after {budgets['inversion_steps']} inversion steps",
            f"FA after {budgets['relearn_steps']} relearning steps")


def targets_table(rows, command, budgets):
    """Markdown: one line per setting, digit, seed and step, and how many final runs of each setting pass (budgets:
    the attacks', named in their columns)."""
    inversion, relearning = attack_columns(budgets)
    lines = [f"`{command}`", "", f"Targets: {TARGETS}.", "",
             "| setting | digit | seed | step | forget acc (retrained) | remain acc (original) | remain FD (x original) "
             f"| {inversion} (retrained) | {relearning} (retrained) | targets |", "| --- |" + " --- |" * 9]
    for r in rows:
        if "forget_acc" not in r:
            lines.append(f"| {r['name']} | {r['digit']} | {r['seed']} | {r['step']} | diverged at step "
                         f"{r['diverged_at']} |" + " – |" * 4 + " misses all |")
            continue
        attacked = [f"{r[k]:.2f} ({r['retrained_' + k]:.2f})" if k in r else "–" for k in ATTACK_KEYS]
        lines.append(f"| {r['name']} | {r['digit']} | {r['seed']} | {r['step']} | {r['forget_acc']:.3f} "
                     f"({r['retrained_fa']:.3f}) | {r['remain_acc']:.3f} ({r['original_ra']:.3f}) | {r['fd_ratio']:.2f} "
                     f"| {' | '.join(attacked)} | {'pass' if not r['missed'] else 'misses ' + r['missed']} |")
    lines.append("")
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        for step in sorted({r["step"] for r in mine}):
            at = [r for r in mine if r["step"] == step]
            judged = sorted({r["targets"] for r in at}, key=len)[0]  # the targets every run at this step was judged on
            lines.append(f"{name}, step {step}: {sum(not r['missed'] for r in at)} of {len(at)} runs meet all "
                         f"{len(judged)} targets ({' '.join(judged)}).")
    return "\n".join(lines) + "\n"


def first_forgotten_step(run, reference):
    """The first evaluated step whose forget accuracy is within 3 points of the retrained model's (or None)."""
    hits = [int(s) for s, r in run["steps"].items() if is_forgotten(r, reference)]
    return min(hits) if hits else None


def summarise(runs, references):
    """{row: {step: {metric: [mean, std]}}, runs, forgotten_runs, steps_to_forget, runs_meeting_targets, seconds}
    over the runs of each table row (a method, or an ablation of sfron-adversarial), in their order."""
    summary = {}
    for row in dict.fromkeys(r["row"] for r in runs):
        mine = [r for r in runs if r["row"] == row]
        steps = sorted(set.union(*(set(map(int, r["steps"])) for r in mine)))
        per_step = {}
        for step in steps:  # over the runs evaluated there: a diverged run has no step after its divergence
            reports = [dict(r["steps"][str(step)], fd_ratio=r["steps"][str(step)]["fd_remain"] /
                            references[r["forget_class"]]["original"]["fd_remain"])
                       for r in mine if str(step) in r["steps"]]
            per_step[step] = {k: mean_std([report[k] for report in reports if k in report])
                              for k in ("forget_acc", "remain_acc", "fd_remain", "fd_ratio", "fd_to_retrained",
                                        "inversion_fa", "relearn_fa")}
        forgotten = [first_forgotten_step(r, references[r["forget_class"]]) for r in mine]
        final = [targets_missed(r["steps"][str(steps[-1])], references[r["forget_class"]])
                 if str(steps[-1]) in r["steps"] else "diverged" for r in mine]
        summary[row] = {"steps": per_step, "runs": len(mine), "setting": mine[0]["setting"],
                        "forgotten_runs": sum(f is not None for f in forgotten),
                        "steps_to_forget": mean_std([f for f in forgotten if f is not None]),
                        "runs_meeting_targets": sum(not missed for missed in final),
                        "diverged_runs": sum(r.get("diverged_at") is not None for r in mine),
                        "seconds": mean_std([r["seconds"] for r in mine])}
    return summary


def mean_std(values):
    """[mean, standard deviation] (None for no values; std 0 for one)."""
    if not values:
        return None
    return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def default_note(setting):
    """What the default row's name adds: that it is the default recipe where its chosen configuration is the recipe's
    rate, else that the recipe is another configuration of it (another dataset's tuning may choose another rate)."""
    lr = RECIPES[DEFAULT_RECIPE].values["lr"]
    if setting == METHODS[DEFAULT_ROW].setting(lr).name:
        return f" (the default: `--recipe {DEFAULT_RECIPE}`)"
    return f" (the default's method, tuned here; `--recipe {DEFAULT_RECIPE}` is its lr {lr:.3g})"


def markdown(summary, references, protocol, spread):
    """The README's tables: per row at the protocol's last step (UNO also at its own step count), mean ± std over
    digits and seeds, the attack columns named by their budgets."""
    def cell(v, digits=3):
        return "–" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"
    step = protocol["steps"]
    inversion, relearning = attack_columns(attack_budgets(protocol))
    lines = [f"Step {step}, mean ± std over the held-out digits and seeds. The remain FD's sampling spread at this "
             f"sample count (the original model, {spread['seeds']} sampling seeds): ± {100 * spread['relative']:.1f}%.",
             "", "| row | setting | forget acc | remain acc | remain FD (x original) | FD to retrained | steps to forget "
             "| forgotten runs | runs meeting all targets | seconds | time (x official) "
             f"| {inversion} | {relearning} |",
             "| --- |" + " --- |" * 12]
    official = summary.get(OFFICIAL_ROW, {}).get("seconds")
    for row, s in summary.items():
        diverged = s.get("diverged_runs", 0)
        for at in [step] + ([UNO_OWN_STEPS] if row == "uno" and UNO_OWN_STEPS in s["steps"] else []):
            r, name = s["steps"].get(at), row if at == step else f"{row} (step {at})"
            if row == DEFAULT_ROW:
                name += default_note(s["setting"])
            if diverged:
                name += f" ({diverged} of {s['runs']} runs diverged: figures over the rest)"
            if r is None:
                r = dict.fromkeys(("forget_acc", "remain_acc", "fd_ratio", "fd_to_retrained", "inversion_fa",
                                   "relearn_fa"))
            ratio = f"{s['seconds'][0] / official[0]:.2f}x" if official else "–"
            lines.append(f"| {name} | {s['setting']} | {cell(r['forget_acc'])} | {cell(r['remain_acc'])} "
                         f"| {cell(r['fd_ratio'], 2)} | {cell(r['fd_to_retrained'], 1)} "
                         f"| {cell(s['steps_to_forget'], 0)} | {s['forgotten_runs']}/{s['runs']} "
                         f"| {s['runs_meeting_targets'] if at == step else '–'}/{s['runs']} | {cell(s['seconds'], 0)} "
                         f"| {ratio} | {cell(r['inversion_fa'], 2)} | {cell(r['relearn_fa'], 2)} |")
    refs = [f"| digit {c} | {reference_cell(r['original'])} | "
            f"{reference_cell(r['retrained'], r.get('retrained_range'))} ({r['retrained_from']}) |"
            for c, r in sorted(references.items())]
    return ("\n".join(lines) + "\n\n| reference | original | retrained |\n| --- | --- | --- |\n" + "\n".join(refs)
            + "\n")


def reference_cell(report, spread=None):
    """A reference model's numbers in one table cell (the attacks' where they ran); spread: {key: [min, max]} over
    several references, whose mean `report` holds, shown beside each figure when they differ."""
    def figure(key, digits):
        low, high = (spread or {}).get(key, (report[key], report[key]))
        return f"{report[key]:.{digits}f}" + (f" [{low:.{digits}f}-{high:.{digits}f}]" if low != high else "")
    text = (f"forget acc {figure('forget_acc', 3)}, remain acc {figure('remain_acc', 4)}, remain FD "
            f"{figure('fd_remain', 1)}")
    if "inversion_fa" in report:
        text += f"; after inversion {figure('inversion_fa', 2)}, after relearning {figure('relearn_fa', 2)}"
    return text


TRADE_TARGETS = (REMAIN_MARGIN, ATTACK_MARGIN)  # the R target (remain accuracy lost) and the I target (inversion excess)
TRADE_DPI = 120


def trade_size(count):
    """The trade plot's size in inches for `count` panels (in pixels: times TRADE_DPI)."""
    return 6.0 * count + 3.0, 5.0


def plot_curves(summary, path):
    """Forget accuracy and remain FD ratio against steps for every row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = plt.cm.tab20.colors  # up to 20 rows, each its own colour
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for ax in axes:
        ax.set_prop_cycle(color=colors)
    for row, s in summary.items():
        steps = sorted(s["steps"])
        for ax, key in zip(axes, ("forget_acc", "fd_ratio")):
            ax.plot(steps, [s["steps"][step][key][0] for step in steps], marker="o", label=row)
    axes[0].set(xlabel="unlearning step", ylabel="forget accuracy (lower: forgotten)")
    axes[1].set(xlabel="unlearning step", ylabel="remain FD / original's (lower: preserved)", yscale="log")
    axes[1].legend(fontsize=6)
    atomic_save_figure(fig, path)


def spread(values):
    """[mean, min, max] of a list of numbers."""
    return [statistics.mean(values), min(values), max(values)]


def trade_summary(result):
    """{step, inversion_steps, rows: {row: {remain_lost, excess, runs, diverged}}} of a comparison's last step."""
    # remain_lost: the original's remain accuracy minus the run's; excess: the run's forget accuracy after label
    # inversion minus the retrained model's at the same budget (without the attacks, inversion_steps None: its forget
    # accuracy minus the retrained model's); each [mean, min, max] over the row's runs that reached the last step
    step, references = str(result["protocol"]["steps"]), {str(k): v for k, v in result["references"].items()}
    finals = [(r, r["steps"][step]) for r in result["runs"] if step in r["steps"]]
    key = "inversion_fa" if finals and all("inversion_fa" in f for _, f in finals) else "forget_acc"
    rows = {}
    for row in dict.fromkeys(r["row"] for r in result["runs"]):
        mine = [(r, f) for r, f in finals if r["row"] == row]
        if not mine:  # every run diverged: no point to draw
            continue
        ref = [references[str(r["forget_class"])] for r, _ in mine]
        rows[row] = {"remain_lost": spread([x["original"]["remain_acc"] - f["remain_acc"] for x, (_, f) in
                                            zip(ref, mine)]),
                     "excess": spread([f[key] - x["retrained"][key] for x, (_, f) in zip(ref, mine)]),
                     "runs": len(mine), "diverged": sum(1 for r in result["runs"] if r["row"] == row) - len(mine)}
    budget = result["protocol"].get("inversion_steps") if key == "inversion_fa" else None
    return {"step": int(step), "inversion_steps": budget, "rows": rows}


ABLATION_MARKERS = "^v<>DPX*d"


def trade_styles(rows):
    """{row: (marker, colour)}: methods circles, distilled baselines squares, ablations other shapes."""
    # a colour per method; a distilled baseline takes its base method's, the ablation of sfron-adversarial
    # sfron-adversarial's
    import matplotlib.pyplot as plt
    colors = plt.cm.tab10.colors
    methods = [r for r in rows if not r.startswith(ABLATED) and not r.endswith("+distill")]
    styles = {row: ("o", colors[i % 10]) for i, row in enumerate(methods)}
    spare = len(methods)
    for row in rows:
        if row.endswith("+distill"):
            base = styles.get(row[:-len("+distill")])
            if base is None:
                base, spare = ("o", colors[spare % 10]), spare + 1
            styles[row] = ("s", base[1])
    default = styles.get(ADVERSARIAL_ROW, ("o", "0.3"))[1]
    ablated = [r for r in rows if r.startswith(ABLATED)]
    styles.update({row: (ABLATION_MARKERS[i % len(ABLATION_MARKERS)], default) for i, row in enumerate(ablated)})
    return styles


def trade_points(ax, trade, styles):
    """A point per row at the mean of its runs, bars from their min to their max."""
    for row, t in trade["rows"].items():
        (x, x_lo, x_hi), (y, y_lo, y_hi) = t["remain_lost"], t["excess"]
        marker, color = styles[row]
        label = row + (f" ({t['diverged']} diverged)" if t["diverged"] else "")
        ax.errorbar(x, y, xerr=[[x - x_lo], [x_hi - x]], yerr=[[y - y_lo], [y_hi - y]], marker=marker, color=color,
                    markersize=7, capsize=2, elinewidth=0.8, alpha=0.85, linestyle="none", label=label)


def trade_frame(ax, dataset, trade):
    """A trade panel's axes: symmetric log x (linear up to the R target), the targets' region shaded, the labels."""
    import matplotlib.ticker
    rows, attacked = trade["rows"].values(), trade["inversion_steps"] is not None
    x_target, y_target = TRADE_TARGETS[0], TRADE_TARGETS[1] if attacked else FORGOTTEN_MARGIN
    ax.set_xscale("symlog", linthresh=x_target, linscale=1.0)
    ax.set_xlim(-x_target, max([5 * x_target] + [1.2 * t["remain_lost"][2] for t in rows]))
    ax.set_ylim(min([-0.1] + [t["excess"][1] - 0.05 for t in rows]), max([0.2] + [t["excess"][2] + 0.05 for t in rows]))
    (left, right), (bottom, _) = ax.get_xlim(), ax.get_ylim()
    ticks = [t for t in (-0.01, 0, 0.01, 0.03, 0.1, 0.3, 1) if left <= t <= right]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.fill_between([left, x_target], bottom, y_target, color="tab:green", alpha=0.15, linewidth=0,
                    label=f"targets R and {'I' if attacked else 'F'}: x \u2264 {x_target:g}, y \u2264 {y_target:g}")
    ax.axhline(0, color="0.6", linewidth=0.6, zorder=0)
    ax.axvline(0, color="0.6", linewidth=0.6, zorder=0)
    what = (f"forget acc after {trade['inversion_steps']} label-inversion steps" if attacked else
            "forget acc under its label (no attacks ran)")
    ax.set_xlabel("remain accuracy lost against the original\n(symmetric log scale, linear below 0.01)")
    ax.set_ylabel(f"{what}\nabove the retrained model's")
    ax.set_title(f"{dataset}, step {trade['step']}: mean over runs, bars min to max", fontsize=9)


def plot_trade(panels, path):
    """The trade plot, one panel per (dataset, trade_summary) in `panels`, one legend outside the panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not panels:
        raise ValueError("plot_trade needs at least one (dataset, trade) panel")
    order = list(dict.fromkeys(row for _, trade in panels for row in trade["rows"]))
    styles = trade_styles(order)
    fig, axes = plt.subplots(1, len(panels), figsize=trade_size(len(panels)), dpi=TRADE_DPI, squeeze=False)
    for ax, (dataset, trade) in zip(axes[0], panels):
        trade_points(ax, trade, styles)
        trade_frame(ax, dataset, trade)
    handles = {}
    for ax in axes[0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    axes[0][-1].legend(list(handles.values()), list(handles), fontsize=7, loc="upper left",
                       bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    atomic_save_figure(fig, path)


def load_result(report_dir):
    """The comparison.json of a report folder, or one clear error."""
    path = os.path.join(report_dir, "comparison.json")
    if not os.path.isfile(path):
        raise UserError(f"no comparison.json in {report_dir}: run bench/compare.py with --report-dir {report_dir} "
                        "first")
    try:
        with open(path) as f:
            result = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSON ({e})")
    if not isinstance(result, dict) or not all(k in result for k in ("protocol", "references", "runs", "spread")) \
            or "steps" not in result["protocol"]:
        raise UserError(f"{path} is not a comparison of bench/compare.py (it needs protocol.steps, references, runs "
                        "and spread)")
    return result


def with_summary(result):
    """A comparison read back from JSON, its references keyed by digit again, its summary gathered from its runs."""
    references = {int(k): v for k, v in result["references"].items()}
    return {**result, "references": references, "summary": summarise(result["runs"], references)}


def write_report(result, args):
    """comparison.json, comparison.md, curves.png and tradeoff.png (and a panel per --trade-panels) to --report-dir."""
    others = [load_result(folder) for folder in getattr(args, "trade_panels", None) or []]
    os.makedirs(args.report_dir, exist_ok=True)
    atomic_json_dump(result, os.path.join(args.report_dir, "comparison.json"))
    table = markdown(result["summary"], result["references"], result["protocol"], result["spread"])
    atomic_write_text(table, os.path.join(args.report_dir, "comparison.md"))
    plot_curves(result["summary"], os.path.join(args.report_dir, "curves.png"))
    plot_trade([(r["protocol"].get("dataset", "digits"), trade_summary(r)) for r in [result] + others],
               os.path.join(args.report_dir, "tradeoff.png"))
    print(table)
    print(f"Saved comparison.json, comparison.md, curves.png and tradeoff.png to {args.report_dir}")


def tuning_markdown(tuning, chosen, budgets):
    """The tuning stage: per method and configuration, the targets each tuning digit's final checkpoint misses and
    its remain FD ratio, the configuration's score, and which one was chosen (budgets: the attacks' that I and L were
    judged at)."""
    inversion, relearning = attack_columns(budgets)
    # a tuning saved before a digit had a second reference records no count: it was judged against one
    counts = {}
    for trials in tuning.values():
        for digits in trials.values():
            for d, r in digits.items():
                counts.setdefault(d, set()).add(r.get("references", 1))
    judged = ", ".join(f"digit {d}: {' or '.join(map(str, sorted(n)))}" for d, n in sorted(counts.items()))
    lines = [f"Targets: {TARGETS}; I and L judged on the {inversion} and {relearning}. Retrained references "
             f"judged against: {judged}.", "",
             "| method | configuration | per tuning digit: targets missed (remain FD ratio) | targets missed, summed "
             "| mean remain FD ratio | chosen |", "| --- | --- | --- | --- | --- | --- |"]
    for method, trials in tuning.items():
        for name, digits in trials.items():
            cells = "; ".join(f"{d}: {r['missed'] or 'none'} ({r['fd_ratio']:.2f})" for d, r in digits.items())
            missed, ratio = score([r["missed"] for r in digits.values()], [r["fd_ratio"] for r in digits.values()])
            mark = "**chosen**" if name == chosen[method]["name"] else ""
            lines.append(f"| {method} | {name} | {cells} | {missed} | {ratio:.2f} | {mark} |")
    return "\n".join(lines) + "\n"


def write_tuning(tuning, chosen, args):
    """tuning.json and tuning.md to --report-dir."""
    os.makedirs(args.report_dir, exist_ok=True)
    atomic_json_dump({"tuning_digits": args.tuning_classes, "tuning": tuning, "chosen": chosen},
                     os.path.join(args.report_dir, "tuning.json"))
    atomic_write_text(tuning_markdown(tuning, chosen, attack_budgets(vars(args))),
                      os.path.join(args.report_dir, "tuning.md"))


def rewrite_tuning(report_dir, protocol):
    """tuning.md again from the tuning.json of a report folder (if it has one), at the comparison's attack budgets."""
    path = os.path.join(report_dir, "tuning.json")
    if os.path.isfile(path):
        saved = json.load(open(path))
        atomic_write_text(tuning_markdown(saved["tuning"], saved["chosen"], attack_budgets(protocol)),
                          os.path.join(report_dir, "tuning.md"))
