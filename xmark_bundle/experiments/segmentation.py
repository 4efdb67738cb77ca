"""StealthMark experiments (segmentation-model ownership, the ``stealthmark/`` bundle) through the same runner.

A declaration ``configs/experiments/<name>.json`` with ``"task": "segmentation"`` is routed here by
:func:`~xmark_bundle.experiments.plan.load_experiment`; the classification declarations are unchanged. Keys:

- ``name``, ``title``, ``description``; ``phantoms`` {``n``, ``min_size``, ``max_size``, ``family`` (default
  ``classic``), ``valid_fraction`` (default 0.3)}: the phantom set with lung masks (``scripts/make_phantoms.py
  --masks``), made with ``seeds.data``.
- ``seeds`` by role: ``data`` (the phantom seed: the report seed of a report declaration), ``development`` (the
  phantom seed the settings were chosen on), ``owners`` (the watermarked models' seeds), ``owner_keys`` (one secret key
  per owner, in the same order), ``benign`` (benign models' seeds: no trigger), ``other_owners`` (models watermarked
  with the same method and trigger but another key) and ``other_keys`` (their keys, one each). Every role is a
  non-empty list of distinct integers and no seed appears in two roles (keys included; the data seed in none):
  :func:`segmentation_roles` refuses a declaration that breaks it and names the roles and the seeds. A report
  declaration (data seed != development seed) needs a data seed >= 1000, >= 3 owners, >= 20 benign models over >= 2
  architectures and >= 3 other keys.
- ``training``: overrides of ``stealthmark/configs/train.json`` for every model (``image_size``, ``max_epochs``,
  ``learning_rate``, ``batch_size``, ``width``, ``val_interval``, ...); ``architectures``: a list of ``arch`` names
  (benign models alternate over them, in order); ``triggers``: a list of trigger names; ``epsilon`` and
  ``trigger_share``: the watermark's floor and share; ``baselines`` (optional, e.g. ``["badnet_seg"]``: trained like
  the watermarked models, with each owner's key and seed); ``decoy_share`` (optional, default 0; a research option for
  keyed triggers only): every StealthMark model (owners', other keys', sweeps') also trains with decoys, a keyed share
  of images carrying the trigger under other keys with the clean target; benign models and baselines never;
  ``verification``: overrides of
  ``stealthmark/configs/verify.json`` (``n_samples``, ``margin_fraction``, ...); ``publish`` as for classification;
  ``sweeps`` (optional): {``epsilon``: [values], ``trigger_share``: [values]}, one setting varied at a time (the other
  as declared): per value, every owner's watermarked model per architecture x trigger, evaluated and verified with its
  own record, and for an epsilon value (the verifier's margin is a quarter of it) every benign model verified with
  each owner's record at that epsilon.

``removal`` (optional): ``finetune_epochs`` (with ``learning_rate`` and ``kept_checkpoint``: the fine-tuner keeps
its best validation epoch, or with ``"last"`` its last one): each owner's watermarked model fine-tuned
from its weights on the clean training split for each number of epochs (``stealthmark/configs/finetune.json``, the
fine-tuner's seeds ``seeds.finetune``, one per owner); ``prune_rates``: each owner's watermarked model pruned at each
rate in (0, 1) (``stealthmark/configs/prune.json``: global L1-magnitude unstructured pruning of every convolution and
linear weight, :mod:`xmark_bundle.stealthmark.pruning`). Each result is evaluated and verified with the owner's
record; the Removal table has a row per architecture x trigger x length or rate.

``false_accusations`` (optional, {``marker_share``: default 0.5}; needs ``seeds.markers`` = [the training markers'
seed, the query markers' seed]): every model's training data carry an ordinary burned-in marker ("L", "R", "AP",
"PORTABLE": ``train.json``'s ``marker_seed`` and ``marker_share``,
:func:`~xmark_bundle.stealthmark.targets.marker_datalist`) on a seeded share of the training images, as hospital
images do, and every verification of an owner's watermarked
model, a benign model or an other-key model runs a second time with a marker on every query (``verify.json``'s
``query_markers``; under ``verification/markers/``). The False accusations table counts, per trigger, query set and
group of models, k of N called the owner's by each test (the floor verdict, the authors' detector, and with
``verification.qr_mode: both`` the authors' grid QR ``qr_a``, the random-mask QR ``qr_b`` and its binomial test
``qr_b_binomial``) with Clopper-Pearson 95 % intervals.

Stages (:class:`~xmark_bundle.experiments.stages.Stages`, each a ``monai.bundle`` command with the bundle's configs):
the phantom set; per architecture x trigger x owner the watermarked model (``method stealthmark``, the owner's key and
seed), its harmlessness (``evaluating``) and its verification with its own record; each baseline the same way; each
benign model (``method none``), evaluated with each trigger and verified with every owner's record of each trigger
(the records of one owner and trigger differ only in the architecture's name, which the black-box verifier does not
read: it queries at the record's input size, which every model of a declaration shares); per architecture x trigger
each other-key model, verified with every owner's record. Layout under the output folder: ``phantoms/``,
``models/<arch>/<trigger>/<method>/owner<o>/``, ``models/<arch>/benign_seed<k>/``,
``models/<arch>/<trigger>/other_keys/seed<s>/``, ``harmlessness/...`` and ``verification/<trigger>/owner<o>/...``.
``collected.json`` holds every number of the tables (:func:`segmentation_tables`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats

from xmark_bundle.experiments.protocol import MIN_REPLICATES, MIN_REPORT_SEED, ExperimentError, seed_list
from xmark_bundle.experiments.stages import MIN_FREE_GB, Stages, bundle_cmd

__all__ = [
    "MIN_BENIGN",
    "SEGMENTATION",
    "SegmentationExperiment",
    "SegmentationRoles",
    "load_segmentation_experiment",
    "run_segmentation",
    "segmentation_plain_words",
    "segmentation_roles",
    "segmentation_tables",
]

#: The value of a declaration's ``task`` key routed here.
SEGMENTATION = "segmentation"
#: Benign models a report declaration needs at least (DESIGN.md §5: >= 20 over >= 2 architectures).
MIN_BENIGN = 20
#: Seed roles, in the order errors name them; the first three are model seeds, then keys, then the optional role.
ROLES = ("owners", "benign", "other_owners", "owner_keys", "other_keys", "finetune", "markers")
#: Roles a declaration may leave out (``finetune``: only with ``removal``; ``markers``: only with
#: ``false_accusations``).
OPTIONAL_ROLES = ("finetune", "markers")
#: The bundle's configs (relative to the repository root, where stages run).
TRAIN, VERIFY, EVALUATE, FINETUNE, PRUNE = (
    f"stealthmark/configs/{name}.json" for name in ("train", "verify", "evaluate", "finetune", "prune")
)
#: The record a training stage writes last (its presence means the stage is done).
RECORD = "stealthmark_record.json"
KNOWN_KEYS = {
    "name",
    "title",
    "description",
    "task",
    "phantoms",
    "seeds",
    "training",
    "architectures",
    "triggers",
    "epsilon",
    "trigger_share",
    "decoy_share",
    "baselines",
    "verification",
    "publish",
    "sweeps",
    "removal",
    "false_accusations",
}
REMOVAL_KEYS = {"finetune_epochs", "learning_rate", "prune_rates", "kept_checkpoint"}
FALSE_ACCUSATION_KEYS = {"marker_share"}
#: The false-accusation table's tests: (column, what a verification's numbers must show for a positive verdict).
FALSE_ACCUSATION_TESTS = ("floor", "authors' detector", "qr_a", "qr_b", "qr_b_binomial")
#: What a declaration's ``sweeps`` may vary (one at a time, the others as declared).
SWEEPS = ("epsilon", "trigger_share")


@dataclass(frozen=True)
class SegmentationRoles:
    """A segmentation declaration's seeds by role (the module docstring); the interface the runner's CLI reads."""

    data: int
    development: int
    owners: tuple[int, ...]
    owner_keys: tuple[int, ...]
    benign: tuple[int, ...]
    other_owners: tuple[int, ...]
    other_keys: tuple[int, ...]
    finetune: tuple[int, ...] = ()
    markers: tuple[int, ...] = ()
    independent_phantoms: None = None

    @property
    def report(self) -> bool:
        """Whether the tables come from fresh data (a data seed other than the development seed)."""
        return self.data != self.development

    def by_role(self) -> dict[str, tuple[int, ...]]:
        return {role: getattr(self, role) for role in ROLES}


@dataclass(frozen=True)
class SegmentationExperiment:
    """A declared StealthMark experiment (see the module docstring for the keys)."""

    name: str
    title: str
    description: str
    phantoms: Mapping[str, Any]
    seeds: Mapping[str, Any]
    roles: SegmentationRoles
    training: Mapping[str, Any]
    architectures: tuple[str, ...]
    triggers: tuple[str, ...]
    epsilon: float
    trigger_share: float
    baselines: tuple[str, ...]
    decoy_share: float
    verification: Mapping[str, Any]
    source: Path
    removal: Mapping[str, Any] = field(default_factory=dict)
    false_accusations: Mapping[str, Any] = field(default_factory=dict)
    sweeps: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    publish: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    pretrain: Mapping[str, Any] = field(default_factory=dict)  # none: kept for the CLI's --family
    legacy: bool = False
    task: str = SEGMENTATION

    @property
    def data_seed(self) -> int:
        return self.roles.data

    @property
    def seed_roles(self) -> SegmentationRoles:
        return self.roles

    @property
    def methods(self) -> dict[str, None]:
        """The embedding methods it trains: stealthmark and its baselines."""
        return dict.fromkeys(("stealthmark", *self.baselines))

    def only(self, methods: list[str] | None) -> SegmentationExperiment:
        """This experiment with only the baselines named in ``methods`` (stealthmark always runs; None: all)."""
        if methods is None:
            return self
        unknown = [m for m in methods if m not in self.methods]
        if unknown:
            raise ExperimentError(self.source, f"declares no method {unknown}; it has {sorted(self.methods)}")
        return SegmentationExperiment(
            **{**self.__dict__, "baselines": tuple(b for b in self.baselines if b in methods)}
        )

    def benign_models(self) -> list[tuple[str, int]]:
        """(architecture, seed) of each benign model: the seeds alternate over the architectures in order."""
        return [(self.architectures[i % len(self.architectures)], seed) for i, seed in enumerate(self.roles.benign)]


def segmentation_roles(path: Path, seeds: Mapping[str, Any]) -> SegmentationRoles:
    """The seeds by role, checked: every role present, no seed in two roles, one key per owner, report rules."""
    required = ("data", "development", *ROLES)
    missing = [key for key in required if key not in seeds and key not in OPTIONAL_ROLES]
    if missing:
        raise ExperimentError(path, f"seeds lacks {missing}: name every seed by its role ({', '.join(required)})")
    unknown = set(seeds) - set(required)
    if unknown:
        raise ExperimentError(path, f"seeds: unknown roles {sorted(unknown)}")
    for key in ("data", "development"):
        if not isinstance(seeds[key], int) or isinstance(seeds[key], bool):
            raise ExperimentError(path, f"seeds.{key} must be an integer seed, got {seeds[key]!r}")
    lists = {role: seed_list(path, seeds, role) if role in seeds else () for role in ROLES}
    roles = SegmentationRoles(data=seeds["data"], development=seeds["development"], **lists)
    collisions = []
    for i, first in enumerate(ROLES):
        for second in ROLES[i + 1 :]:
            shared = sorted(set(lists[first]) & set(lists[second]))
            if shared:
                collisions.append(f"{first} and {second} share {shared}")
    for phantom_role in ("data", "development"):
        used = [role for role in ROLES if seeds[phantom_role] in lists[role]]
        if used:
            collisions.append(f"{phantom_role} seed {seeds[phantom_role]} is also in {', '.join(used)}")
    if collisions:
        raise ExperimentError(path, "seed roles must be disjoint: " + "; ".join(collisions))
    for models, keys in (("owners", "owner_keys"), ("other_owners", "other_keys")):
        if len(lists[models]) != len(lists[keys]):
            raise ExperimentError(path, f"seeds.{keys} needs one key per seed of seeds.{models}")
    if roles.report:
        if roles.data < MIN_REPORT_SEED:
            raise ExperimentError(path, f"report seed {roles.data} < {MIN_REPORT_SEED}: seeds below are development's")
        few = {
            role: len(lists[role])
            for role, least in (("owners", MIN_REPLICATES), ("other_owners", MIN_REPLICATES), ("benign", MIN_BENIGN))
            if len(lists[role]) < least
        }
        if few:
            raise ExperimentError(
                path,
                f"a report declaration needs >= {MIN_REPLICATES} owners and other keys and >= {MIN_BENIGN} "
                f"benign models, got {few}",
            )
    return roles


def load_segmentation_experiment(path: Path, raw: Mapping[str, Any]) -> SegmentationExperiment:
    """Check a raw ``"task": "segmentation"`` declaration read from ``path``; each problem: an ExperimentError."""
    from xmark_bundle.data.phantoms import FAMILIES
    from xmark_bundle.stealthmark.networks import SEGMENTATION_ARCHS
    from xmark_bundle.stealthmark.targets import METHODS
    from xmark_bundle.stealthmark.triggers import TRIGGERS

    required = ("name", "title", "phantoms", "seeds", "training", "architectures", "triggers", "epsilon")
    missing = [key for key in required if key not in raw]
    if missing:
        raise ExperimentError(path, f"lacks {missing}")
    if raw["name"] != path.stem:
        raise ExperimentError(path, f"names experiment {raw['name']!r}; the file must be called {raw['name']}.json")
    removal = raw.get("removal", {})
    if set(removal) - REMOVAL_KEYS:
        raise ExperimentError(path, f"removal: unknown keys {sorted(set(removal) - REMOVAL_KEYS)}")
    if removal and not (removal.get("finetune_epochs") or removal.get("prune_rates")):
        raise ExperimentError(path, "removal declares neither finetune_epochs nor prune_rates")
    if "finetune_epochs" in removal and not (
        removal["finetune_epochs"] and all(int(e) > 0 for e in removal["finetune_epochs"])
    ):
        raise ExperimentError(path, "removal.finetune_epochs must list positive numbers of epochs")
    if removal.get("kept_checkpoint", "best") not in ("best", "last"):
        raise ExperimentError(
            path, f"removal.kept_checkpoint must be 'best' or 'last', got {removal['kept_checkpoint']!r}"
        )
    rates = removal.get("prune_rates", [])
    if not all(0 < float(r) < 1 for r in rates) or len(set(map(float, rates))) < len(rates):
        raise ExperimentError(path, f"removal.prune_rates must be distinct shares in (0, 1), got {rates}")
    if removal.get("finetune_epochs") and "finetune" not in raw["seeds"]:
        raise ExperimentError(
            path, "removal.finetune_epochs needs seeds.finetune (the fine-tuner's seeds, one per owner)"
        )
    unknown = set(raw) - KNOWN_KEYS
    if unknown:
        raise ExperimentError(path, f"unknown keys {sorted(unknown)}")
    if not {"n", "min_size", "max_size"} <= set(raw["phantoms"]):
        raise ExperimentError(path, "phantoms needs 'n', 'min_size' and 'max_size'")
    if raw["phantoms"].get("family", "classic") not in FAMILIES:
        raise ExperimentError(path, f"phantoms.family must be one of {FAMILIES}")
    roles = segmentation_roles(path, raw["seeds"])
    if roles.finetune and len(roles.finetune) != len(roles.owners):
        raise ExperimentError(path, "seeds.finetune needs one seed per owner")
    false_accusations = raw.get("false_accusations")
    if false_accusations is not None:
        if not isinstance(false_accusations, Mapping) or set(false_accusations) - FALSE_ACCUSATION_KEYS:
            raise ExperimentError(
                path, f"false_accusations may set {sorted(FALSE_ACCUSATION_KEYS)}, got {false_accusations!r}"
            )
        if not 0 < float(false_accusations.get("marker_share", 0.5)) <= 1:
            raise ExperimentError(path, "false_accusations.marker_share must lie in (0, 1]")
    if (false_accusations is not None) != bool(roles.markers) or (roles.markers and len(roles.markers) != 2):
        raise ExperimentError(
            path,
            "false_accusations needs seeds.markers = [training markers' seed, query markers' seed] (and they need it)",
        )
    archs, triggers = tuple(raw["architectures"]), tuple(raw["triggers"])
    bad = [a for a in archs if a not in SEGMENTATION_ARCHS] + [t for t in triggers if t not in TRIGGERS]
    if bad or not archs or not triggers or len(set(archs)) < len(archs) or len(set(triggers)) < len(triggers):
        raise ExperimentError(
            path,
            f"architectures and triggers: distinct names of {sorted(SEGMENTATION_ARCHS)} and {TRIGGERS}, got "
            f"{list(archs)} and {list(triggers)}",
        )
    baselines = tuple(raw.get("baselines", ()))
    if any(b not in METHODS or b == "stealthmark" for b in baselines):
        raise ExperimentError(path, f"baselines must be methods of {METHODS} other than stealthmark, got {baselines}")
    reserved = {"arch", "method", "trigger", "key", "seed", "epsilon", "trigger_share", "decoy_share"}
    reserved |= {"ckpt_dir", "dataset_dir"}
    overridden = sorted(reserved & set(raw["training"]))
    if overridden:
        raise ExperimentError(path, f"training may not set {overridden}: the declaration's other keys set them")
    sweeps = raw.get("sweeps", {})
    if not isinstance(sweeps, Mapping) or set(sweeps) - set(SWEEPS):
        raise ExperimentError(path, f"sweeps may vary {SWEEPS}, got {sweeps!r}")
    for setting, values in sweeps.items():
        declared = float(raw[setting]) if setting in raw else 0.5
        if not values or not all(0 < float(v) < 1 and float(v) != declared for v in values):
            raise ExperimentError(path, f"sweeps.{setting}: values in (0, 1) other than the declared {declared}")
    decoy_share = float(raw.get("decoy_share", 0.0))
    if decoy_share:
        from xmark_bundle.stealthmark.targets import check_decoys

        shares = [float(raw.get("trigger_share", 0.5)), *map(float, sweeps.get("trigger_share", ()))]
        try:
            for trigger in triggers:
                check_decoys(trigger, max(shares), decoy_share)
        except ValueError as err:
            raise ExperimentError(path, f"decoy_share: {err}") from err
    if roles.report and len(archs) < 2:
        raise ExperimentError(path, "a report declaration needs benign models of >= 2 architectures")
    return SegmentationExperiment(
        name=raw["name"],
        title=raw["title"],
        description=raw.get("description", ""),
        phantoms=raw["phantoms"],
        seeds=raw["seeds"],
        roles=roles,
        training=raw["training"],
        architectures=archs,
        triggers=triggers,
        epsilon=float(raw["epsilon"]),
        trigger_share=float(raw.get("trigger_share", 0.5)),
        baselines=baselines,
        decoy_share=decoy_share,
        verification=raw.get("verification", {}),
        source=path,
        removal=removal,
        false_accusations=dict(false_accusations or {}),
        sweeps={setting: tuple(float(v) for v in values) for setting, values in sweeps.items()},
        publish={name: tuple(int(i) for i in idx) for name, idx in raw.get("publish", {}).items()},
    )


class _SegRun:
    """One run of a segmentation experiment into ``out``."""

    def __init__(self, x: SegmentationExperiment, root: Path, out: Path, dry_run: bool, min_free_gb: float) -> None:
        self.x, self.root, self.out, self.dry_run = x, root, out, dry_run
        self.stages = Stages(root, out, x.name, dry_run=dry_run, min_free_gb=min_free_gb)
        self.phantoms, self.models = out / "phantoms", out / "models"
        self.data = {"dataset_dir": self.phantoms}
        #: false_accusations: every training's data carry burned-in markers on a seeded share of the images
        self.markers = (
            {"marker_seed": x.roles.markers[0], "marker_share": float(x.false_accusations.get("marker_share", 0.5))}
            if x.false_accusations
            else {}
        )

    def read(self, path: Path) -> Any:
        """A stage's JSON output (the runner's PENDING in a dry run where the stage has not made it)."""
        if self.dry_run and not path.is_file():
            from xmark_bundle.experiments.runner import PENDING  # the runner imports this module

            return PENDING
        return json.loads(path.read_text())

    def make_data(self) -> None:
        spec, py = self.x.phantoms, sys.executable
        cmd = [py, "scripts/make_phantoms.py", "--out", str(self.phantoms), "--n", str(spec["n"])]
        cmd += ["--seed", str(self.x.data_seed), "--min-size", str(spec["min_size"]), "--max-size"]
        cmd += [str(spec["max_size"]), "--valid-fraction", str(spec.get("valid_fraction", 0.3)), "--masks"]
        if spec.get("family", "classic") != "classic":
            cmd += ["--family", spec["family"]]
        self.stages.run(
            "StealthMark phantoms with masks", [*cmd, "--workers", "2"], self.phantoms / "seg_datalist.json"
        )

    def train(
        self,
        label: str,
        folder: Path,
        arch: str,
        method: str,
        trigger: str,
        key: int,
        seed: int,
        setting: Mapping[str, float] | None = None,
    ) -> Path:
        """A segmenter (train.json with the declaration's training overrides; ``setting``: a sweep's epsilon or
        trigger share instead of the declared one); its folder."""
        keys = {k: v for k, v in self.x.training.items() if v is not None}
        keys |= {"arch": arch, "method": method, "trigger": trigger, "key": key, "seed": seed}
        keys |= {"epsilon": self.x.epsilon, "trigger_share": self.x.trigger_share, "ckpt_dir": folder}
        if method == "stealthmark" and self.x.decoy_share:  # absent otherwise: earlier declarations' commands stay
            keys["decoy_share"] = self.x.decoy_share
        keys |= dict(setting or {}) | self.markers
        self.stages.run(
            f"StealthMark segmenter {label}",
            bundle_cmd("training", [TRAIN], **self.data, **keys),
            folder / RECORD,
            prepare=functools.partial(self._clear_unfinished, folder),
        )
        return folder

    def _clear_unfinished(self, folder: Path) -> None:
        """Remove what an interrupted training left in ``folder`` (a model.pt without the record training writes last):
        training refuses to replace a model, and the stage must start again."""
        if folder.is_dir() and not (folder / RECORD).exists():
            print(f"[{self.x.name}] {folder}: an unfinished training's files are removed before it runs again")
            shutil.rmtree(folder)

    def evaluate(self, label: str, model: Path, record: Path, folder: Path) -> dict[str, Any]:
        """Harmlessness of ``model`` with the trigger of ``record`` (evaluate.json)."""
        keys = {"suspect": model, "record_file": record, "output_dir": folder}
        self.stages.run(
            f"StealthMark evaluation {label}",
            bundle_cmd("evaluating", [EVALUATE], **self.data, **keys),
            folder / "harmlessness.json",
        )
        return _harmlessness(self.read(folder / "harmlessness.json"))

    def verify(self, label: str, model: Path, record: Path, folder: Path, markers: bool = False) -> dict[str, Any]:
        """Verification of ``model`` with the owner's ``record`` (verify.json, queries chosen with the data seed;
        ``markers``: an ordinary marker burned into every query, seeded with ``seeds.markers[1]``)."""
        keys = {"suspect": model, "record_file": record, "output_dir": folder, "seed": self.x.data_seed}
        if markers:
            keys["query_markers"] = self.x.roles.markers[1]
        cmd = bundle_cmd("verifying", [VERIFY], **self.data, **{**keys, **self.x.verification})
        self.stages.run(f"StealthMark verification {label}", cmd, folder / "verification.json")
        return _verification(self.read(folder / "verification.json"), folder / "verification.json")

    def verify_both(self, label: str, model: Path, record: Path, folder: Path) -> dict[str, Any]:
        """:meth:`verify` as it is, and with ``false_accusations`` also with markers on every query
        (``verification/markers/...``, under the key ``markers``)."""
        result = self.verify(label, model, record, folder)
        if self.x.false_accusations:
            where = self.out / "verification" / "markers" / folder.relative_to(self.out / "verification")
            result["markers"] = self.verify(f"{label} with markers on every query", model, record, where, True)
        return result


def _mean(block: Any) -> float | None:
    """A harmlessness summary's mean (None where it is undefined, e.g. HD95 of empty masks)."""
    value = block.get("mean") if isinstance(block, Mapping) else None
    return float(value) if isinstance(value, int | float) else None


