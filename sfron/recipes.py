"""
forget.py's named recipes: each sets every flag that shapes the update (the step, the forget term, the remain
term, which mask of a folder: its Fisher threshold or SalUn's sparsity, and the rates), so that a run's update is one
word on the command line. A flag given on the command line overrides the recipe's value; the run's log and run.json
hold the resolved settings.

`official` is the update of the official SFR-on DiT forget.py, exactly. The official script also parses
--decay-forget-alpha and --remain-alpha and never reads them; here they do what they say, and official_differences()
names, for the run's log, every setting that makes a run compute something the official code would not.
"""
from dataclasses import dataclass
from types import MappingProxyType

from .unlearn import UnlearnSettings
from .utils import UserError

# The flags every recipe sets (forget.py's argument names).
RECIPE_FIELDS = ("method", "unlearn_loss", "forget_alpha", "decay_forget_alpha", "esd_eta", "adversarial_steps",
                 "remain_loss", "remain_alpha", "lr", "remain_lr", "grad_clip", "separate_forget_optimizer",
                 "mask_remain_step", "remain_projection", "threshold", "sparsity")


@dataclass(frozen=True)
class Recipe:
    """A named setting of forget.py's update flags; `summary` is its one line in --help."""
    name: str
    summary: str
    values: MappingProxyType

    def resolve(self, given, explicit):
        """(values, overridden): `given` (forget.py's {argument: value}) with this recipe's value for each
        argument the command line did not set (`explicit`: the names it set); overridden maps each recipe argument
        the command line set to (the recipe's value, the given one)."""
        values, overridden = dict(given), {}
        for name, value in self.values.items():
            if name not in explicit:
                values[name] = value
            elif given[name] != value:
                overridden[name] = (value, given[name])
        return values, overridden

    def settings(self, fields):
        """The UnlearnSettings of this recipe's update (its mask threshold aside), with the {field: value} mapping
        `fields` over it (forget_class at least)."""
        names = set(UnlearnSettings.field_names())
        return UnlearnSettings.from_fields({**{k: v for k, v in self.values.items() if k in names}, **fields})


def _recipe(name, summary, values):
    """A Recipe that sets exactly RECIPE_FIELDS."""
    missing = set(RECIPE_FIELDS) ^ set(values)
    if missing:
        raise ValueError(f"recipe {name} must set exactly {RECIPE_FIELDS}; differs in {sorted(missing)}")
    return Recipe(name, summary, MappingProxyType(values))


_OFFICIAL = dict(method="ron", unlearn_loss="ga", forget_alpha=1.0, decay_forget_alpha=False, esd_eta=1.0,
                 adversarial_steps=0, remain_loss="diffusion", remain_alpha=1.0, lr=1e-5, remain_lr=None,
                 grad_clip=1.0, separate_forget_optimizer=False, mask_remain_step=False, remain_projection=False,
                 threshold=1.0, sparsity=None)
_MASKED_ESD_DISTILL = {**_OFFICIAL, "unlearn_loss": "esd", "remain_loss": "distill", "lr": 4e-3, "remain_lr": 2e-3,
                       "separate_forget_optimizer": True, "mask_remain_step": True, "threshold": 5.0}

RECIPES = {r.name: r for r in (
    _recipe("official",
            "the official SFR-on DiT update: gradient ascent at a constant forget weight, one AdamW, the forget step "
            "masked and clipped, the remain step on the diffusion loss unmasked (lr 1e-5, the official default)",
            _OFFICIAL),
    _recipe("masked-esd-distill",
            "ESD's negatively guided target for the forget label, inside a gamma-5 Fisher mask with its own AdamW, "
            "then a masked remain step that distils the frozen original's predictions (lr 4e-3, remain lr 2e-3: "
            "chosen on the digits DiT)",
            _MASKED_ESD_DISTILL),
    _recipe("adversarial-esd-distill",
            "masked-esd-distill whose forget term also acts under an adversarial label (one label-inversion step per "
            "step), with a remain step at the forget rate whose gradient loses its part against the forget step's "
            "(lr and remain lr 4e-3: chosen on the digits DiT)",
            {**_MASKED_ESD_DISTILL, "adversarial_steps": 1, "remain_lr": 4e-3, "remain_projection": True}),
    _recipe("salun-distill",
            "SalUn's step (the forget label's prediction pulled toward the model's own for the next label, one "
            "clipped AdamW step on both terms inside SalUn's gradient mask of sparsity 0.5) with the distilled "
            "remain term (lr 4.5e-4: the comparison's tuning on digits 2 and 7)",
            {**_OFFICIAL, "method": "joint", "unlearn_loss": "salun", "remain_loss": "distill", "lr": 4.5e-4,
             "sparsity": 0.5}),
)}
# demo.py's; forget.py's own default is "official". No recipe meets the five targets on 16 of the digits' 20 runs;
# salun-distill meets them on the most (docs/recipes.md).
DEFAULT_RECIPE = "salun-distill"


def get_recipe(name):
    """The Recipe called name, or one clear error."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name}; choose from {', '.join(RECIPES)}")
    return RECIPES[name]


def mask_setting(flags, name):
    """Which mask of a folder forget.py's command line `flags` (strings) asks for: its "threshold" or "sparsity",
    the last one given, else its --recipe's (None where neither sets it)."""
    def last(flag, default):
        return flags[len(flags) - 1 - flags[::-1].index(flag) + 1] if flag in flags else default
    value = last(flag(name), RECIPES[last("--recipe", "official")].values[name])
    return None if value is None else float(value)


def recipe_help():
    """One line per recipe, for --help."""
    return "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values())


def flag(name):
    """The command-line flag of an argument name."""
    return "--" + name.replace("_", "-")


def flag_text(name, value):
    """How a value reads on the command line: --x 0.1, or --x / --no-x for a switch."""
    if isinstance(value, bool):
        return flag(name) if value else "--no-" + name.replace("_", "-")
    return f"{flag(name)} {value}"


def official_differences(settings, masked):
    """
    One line naming what this run computes differently from the official DiT forget.py with the same flags, and
    how to get the official run; None when nothing differs. settings: UnlearnSettings; masked: whether a saliency
    mask is loaded.
    """
    parts = []
    if settings.forget.decay_forget_alpha:
        parts.append("--decay-forget-alpha decays the forget weight by a cosine here (as in the authors' DDPM code); "
                     "the official DiT script parses it and keeps the weight constant")
    if settings.remain.remain_alpha != 1:
        parts.append(f"--remain-alpha {settings.remain.remain_alpha} weights the remain term here; the official DiT "
                     f"script parses it and weights the remain loss by 1")
    if settings.step.method == "joint" and (masked or settings.step.grad_clip > 0):
        parts.append("--method joint masks and clips the joint gradient here (SalUn's step); the official joint step "
                     "does neither (no --mask-path and --grad-clip 0 give it)")
    if not parts:
        return None
    return ("Differs from the official DiT forget.py: " + "; ".join(parts) +
            ". --recipe official without these flags computes the official update.")
