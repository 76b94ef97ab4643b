"""
The comparison's protocol (README: "The comparison"), as data: every method as forget.py flags, the configurations
it is tuned over (the same number for every method), the digits it is tuned and evaluated on, the criterion that
picks its configuration, and the ablation of the adversarial-esd-distill recipe (sfron-adversarial). bench/compare.py
runs it.

Every method gets CONFIGURATIONS configurations: its learning rate at 1/3, 1 and 3 times its base rate, and its one
knob's other value at the base rate; a method without a knob gets a fourth rate instead, 1/9 of the base. The base
rate is the method's rate in this repository: the digits' 1.5e-4 for every baseline and the official recipe (demo.py
runs the official recipe at it), the recipe's 4e-3 (forget and remain step alike) for sfron-adversarial, the
adversarial-esd-distill recipe. demo.py's default recipe, salun-distill, is salun+distill at the configuration this
protocol chose.
"""
from dataclasses import dataclass, replace

CONFIGURATIONS = 4
TUNING_DIGITS = (2, 7)               # adversarial-esd-distill was chosen on 1, 2, 4, 7 and 8 (docs/recipes.md)
HELD_OUT_DIGITS = (0, 3, 5, 6, 9)    # adversarial-esd-distill's own choices touched 0 and 5 (docs/recipes.md)
EVAL_STEPS = (10, 25, 50, 100)
UNO_OWN_STEPS = 4                    # UNO forgets ImageNet class 207 in 3.5 steps on average (its paper)
BASELINE_RATE, ADVERSARIAL_RATE = 1.5e-4, 4e-3


@dataclass(frozen=True)
class Setting:
    """One configuration as the benchmark runs it: the name its units start with (<name>-<digit>-seed<seed>), its
    forget.py flags (the rate included) and the saliency mask they need ("fisher", "gradient" or None)."""
    name: str
    flags: tuple
    mask: str = None

    def over(self, name, extra):
        """This setting with forget.py flags `extra` after its own (later flags win), under another name; the
        benchmark's own --no-mask drops the mask."""
        mask = None if NO_MASK in extra else self.mask
        return Setting(name, self.flags + tuple(f for f in extra if f != NO_MASK), mask)


@dataclass(frozen=True)
class Method:
    """A method of the comparison: forget.py flags, the base rate of its grid, and its knob (flag, own value, the
    other value tried), if any. mask: the saliency mask its flags need ("fisher": the Fisher mask at --threshold,
    "gradient": SalUn's at --sparsity, None: no mask). both_rates: the rate is the forget and the remain step's."""
    name: str
    flags: tuple
    base_lr: float = BASELINE_RATE
    knob: tuple = ()
    mask: str = None
    both_rates: bool = False

    def configurations(self):
        """The CONFIGURATIONS Settings this method is tuned over; the first is its base rate at its own knob."""
        grid = [(self.base_lr, ()), (self.base_lr / 3, ()), (3 * self.base_lr, ())]
        grid.append((self.base_lr, (self.knob[0], self.knob[2])) if self.knob else (self.base_lr / 9, ()))
        return [self.setting(lr, extra) for lr, extra in grid]

    def setting(self, lr, extra=()):
        """The Setting of this method at rate lr with forget.py flags `extra` over its own."""
        rates = ["--lr", f"{lr:.3g}"] + (["--remain-lr", f"{lr:.3g}"] if self.both_rates else [])
        own_knob = [self.knob[0], self.knob[1]] if self.knob else []
        label = f"lr{lr:.3g}" + "".join(f"{f.strip('-')}" if f.startswith("--") else f for f in extra)
        return Setting(f"{self.name}-{label}", tuple(self.flags) + tuple(own_knob + rates) + tuple(extra), self.mask)

    def mask_flags(self, mask_path):
        """forget.py flags of this method at its base rate and own knob, its mask given as mask_path (SLURM
        arrays)."""
        return list(self.setting(self.base_lr).flags) + (["--mask-path", mask_path] if self.mask else [])

    def mask_args(self):
        """generate_mask.py flags that make the mask this method's own knob asks for ([] without a mask)."""
        if self.mask == "fisher":
            return ["--thresholds", self.knob[1]]
        if self.mask == "gradient":
            return ["--criterion", "gradient", "--sparsity", self.knob[1]]
        return []