#: (collected key, harmlessness.json path) of the harmlessness numbers the tables show.
HARMLESSNESS = (
    ("dice_clean", ("clean", "dice")),
    ("dice_triggered", ("triggered", "dice")),
    ("auc_clean", ("clean", "pixel_auc")),
    ("auc_triggered", ("triggered", "pixel_auc")),
    ("vs_clean", ("clean", "volumetric_similarity")),
    ("vs_triggered", ("triggered", "volumetric_similarity")),
    ("hd95_clean", ("clean", "hd95_px")),
    ("hd95_triggered", ("triggered", "hd95_px")),
    ("flip_share", ("flip_share",)),
)


def _harmlessness(report: Mapping[str, Any]) -> dict[str, Any]:
    values = {}
    for key, where in HARMLESSNESS:
        block: Any = report
        for part in where:
            block = block[part] if isinstance(block, Mapping) else None
        values[key] = _mean(block)
    return values | {"images": report.get("images")}


def _verification(report: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The numbers the tables need from a verification.json; ``owned``: verified (cannot verify counts as not)."""
    test, detector = report.get("test") or {}, report.get("authors_detector") or {}
    return {
        "verdict": report.get("verdict"),
        "owned": report.get("verified") is True,
        "p_value": test.get("p_ttest"),
        "p_no_margin": (report.get("test_without_margin") or {}).get("p_ttest"),
        "wilcoxon_p": test.get("p_wilcoxon"),
        "floor_clean": test.get("mean_clean"),
        "floor_triggered": test.get("mean_triggered"),
        "margin": test.get("margin"),
        "asr": report.get("asr"),
        "n": test.get("n"),
        "detector_accuracy": detector.get("accuracy"),
        "detector_p_chi2": detector.get("p_chi2"),
        "qr": _qr(report.get("qr")),
        "qr_modes": {mode: _qr(qr) for mode, qr in (report.get("qr_all") or {}).items()}
        or ({report["qr"]["mode"]: _qr(report["qr"])} if report.get("qr") else {}),
        "report": str(path),
    }


def _qr(qr: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A verification's QR explanation (verify.json ``qr_mode``): its mode, whether OpenCV decoded the owner's ID from
    it, and its agreement with the owner's code on the data modules."""
    if not qr:
        return None
    decodes = qr.get("decodes_owner") is True
    agreement, p_binomial = qr.get("agreement_data"), qr.get("p_binomial_data")
    return {"mode": qr.get("mode"), "decodes_owner": decodes, "agreement": agreement, "p_binomial": p_binomial}


def run_segmentation(
    x: SegmentationExperiment, root: Path, out: Path, dry_run: bool = False, min_free_gb: float = MIN_FREE_GB
) -> dict[str, Any]:
    """Run (or resume) every stage of ``x`` under ``out``; write and return ``collected.json`` (a dry run lists the
    stages still to run under ``planned_stages`` and writes nothing; a stage starts only with ``min_free_gb`` free)."""
    run, roles = _SegRun(x, root, out, dry_run, min_free_gb), x.roles
    run.make_data()
    collected: dict[str, Any] = {
        "task": SEGMENTATION,
        "experiment": x.name,
        "protocol": "current",
        "seeds": dict(x.seeds),
        "seed_roles": {"data": roles.data, "development": roles.development, **roles.by_role()},
        "architectures": list(x.architectures),
        "triggers": list(x.triggers),
        "epsilon": x.epsilon,
        "trigger_share": x.trigger_share,
        **({"decoy_share": x.decoy_share} if x.decoy_share else {}),
        "training": dict(x.training),
        "verification": dict(x.verification),
        "false_accusations": dict(x.false_accusations),
        "models": {},
        "benign": {},
        "other_keys": {},
    }
    owners = list(zip(roles.owners, roles.owner_keys, strict=True))
    records: dict[tuple[str, int], Path] = {}  # (trigger, owner) -> the owner's record (first architecture's)
    for arch in x.architectures:
        for trigger in x.triggers:
            for method in ("stealthmark", *x.baselines):
                for owner, key in owners:
                    name = f"{arch}/{trigger}/{method}/owner{owner}"
                    label = f"{arch} {trigger} {method} owner {owner}"
                    model = run.train(label, run.models / name, arch, method, trigger, key, owner)
                    record = model / RECORD
                    if method == "stealthmark":
                        records.setdefault((trigger, owner), record)
                    collected["models"][name] = {
                        "arch": arch,
                        "trigger": trigger,
                        "method": method,
                        "owner": owner,
                        "key": key,
                        "harmlessness": run.evaluate(label, model, record, out / "harmlessness" / name),
                        "verification": (run.verify_both if method == "stealthmark" else run.verify)(
                            f"{label} (own record)", model, record, out / "verification" / name
                        ),
                    }
    for arch, seed in x.benign_models():
        name = f"{arch}_seed{seed}"
        model = run.train(
            f"{arch} benign seed {seed}", run.models / arch / f"benign_seed{seed}", arch, "none", x.triggers[0], 0, seed
        )
        entry: dict[str, Any] = {"arch": arch, "seed": seed, "harmlessness": {}, "verification": {}}
        for trigger in x.triggers:
            first = records[(trigger, roles.owners[0])]
            where = out / "harmlessness" / "benign" / trigger / name
            entry["harmlessness"][trigger] = run.evaluate(f"{trigger} benign {name}", model, first, where)
            entry["verification"][trigger] = {}
            for owner, _ in owners:
                folder = out / "verification" / "benign" / trigger / f"owner{owner}" / name
                label = f"benign {name} with owner {owner}'s {trigger} record"
                entry["verification"][trigger][str(owner)] = run.verify_both(
                    label, model, records[(trigger, owner)], folder
                )
        collected["benign"][name] = entry
    for arch in x.architectures:
        for trigger in x.triggers:
            for seed, key in zip(roles.other_owners, roles.other_keys, strict=True):
                name = f"{arch}/{trigger}/other_keys/seed{seed}"
                label = f"{arch} {trigger} other key {key} seed {seed}"
                model = run.train(label, run.models / name, arch, "stealthmark", trigger, key, seed)
                entry = {"arch": arch, "trigger": trigger, "seed": seed, "key": key, "verification": {}}
                for owner, _ in owners:
                    folder = out / "verification" / "other_keys" / trigger / f"owner{owner}" / f"{arch}_seed{seed}"
                    entry["verification"][str(owner)] = run.verify_both(
                        f"{label} with owner {owner}'s record", model, records[(trigger, owner)], folder
                    )
                collected["other_keys"][name] = entry
    collected["removal"] = _removal(run, collected["models"])
    collected["sweeps"] = _sweeps(run, owners, [run.models / b for b in _benign_folders(x)])
    return run.stages.finish(collected, out)


def _removal(run: _SegRun, models: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each owner's watermarked model fine-tuned on the clean training split (finetune.json: no trigger, the
    fine-tuner's seed) for each declared number of epochs, and pruned at each declared rate (prune.json: global
    L1-magnitude unstructured pruning), each then evaluated and verified with the owner's record."""
    from xmark_bundle.stealthmark.pruning import PRUNING_REPORT  # torch and MONAI: imported when needed

    x, out, removed = run.x, run.out, {}
    if not x.removal:
        return removed
    finetuner = dict(zip(x.roles.owners, x.roles.finetune, strict=bool(x.roles.finetune)))
    for name, model in models.items():
        if model["method"] != "stealthmark":
            continue
        start, record = run.models / name, run.models / name / RECORD
        for epochs in map(int, x.removal.get("finetune_epochs", [])):
            kept = x.removal.get("kept_checkpoint")  # the fine-tuner's kept epoch: best validation (default) or last
            tag = f"{name}_finetuned{epochs}" + ("_last" if kept == "last" else "")
            keys = {k: v for k, v in x.training.items() if v is not None}
            keys |= {"arch": model["arch"], "seed": finetuner[model["owner"]], "max_epochs": epochs, "val_interval": 1}
            keys |= {"init_ckpt": start / "model.pt", "ckpt_dir": run.models / tag} | run.markers
            if "learning_rate" in x.removal:
                keys["learning_rate"] = x.removal["learning_rate"]
            if kept is not None:
                keys["kept_checkpoint"] = kept
            label = f"{model['arch']} {model['trigger']} owner {model['owner']} fine-tuned {epochs} epochs"
            label += f", {kept} kept" if kept is not None else ""
            cmd = bundle_cmd("training", [TRAIN, FINETUNE], **run.data, **keys)
            clear = functools.partial(run._clear_unfinished, run.models / tag)
            run.stages.run(f"StealthMark segmenter {label}", cmd, run.models / tag / RECORD, prepare=clear)
            removed[tag] = {
                "arch": model["arch"],
                "trigger": model["trigger"],
                "owner": model["owner"],
                "epochs": epochs,
                **({"kept_checkpoint": kept} if kept is not None else {}),
                "harmlessness": run.evaluate(label, run.models / tag, record, out / "harmlessness" / tag),
                "verification": run.verify(
                    f"{label} (owner's record)", run.models / tag, record, out / "verification" / tag
                ),
            }
        for rate in map(float, x.removal.get("prune_rates", [])):
            tag = f"{name}_pruned{100 * rate:g}"
            label = f"{model['arch']} {model['trigger']} owner {model['owner']} pruned {100 * rate:g} %"
            cmd = bundle_cmd("pruning", [PRUNE], source=start, rate=rate, output_dir=run.models / tag)
            run.stages.run(f"StealthMark segmenter {label}", cmd, run.models / tag / PRUNING_REPORT)
            pruned = run.read(run.models / tag / PRUNING_REPORT)
            removed[tag] = {
                "arch": model["arch"],
                "trigger": model["trigger"],
                "owner": model["owner"],
                "prune_rate": rate,
                "zero_share": pruned.get("zero_share") if isinstance(pruned, Mapping) else None,
                "harmlessness": run.evaluate(label, run.models / tag, record, out / "harmlessness" / tag),
                "verification": run.verify(
                    f"{label} (owner's record)", run.models / tag, record, out / "verification" / tag
                ),
            }
    return removed


def _benign_folders(x: SegmentationExperiment) -> list[str]:
    return [f"{arch}/benign_seed{seed}" for arch, seed in x.benign_models()]


def _sweeps(run: _SegRun, owners: list[tuple[int, int]], benign: list[Path]) -> dict[str, Any]:
    """Each sweep value (one setting varied, the rest as declared): every owner's watermarked model per architecture
    x trigger, evaluated and verified with its own record; for epsilon (the verifier's margin is a share of it) every
    benign model verified with each owner's record too."""
    x, out, swept = run.x, run.out, {}
    for setting, values in x.sweeps.items():
        for value in values:
            tag = f"{setting}={value:g}"
            entry: dict[str, Any] = {"setting": setting, "value": value, "models": {}, "benign": {}}
            records: dict[tuple[str, int], Path] = {}
            for arch in x.architectures:
                for trigger in x.triggers:
                    for owner, key in owners:
                        name = f"{arch}/{trigger}/owner{owner}"
                        label = f"{tag} {arch} {trigger} stealthmark owner {owner}"
                        model = run.train(
                            label,
                            run.models / "sweeps" / tag / name,
                            arch,
                            "stealthmark",
                            trigger,
                            key,
                            owner,
                            {setting: value},
                        )
                        record = model / RECORD
                        records.setdefault((trigger, owner), record)
                        entry["models"][name] = {
                            "arch": arch,
                            "trigger": trigger,
                            "owner": owner,
                            "harmlessness": run.evaluate(
                                label, model, record, out / "harmlessness/sweeps" / tag / name
                            ),
                            "verification": run.verify(
                                f"{label} (own record)", model, record, out / "verification/sweeps" / tag / name
                            ),
                        }
            if setting == "epsilon":
                for model in benign:
                    name = f"{model.parent.name}_{model.name}"
                    for (trigger, owner), record in records.items():
                        folder = out / "verification/sweeps" / tag / "benign" / trigger / f"owner{owner}" / name
                        label = f"{tag} benign {name} with owner {owner}'s {trigger} record"
                        entry["benign"].setdefault(trigger, []).append(run.verify(label, model, record, folder))
            swept[tag] = entry
    return swept


# ---------------------------------------------------------------- tables (the classification tables' format)


def _per_seed(values: Iterable[Any]) -> dict[str, list[float]] | None:
    """A per-seed cell of the finite numbers among ``values`` (None when there is none)."""
    kept = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool) and v == v]
    kept = [v for v in kept if abs(v) != float("inf")]
    return {"per_seed": kept} if kept else None


