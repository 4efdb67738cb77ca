"""A declared experiment (``configs/experiments/<name>.json``): data, recipes, methods and seeds, checked on load.

Keys: ``name``, ``title``, ``description``; ``phantoms`` (``n``, ``min_size``, ``max_size``: the phantom set, made
with ``seeds.data``; ``family``: one of :data:`~xmark_bundle.data.phantoms.FAMILIES`, default
``classic``); ``seeds`` (by role, disjoint, :mod:`~xmark_bundle.experiments.protocol`: ``data``: the phantom
seed this run uses, ``development``: the phantom seed the settings were chosen on, ``surrogate``, ``owners``,
``independent_owners``, ``independent_phantoms``: the disjoint phantom set of the last independent owner,
``suspects``: the malicious suspects' seeds, trained on every owner's release); ``protocol`` (optional: ``legacy``
for a declaration published before the protocol, seeds ``data``, ``development`` and ``suspects`` only);
``classifier`` (overrides of configs/train_classifier.json for the surrogates and suspects; ``image_size`` is also
the query size); ``suspect``
(extra overrides for suspects only); ``suspect_variants`` (optional: name -> overrides of one kind of malicious
suspect, e.g. another ``arch`` or ``image_size``, ``configs``: override files for its training (e.g.
``configs/train_classifier_strong_aug.json``), ``evasion``: a defence applied to the release before training,
:data:`~xmark_bundle.experiments.evasion.EVASIONS`; each is trained for every suspect seed and queried at its own
size); ``methods`` (name -> ``kind`` ``generator`` (configs/train.json plus ``configs`` override files and
``settings``) or ``trigger`` (configs/trigger.json with ``settings``), ``gamma``, ``decoy_fraction``, ``vet_key``,
``default``: false for a method that runs only when asked for); ``benign`` (a list of ``{"arch", "seeds",
"overrides"}``: models trained on the clean data, ``overrides`` optional); ``verification`` (overrides of
configs/verify.json); ``independent_families`` (optional, default false: a generator method's pool is also trained
against each independent owner's surrogate on its data, so Ind-W gets the calibrated verdict too; a trigger's pool
serves them already); ``detectability`` (optional, default false: per method, how well a data user finds the marked
files, :mod:`~xmark_bundle.experiments.detectability`, with the first malicious suspect); ``pretrain`` (optional:
``seed``, ``phantoms`` {``n``, ``min_size``, ``max_size``}, ``max_epochs``: a classifier per architecture and size
trained on that disjoint phantom set, from which every suspect and benign model starts); ``removal`` (optional:
``clean_fraction``, ``learning_rate``, ``head_epochs``, ``full_epochs``, ``prune_rates``, ``prune_epochs``: each
malicious suspect fine-tuned on a clean share of the training split, the head only or every layer, or fine-pruned
(its dormant penultimate units pruned at each rate, then every layer fine-tuned for ``prune_epochs``), and verified
again; ``kept_checkpoint`` ``best`` (default) or ``last``: which epoch of a fine-tuning is measured); ``publish``
(optional:
results name -> indexes of the tables it holds; default: one results.json named like the experiment with every
table). A declaration with ``"task": "segmentation"`` is a StealthMark experiment, checked and run by
:mod:`~xmark_bundle.experiments.segmentation` (its own keys); ``task`` absent or ``"classification"``: the keys above.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmark_bundle.data.phantoms import FAMILIES
from xmark_bundle.experiments.evasion import EVASIONS
from xmark_bundle.experiments.protocol import (
    ExperimentError,
    SeedRoles,
    check_legacy,
    is_legacy,
    legacy_roles,
    seed_roles,
)
from xmark_bundle.experiments.segmentation import (
    SegmentationExperiment,
    is_segmentation,
    load_segmentation_experiment,
)
from xmark_bundle.networks.classifier import KEPT_CHECKPOINTS

__all__ = ["Experiment", "ExperimentError", "Method", "load_experiment"]

KINDS = ("generator", "trigger")
#: The bundle root: config files a declaration names are relative to it (the runner runs from there).
BUNDLE_ROOT = Path(__file__).resolve().parents[2]
#: Where published results lie (docs/experiments/<name>/results.json): a legacy declaration needs its own there.
PUBLISHED = BUNDLE_ROOT / "docs" / "experiments"


#: The keys a declaration's ``removal`` may hold.
REMOVAL_KEYS = {
    "clean_fraction",
    "learning_rate",
    "head_epochs",
    "full_epochs",
    "prune_rates",
    "prune_epochs",
    "kept_checkpoint",
}


@dataclass(frozen=True)
class Method:
    """One watermarking method of an experiment and how its release is made."""

    name: str
    kind: str
    configs: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    gamma: float = 0.1
    decoy_fraction: float = 0.0
    vet_key: bool = False
    default: bool = True


@dataclass(frozen=True)
class Experiment:
    """A declared experiment (see the module docstring for the keys)."""

    name: str
    title: str
    description: str
    phantoms: Mapping[str, Any]
    seeds: Mapping[str, Any]
    classifier: Mapping[str, Any]
    suspect: Mapping[str, Any]
    methods: Mapping[str, Method]
    benign: tuple[tuple[str, int, Mapping[str, Any]], ...]
    verification: Mapping[str, Any]
    source: Path
    publish: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    suspect_variants: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"": {}})
    detectability: bool = False
    independent_families: bool = False
    pretrain: Mapping[str, Any] = field(default_factory=dict)
    removal: Mapping[str, Any] = field(default_factory=dict)
    roles: SeedRoles | None = None
    legacy: bool = False

    @property
    def data_seed(self) -> int:
        return int(self.seeds["data"])

    @property
    def seed_roles(self) -> SeedRoles:
        """The seeds by role (for a legacy declaration, the implicit ones it ran with)."""
        return self.roles or legacy_roles(self.seeds, (seed for _, seed, _ in self.benign))

    @property
    def query_size(self) -> int:
        return int(self.classifier.get("image_size", 224))

    def kind_of(self, recipe: Mapping[str, Any]) -> tuple[str, int]:
        """The architecture and input size a classifier recipe (suspect or benign overrides) trains at."""
        return str(recipe.get("arch", self.classifier.get("arch", "resnet18"))), int(
            recipe.get("image_size", self.query_size)
        )

    def only(self, methods: list[str] | None) -> Experiment:
        """This experiment restricted to ``methods`` (names it declares; None: the methods run by default)."""
        if methods is None:
            methods = [name for name, method in self.methods.items() if method.default]
        unknown = [m for m in methods if m not in self.methods]
        if unknown:
            raise ExperimentError(self.source, f"declares no method {unknown}; it has {sorted(self.methods)}")
        return Experiment(**{**self.__dict__, "methods": {m: self.methods[m] for m in methods}})


def load_experiment(path: str | os.PathLike, published: Path = PUBLISHED) -> Experiment | SegmentationExperiment:
    """Read and check a declaration (its seeds under :mod:`~xmark_bundle.experiments.protocol`); every problem is an
    :class:`ExperimentError` naming the file. ``published``: the folder of published results a legacy declaration
    needs its own in. A ``"task": "segmentation"`` declaration is checked by
    :func:`~xmark_bundle.experiments.segmentation.load_segmentation_experiment`."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ExperimentError(path, f"cannot be read as JSON ({err})") from err
    if is_segmentation(raw, path):
        return load_segmentation_experiment(path, raw)
    required = ("name", "title", "phantoms", "seeds", "classifier", "methods", "benign")
    missing = [key for key in required if key not in raw]
    if missing:
        raise ExperimentError(path, f"lacks {missing}")
    if raw["name"] != path.stem:
        raise ExperimentError(path, f"names experiment {raw['name']!r}; the file must be called {raw['name']}.json")
    seeds = raw["seeds"]
    legacy = is_legacy(raw, path)
    if not {"data", "development", "suspects"} <= set(seeds) or not seeds["suspects"]:
        raise ExperimentError(path, "seeds needs 'data', 'development' and a non-empty list 'suspects'")
    methods = {}
    for name, spec in raw["methods"].items():
        if spec.get("kind") not in KINDS:
            raise ExperimentError(path, f"method {name!r}: kind must be one of {KINDS}, got {spec.get('kind')!r}")
        unknown = set(spec) - {"kind", "configs", "settings", "gamma", "decoy_fraction", "vet_key", "default"}
        if unknown:
            raise ExperimentError(path, f"method {name!r}: unknown keys {sorted(unknown)}")
        methods[name] = Method(name=name, **{**spec, "configs": tuple(spec.get("configs", ()))})
    if not methods:
        raise ExperimentError(path, "declares no method")
    benign = tuple(
        (str(group["arch"]), int(seed), dict(group.get("overrides", {})))
        for group in raw["benign"]
        for seed in group["seeds"]
    )
    if not benign:
        raise ExperimentError(path, "needs at least one benign model (Ind-M)")
    repeated = sorted({f"{arch} seed {seed}" for arch, seed, o in benign if benign.count((arch, seed, o)) > 1})
    if repeated:
        raise ExperimentError(path, f"benign declares the same model more than once: {repeated}")
    publish = {name: tuple(int(i) for i in indexes) for name, indexes in raw.get("publish", {}).items()}
    if legacy:
        check_legacy(path, raw["name"], publish, int(seeds["data"]), published)
        roles = None
    else:
        roles = seed_roles(path, seeds, (seed for _, seed, _ in benign))
    pretrain_phantoms = raw.get("pretrain", {}).get("phantoms", {})
    for where, spec in (("phantoms", raw["phantoms"]), ("pretrain.phantoms", pretrain_phantoms)):
        if spec.get("family", "classic") not in FAMILIES:
            raise ExperimentError(path, f"{where}: family must be one of {FAMILIES}, got {spec['family']!r}")
    pretrain = raw.get("pretrain", {})
    if pretrain and not (
        {"seed", "phantoms"} <= set(pretrain) and {"n", "min_size", "max_size"} <= set(pretrain["phantoms"])
    ):
        raise ExperimentError(path, "pretrain needs 'seed' and 'phantoms' with 'n', 'min_size' and 'max_size'")
    phantom_seeds = (int(seeds["data"]), int(seeds["development"]), seeds.get("independent_phantoms"))
    if pretrain and int(pretrain["seed"]) in phantom_seeds:
        raise ExperimentError(path, "pretrain's phantom seed must differ from the other phantom sets' seeds")
    removal = raw.get("removal", {})
    unknown = set(removal) - REMOVAL_KEYS
    if unknown:
        raise ExperimentError(path, f"removal: unknown keys {sorted(unknown)}")
    if removal.get("kept_checkpoint", "best") not in KEPT_CHECKPOINTS:
        raise ExperimentError(path, f"removal: kept_checkpoint must be one of {KEPT_CHECKPOINTS}")
    if not all(0 <= float(rate) < 1 for rate in removal.get("prune_rates", [])):
        raise ExperimentError(path, f"removal: prune_rates must lie in [0, 1), got {removal['prune_rates']}")
    for flag in ("detectability", "independent_families"):
        if not isinstance(raw.get(flag, False), bool):
            raise ExperimentError(path, f"{flag} must be true or false, got {raw[flag]!r}")
    if raw.get("independent_families") and not seeds.get("family_pool"):
        raise ExperimentError(path, "independent_families needs seeds.family_pool (the pool's seeds)")
    if not raw.get("suspect_variants", {"": {}}):
        raise ExperimentError(path, "suspect_variants, when given, names at least one kind of suspect")
    for variant, overrides in raw.get("suspect_variants", {}).items():
        if overrides.get("evasion", next(iter(EVASIONS))) not in EVASIONS:
            raise ExperimentError(path, f"suspect variant {variant!r}: evasion must be one of {sorted(EVASIONS)}")
        missing = [c for c in overrides.get("configs", []) if not (BUNDLE_ROOT / c).is_file()]
        if missing:
            raise ExperimentError(path, f"suspect variant {variant!r}: no config file {missing}")
    return Experiment(
        name=raw["name"],
        title=raw["title"],
        description=raw.get("description", ""),
        phantoms=raw["phantoms"],
        seeds=seeds,
        classifier=raw["classifier"],
        suspect=raw.get("suspect", {}),
        methods=methods,
        benign=benign,
        verification=raw.get("verification", {}),
        source=path,
        publish=publish,
        suspect_variants=raw.get("suspect_variants", {"": {}}),
        detectability=raw.get("detectability", False),
        independent_families=raw.get("independent_families", False),
        pretrain=raw.get("pretrain", {}),
        removal=raw.get("removal", {}),
        roles=roles,
        legacy=legacy,
    )