ADVERSARIAL_ROW = "sfron-adversarial"  # the adversarial-esd-distill recipe, demo.py's default before salun-distill
ABLATED = f"{ADVERSARIAL_ROW}, "  # the start of its ablation rows' names: "<ABLATED><row of ABLATIONS>"
JOINT = ("--method", "joint")
BASELINES = (
    Method("ga", JOINT + ("--unlearn-loss", "ga", "--forget-alpha", "1.0", "--remain-alpha", "0")),
    Method("ft", JOINT + ("--forget-alpha", "0", "--remain-alpha", "1.0")),
    Method("rl", JOINT + ("--unlearn-loss", "rl", "--forget-alpha", "1.0", "--remain-alpha", "1.0")),
    Method("salun", JOINT + ("--unlearn-loss", "salun", "--forget-alpha", "1.0", "--remain-alpha", "1.0"),
           knob=("--sparsity", "0.5", "0.8"), mask="gradient"),
    Method("sa", JOINT + ("--unlearn-loss", "sa", "--forget-alpha", "1.0", "--remain-alpha", "1.0",
                          "--replay-samples", "1000", "--num-sampling-steps", "10"),
           knob=("--ewc-lambda", "10", "100")),
    Method("esd", JOINT + ("--unlearn-loss", "esd", "--forget-alpha", "1.0", "--remain-alpha", "0"),
           knob=("--esd-eta", "1.0", "3.0")),
    # UNO's own step: no mask, no clip; its two published orthogonality weights (DiT run 0.02, MNIST VAE 1000)
    Method("uno", JOINT + ("--unlearn-loss", "uno", "--grad-clip", "0", "--forget-alpha", "1.0",
                           "--remain-alpha", "1.0"), knob=("--uno-weight", "0.02", "1000")),
)
SFRON = (
    Method("sfron", ("--recipe", "official"), knob=("--threshold", "1.0", "5.0"), mask="fisher"),
    Method(ADVERSARIAL_ROW, ("--recipe", "adversarial-esd-distill"), base_lr=ADVERSARIAL_RATE,
           knob=("--threshold", "5.0", "2.0"), mask="fisher", both_rates=True),
)
# The baselines with a remain term, with adversarial-esd-distill's distilled remain term instead of the diffusion loss
DISTILLED = tuple(replace(m, name=f"{m.name}+distill", flags=m.flags + ("--remain-loss", "distill"))
                  for m in BASELINES if m.name in ("ft", "rl", "salun", "sa"))
METHODS = {m.name: m for m in BASELINES + SFRON + DISTILLED}
DEFAULT_ROW = "salun+distill"  # demo.py's default recipe, salun-distill, is this row at its chosen configuration
MAIN_METHODS = [m.name for m in BASELINES + SFRON] + [DEFAULT_ROW]  # evaluated on every held-out digit and seed

# sfron-adversarial (adversarial-esd-distill) with one piece removed, at its chosen configuration: (row name, forget.py
# flags over it).
# "no mask" runs without --mask-path: the mask of gamma = 0, which frees every weight (its own forget optimizer
# stays; the masked remain step has nothing to mask).
ABLATIONS = {
    "ascent instead of ESD's target": ("--unlearn-loss", "ga"),
    "diffusion remain term": ("--remain-loss", "diffusion"),
    "shared optimizer": ("--no-separate-forget-optimizer",),
    "unmasked remain step": ("--no-mask-remain-step",),
    "no mask (gamma 0)": ("--no-mask-remain-step", "--no-mask"),
    "no adversarial label": ("--adversarial-steps", "0"),
    "no remain projection": ("--no-remain-projection",),
}
NO_MASK = "--no-mask"  # not a forget.py flag: the benchmark then gives no --mask-path


def score(missed, fd_ratio):
    """The tuning criterion of one configuration from its final checkpoints on the tuning digits (smaller is
    better): the number of the five targets missed, summed over the digits, then the mean remain FD ratio. A
    configuration that meets every target on every tuning digit therefore wins by the smallest remain distance."""
    return (sum(len(m) for m in missed), sum(fd_ratio) / len(fd_ratio))