def _cells(pairs: Iterable[tuple[str, dict[str, Any] | None]]) -> dict[str, Any]:
    return {column: cell for column, cell in pairs if cell is not None}


def _share(runs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """``k of n`` verified, and the Clopper-Pearson 95 % interval of the share."""
    from xmark_bundle.experiments.tables import false_accusations

    counted = false_accusations({str(i): run for i, run in enumerate(runs)})
    return {
        "verified": {"value": f"{counted['k']} of {counted['n']}"},
        "Clopper-Pearson 95 %": {"value": f"{counted['low']:.3f}-{counted['high']:.3f}"},
    }


def _detector(runs: list[Mapping[str, Any]], alpha: float = 0.05) -> dict[str, Any]:
    """The authors' detector beside the verdict: its accuracy and how many of its chi-square tests had p < alpha."""
    with_p = [r for r in runs if isinstance(r.get("detector_p_chi2"), int | float)]
    cells = _cells([("authors' detector accuracy", _per_seed(r.get("detector_accuracy") for r in runs))])
    if any(r.get("detector_accuracy") is not None for r in runs):
        detected = sum(float(r["detector_p_chi2"]) < alpha for r in with_p)
        cells["authors' detector: chi2 p < 0.05"] = {"value": f"{detected} of {len(runs)}"}
    return cells


VERIFICATION_COLUMNS = [
    "verified",
    "Clopper-Pearson 95 %",
    "p (t, with margin)",
    "p (t, no margin)",
    "floor clean",
    "floor triggered",
    "ASR",
    "authors' detector accuracy",
    "authors' detector: chi2 p < 0.05",
    "QR decodes the owner's ID",
    "QR data-module agreement",
]


def _verification_row(label: str, runs: list[Mapping[str, Any]], interval: bool) -> dict[str, Any]:
    cells = _share(runs) if interval else {"verified": {"value": f"{sum(r['owned'] for r in runs)} of {len(runs)}"}}
    cells |= _cells(
        [
            ("p (t, with margin)", _per_seed(r.get("p_value") for r in runs)),
            ("p (t, no margin)", _per_seed(r.get("p_no_margin") for r in runs)),
            ("floor clean", _per_seed(r.get("floor_clean") for r in runs)),
            ("floor triggered", _per_seed(r.get("floor_triggered") for r in runs)),
            ("ASR", _per_seed(r.get("asr") for r in runs)),
        ]
    )
    return {"label": label, "cells": cells | _detector(runs) | _qr_cells(runs)}


def _qr_cells(runs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The QR explanation's cells, where every run has one (labelled by its mode: only random_mask depends on the
    model; the authors' grid decodes the owner's ID for any model whose output moves)."""
    qrs = [r.get("qr") for r in runs]
    if not qrs or any(q is None for q in qrs):
        return {}
    modes = ", ".join(sorted({str(q["mode"]) for q in qrs}))
    return {
        "QR decodes the owner's ID": {"value": f"{sum(q['decodes_owner'] for q in qrs)} of {len(qrs)} ({modes})"},
        **_cells([("QR data-module agreement", _per_seed(q.get("agreement") for q in qrs))]),
    }


HARMLESSNESS_COLUMNS = {
    "Dice clean": "dice_clean",
    "Dice triggered": "dice_triggered",
    "pixel AUC clean": "auc_clean",
    "pixel AUC triggered": "auc_triggered",
    "volumetric similarity clean": "vs_clean",
    "volumetric similarity triggered": "vs_triggered",
    "HD95 clean (px)": "hd95_clean",
    "HD95 triggered (px)": "hd95_triggered",
    "pixels flipped by the trigger": "flip_share",
}


def _harmlessness_row(label: str, rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "label": label,
        "cells": _cells((c, _per_seed(r[k] for r in rows)) for c, k in HARMLESSNESS_COLUMNS.items()),
    }


def segmentation_tables(collected: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Harmlessness and Verification per architecture x trigger (cells over owners, benign or other-key models)."""
    size = collected.get("training", {}).get("image_size", "?")
    methods = sorted({m["method"] for m in collected["models"].values()}, key=lambda m: m != "stealthmark")
    harm_rows, verify_rows = [], []
    for arch in collected["architectures"]:
        for trigger in collected["triggers"]:
            for method in methods:
                runs = [
                    m
                    for m in collected["models"].values()
                    if (m["arch"], m["trigger"], m["method"]) == (arch, trigger, method)
                ]
                if not runs:
                    continue
                label = f"{method}, {arch}, {trigger} ({len(runs)} owners)"
                harm_rows.append(_harmlessness_row(label, [r["harmlessness"] for r in runs]))
                verify_rows.append(_verification_row(f"{label}, own record", [r["verification"] for r in runs], False))
            benign = [b for b in collected["benign"].values() if b["arch"] == arch]
            if benign:
                label = f"benign models, {arch}, {trigger} trigger ({len(benign)} models)"
                harm_rows.append(_harmlessness_row(label, [b["harmlessness"][trigger] for b in benign]))
                runs = [v for b in benign for v in b["verification"][trigger].values()]
                verify_rows.append(_verification_row(f"{label} x every owner: false accusations", runs, True))
            others = [o for o in collected["other_keys"].values() if (o["arch"], o["trigger"]) == (arch, trigger)]
            if others:
                runs = [v for o in others for v in o["verification"].values()]
                label = f"other keys, {arch}, {trigger} ({len(others)} models) x every owner's record"
                verify_rows.append(_verification_row(label, runs, True))
    for trigger in collected["triggers"]:
        runs = [v for b in collected["benign"].values() for v in b["verification"][trigger].values()]
        if runs:
            label = f"all benign models, {trigger} trigger ({len(collected['benign'])} models x every owner)"
            verify_rows.append(_verification_row(f"{label}: false accusations", runs, True))
    seeds = collected["seed_roles"]
    note = (
        f"ε = {collected['epsilon']}, trigger share {collected['trigger_share']}"
        + (f", decoy share {collected['decoy_share']}" if collected.get("decoy_share") else "")
        + f", {size} px; owners {seeds['owners']} "
        f"(keys {seeds['owner_keys']}), benign seeds {seeds['benign']}, other keys {seeds['other_keys']}. Per-seed "
        "cells run over owners (watermarked rows), benign models (harmlessness) or model x owner's record "
        "(verification of benign and other-key models). The margin of the t-test is margin_fraction x ε "
        f"(verify.json: a quarter unless overridden; overrides here {collected.get('verification', {})})."
    )
    produced = [
        {
            "title": "Harmlessness (StealthMark): masks on clean and triggered validation images against the reference",
            "columns": list(HARMLESSNESS_COLUMNS),
            "rows": harm_rows,
            "notes": note,
        },
        {
            "title": "Verification (StealthMark): own records, benign models (false accusations) and other keys",
            "columns": VERIFICATION_COLUMNS,
            "rows": verify_rows,
            "notes": note,
        },
    ]
    if collected.get("false_accusations"):
        produced.append(_false_accusation_table(collected, note))
    if collected.get("removal"):
        produced.append(_removal_table(collected, note))
    if collected.get("sweeps"):
        produced.append(_sweep_table(collected, note))
    return produced


SWEEP_COLUMNS = [
    "verified",
    "p (t, with margin)",
    "ASR",
    "floor clean",
    "floor triggered",
    "Dice clean",
    "Dice triggered",
    "pixels flipped by the trigger",
    "benign falsely verified",
    "benign Clopper-Pearson 95 %",
]


def _test_verdicts(run: Mapping[str, Any], alpha: float = 0.05) -> dict[str, bool]:
    """Whether each test of :data:`FALSE_ACCUSATION_TESTS` calls a verified model the owner's (a test the
    verification did not run is absent): the floor test's verdict, the authors' detector (chi-square p < alpha), the
    authors' grid QR (qr_a) and the random-mask QR (qr_b) decoding the owner's ID, and qr_b's data-module agreement
    with binomial p < alpha."""
    verdicts = {"floor": bool(run["owned"])}
    if run.get("detector_accuracy") is not None:
        p_chi2 = run.get("detector_p_chi2")
        verdicts["authors' detector"] = isinstance(p_chi2, int | float) and p_chi2 == p_chi2 and p_chi2 < alpha
    modes = run.get("qr_modes") or {}
    if "authors_grid" in modes:
        verdicts["qr_a"] = bool(modes["authors_grid"]["decodes_owner"])
    if "random_mask" in modes:
        p_binomial = modes["random_mask"].get("p_binomial")
        verdicts["qr_b"] = bool(modes["random_mask"]["decodes_owner"])
        verdicts["qr_b_binomial"] = isinstance(p_binomial, int | float) and p_binomial < alpha
    return verdicts


def _counts(runs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Per test, ``k of N`` models the test called the owner's with the Clopper-Pearson 95 % interval (a test only
    where every run has it)."""
    from xmark_bundle.experiments.tables import false_accusations

    verdicts = [_test_verdicts(run) for run in runs]
    cells = {}
    for test in FALSE_ACCUSATION_TESTS:
        if verdicts and all(test in v for v in verdicts):
            c = false_accusations({str(i): {"owned": v[test]} for i, v in enumerate(verdicts)})
            cells[test] = {"value": f"{c['k']} of {c['n']} ({c['low']:.3f}-{c['high']:.3f})"}
    return cells


def _false_accusation_table(collected: Mapping[str, Any], note: str) -> dict[str, Any]:
    """Per trigger and query set (plain; a marker on every query), per group of models verified with the owners'
    records (the owners' watermarked models with their own; benign models per architecture and all; other keys; all
    models that are not the owner's): k of N called the owner's by each test, with Clopper-Pearson 95 % intervals."""
    rows = []
    for trigger in collected["triggers"]:
        owners = [
            m["verification"]
            for m in collected["models"].values()
            if m["trigger"] == trigger and m["method"] == "stealthmark"
        ]
        benign = {
            arch: [
                v
                for b in collected["benign"].values()
                if b["arch"] == arch
                for v in b["verification"][trigger].values()
            ]
            for arch in collected["architectures"]
        }
        others = [
            v for o in collected["other_keys"].values() if o["trigger"] == trigger for v in o["verification"].values()
        ]
        groups = [("owners' watermarked models, own record", owners)]
        groups += [(f"benign {arch} x every owner's record", runs) for arch, runs in benign.items() if runs]
        every_benign = [v for runs in benign.values() for v in runs]
        groups += [("benign, all x every owner's record", every_benign)]
        groups += [("other keys x every owner's record", others)]
        groups += [("not the owner's (benign and other keys)", every_benign + others)]
        for queries in ("plain", "markers"):
            for label, runs in groups:
                picked = [
                    r["markers"] if queries == "markers" else r for r in runs if queries == "plain" or "markers" in r
                ]
                if picked:
                    where = "queries as they are" if queries == "plain" else "a burned-in marker on every query"
                    rows.append({"label": f"{trigger}, {where}: {label}", "cells": _counts(picked)})
    seeds = collected["seed_roles"].get("markers", [])
    share = collected["false_accusations"].get("marker_share", 0.5)
    return {
        "title": "False accusations (StealthMark): models called the owner's by each test, plain and marked queries",
        "columns": list(FALSE_ACCUSATION_TESTS),
        "rows": rows,
        "notes": note
        + f" Every model was trained on data with an ordinary burned-in marker (L, R, AP or PORTABLE) on a seeded "
        f"{share:g} of the training images (seed {seeds[0] if seeds else '?'}); marked queries carry one on every "
        f"image (seed {seeds[1] if len(seeds) > 1 else '?'}). Cells: k of N (Clopper-Pearson 95 %). floor: the "
        "verdict (paired t-test against the margin); authors' detector: chi-square p < 0.05; qr_a: the authors' grid "
        "QR decodes the owner's ID (not model-dependent); qr_b: the random-mask QR decodes it; qr_b_binomial: its "
        "data-module agreement has binomial p < 0.05 (a QR column where verify.json's qr_mode drew it: both).",
    }


def _removal_attack(entry: Mapping[str, Any]) -> tuple[int, float, str]:
    """A removal entry's sort key and row words: fine-tuning by its length, then pruning by its rate."""
    if "prune_rate" in entry:
        rate = float(entry["prune_rate"])
        return (1, rate, f"pruned {100 * rate:g} % (global L1 magnitude, no fine-tuning)")
    kept = f", {entry['kept_checkpoint']} epoch kept" if entry.get("kept_checkpoint") else ""
    return (0, float(entry["epochs"]), f"fine-tuned {entry['epochs']} epoch(s) on clean data{kept}")


REMOVAL_COLUMNS = [
    *SWEEP_COLUMNS[:8],
    "share of weights zeroed",
    "QR decodes the owner's ID",
    "QR data-module agreement",
]


def _removal_table(collected: Mapping[str, Any], note: str) -> dict[str, Any]:
    """One row per architecture x trigger x fine-tuning length or pruning rate: the owners' models after the attack,
    verified with the owner's record (floor test, ASR, QR where verify.json draws it) and evaluated (Dice)."""
    rows = []
    attacks = sorted({_removal_attack(r) for r in collected["removal"].values()})
    for arch in collected["architectures"]:
        for trigger in collected["triggers"]:
            for attack in attacks:
                runs = [
                    r
                    for r in collected["removal"].values()
                    if (r["arch"], r["trigger"], _removal_attack(r)) == (arch, trigger, attack)
                ]
                if not runs:
                    continue
                row = _verification_row("", [r["verification"] for r in runs], False)["cells"]
                cells = {column: row[column] for column in REMOVAL_COLUMNS if column in row}
                cells |= _cells(
                    (column, _per_seed(r["harmlessness"][key] for r in runs))
                    for column, key in (
                        ("Dice clean", "dice_clean"),
                        ("Dice triggered", "dice_triggered"),
                        ("pixels flipped by the trigger", "flip_share"),
                    )
                )
                cells |= _cells([("share of weights zeroed", _per_seed(r.get("zero_share") for r in runs))])
                label = f"{arch}, {trigger}, {attack[2]} ({len(runs)} owners)"
                rows.append({"label": label, "cells": cells})
    return {
        "title": "Removal (StealthMark): each owner's model fine-tuned on the clean training split or pruned, then "
        "verified",
        "columns": REMOVAL_COLUMNS,
        "rows": rows,
        "notes": note + " Pruning: the given share of all convolution and linear weights with the smallest magnitude "
        "set to zero (one global ranking, torch.nn.utils.prune), not fine-tuned afterwards.",
    }


def _sweep_table(collected: Mapping[str, Any], note: str) -> dict[str, Any]:
    """One row per sweep value x architecture x trigger: verification and harmlessness of the owners' models, and
    for epsilon the benign models' false accusations at that epsilon (every benign model x owner's record)."""
    rows = []
    for tag, entry in collected["sweeps"].items():
        for arch in collected["architectures"]:
            for trigger in collected["triggers"]:
                models = [m for m in entry["models"].values() if (m["arch"], m["trigger"]) == (arch, trigger)]
                if not models:
                    continue
                runs, harm = [m["verification"] for m in models], [m["harmlessness"] for m in models]
                row = _verification_row("", runs, False)["cells"]
                cells = {column: row[column] for column in SWEEP_COLUMNS if column in row}
                cells |= _cells(
                    (column, _per_seed(h[key] for h in harm))
                    for column, key in (
                        ("Dice clean", "dice_clean"),
                        ("Dice triggered", "dice_triggered"),
                        ("pixels flipped by the trigger", "flip_share"),
                    )
                )
                benign = entry.get("benign", {}).get(trigger, [])
                if benign:
                    share = _share(benign)
                    cells["benign falsely verified"] = share["verified"]
                    cells["benign Clopper-Pearson 95 %"] = share["Clopper-Pearson 95 %"]
                rows.append({"label": f"{tag}, {arch}, {trigger} ({len(models)} owners)", "cells": cells})
    return {
        "title": "Sweeps (StealthMark): one setting varied at a time, the others as declared",
        "columns": SWEEP_COLUMNS,
        "rows": rows,
        "notes": note + " Benign rows of an epsilon value: every benign model (all architectures) x owner's record.",
    }


def segmentation_plain_words(collected: Mapping[str, Any]) -> list[str]:
    """A few plain sentences: how often each kind of model was verified."""
    lines = []
    for trigger in collected["triggers"]:
        own = [m for m in collected["models"].values() if m["trigger"] == trigger and m["method"] == "stealthmark"]
        benign = [v for b in collected["benign"].values() for v in b["verification"][trigger].values()]
        others = [
            v for o in collected["other_keys"].values() if o["trigger"] == trigger for v in o["verification"].values()
        ]
        words = f"{trigger}: {sum(m['verification']['owned'] for m in own)} of {len(own)} watermarked models verified"
        if benign:
            k = sum(r["owned"] for r in benign)
            ci = stats.binomtest(k, len(benign)).proportion_ci(method="exact")
            words += f"; benign falsely verified {k} of {len(benign)} (95 % CI {ci.low:.3f}-{ci.high:.3f})"
        if others:
            words += f"; other keys verified {sum(r['owned'] for r in others)} of {len(others)}"
        dice = [m["harmlessness"]["dice_clean"] for m in own if m["harmlessness"]["dice_clean"] is not None]
        if dice:
            words += f"; Dice (clean) of the watermarked models {statistics.fmean(dice):.3f}"
        lines.append(words + ".")
    return lines


def seed_record(x: SegmentationExperiment) -> dict[str, Any]:
    """The seeds a results.json records: development and report seeds and every role."""
    return {"development": x.roles.development, "report": x.roles.data} | {
        role: list(seeds) for role, seeds in x.roles.by_role().items()
    }


def is_segmentation(raw: Mapping[str, Any], path: str | os.PathLike) -> bool:
    """Whether a raw declaration is a segmentation one (``task`` absent: classification; any other value refused)."""
    task = raw.get("task", "classification")
    if task not in ("classification", SEGMENTATION):
        raise ExperimentError(Path(path), f"task must be 'classification' or {SEGMENTATION!r}, got {task!r}")
    return task == SEGMENTATION
