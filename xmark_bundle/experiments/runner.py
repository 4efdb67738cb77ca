"""Run a declared experiment as ``monai.bundle`` runs: data, surrogates, each owner's watermarks and release,
suspects, benign models, evaluations and the verification scenarios, then collect what they measured.

Layout under the output folder: ``phantoms/`` (the data and its datalist), ``models/surrogate``,
``models/benign/<arch>_seed<k>``, and per method and owner ``models/<method>/owner<o>/{watermark,
release_manifest.json,suspect_seed<k>}``, ``release/<method>/owner<o>/`` and ``verification/<method>/owner<o>/
<scenario>_<model>/``; each independent owner ``models/independent_owner<i>/surrogate`` and
``models/<method>/independent_owner<i>/watermark`` (the last one trained on ``independent_phantoms/`` when the
declaration has a disjoint phantom set). A legacy declaration (:mod:`~xmark_bundle.experiments.protocol`) keeps the
layout it was published with: one owner in ``models/<method>``, ``release/<method>``, ``models/surrogate_independent``
and ``models/<method>/watermark_independent``. Every stage is skipped when its output exists, so an interrupted run
resumes; ``dry_run`` lists the stages and their commands without running any. ``collected.json`` holds every number
the tables are made of and the figures beside it (``scenarios.png``; ``removal.png``, ``variants.png``,
``detectability.png`` where they apply) are drawn by :mod:`~xmark_bundle.experiments.figures`.

Under the current protocol each suspect is verified at its own training size with queries loaded from the original
files at that size (configs/verify_own_size.json); the Ind-M rows also hold the owner's surrogate and a benign model
of another architecture trained with the surrogate's seed (``ind_m_seed_controls``: adversarial transfer, kept out
of the false-accusation count).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from xmark_bundle.experiments.figures import save_figures
from xmark_bundle.experiments.plan import Experiment, Method
from xmark_bundle.experiments.segmentation import SegmentationExperiment, run_segmentation
from xmark_bundle.experiments.stages import MIN_FREE_GB, Stages, bundle_cmd

__all__ = ["PENDING", "run_experiment", "watermark_recipe"]

CLASSIFIER = ["configs/train_classifier.json"]
#: Layered on configs/verify.json under the current protocol: queries at the suspect's own size from the files.
VERIFY_OWN_SIZE = "configs/verify_own_size.json"


class _Pending(dict):
    """What a dry run reads where a stage's output would be: any key gives another pending value, 0 as a number."""

    def __missing__(self, key: Any) -> _Pending:
        return PENDING

    def __int__(self) -> int:
        return 0

    def __float__(self) -> float:
        return 0.0


#: The value of every output a dry run did not make.
PENDING = _Pending()
EVALUATE = ["configs/evaluate_classifier.json"]  # layered on CLASSIFIER and a recipe's own override files


class _Run:
    """One run of ``experiment`` into ``out``."""

    def __init__(
        self,
        experiment: Experiment,
        root: Path,
        out: Path,
        dry_run: bool = False,
        discard_tuned: bool = False,
        min_free_gb: float = MIN_FREE_GB,
    ) -> None:
        self.x, self.root, self.out, self.dry_run = experiment, root, out, dry_run
        self.discard_tuned = discard_tuned  # fine-tuned and pruned models, once measured (Stages.discard)
        self.stages = Stages(root, out, experiment.name, dry_run=dry_run, min_free_gb=min_free_gb)
        self.trained: dict[str, Path] = {}  # a watermark recipe (watermark_recipe) -> the checkpoint it made
        self.phantoms, self.models = out / "phantoms", out / "models"
        self.data = {"dataset_dir": self.phantoms, "datalist_file": self.phantoms / "datalist.json"}
        self.eval_keys = _evaluation_keys(experiment.classifier)
        # the surrogate sees images at the size it was trained at (train.json and trigger.json default to 224 px)
        self.surrogate_keys = {
            "surrogate_size": experiment.query_size,
            "surrogate_arch": experiment.classifier.get("arch", "resnet18"),
        }

    def read(self, path: Path) -> Any:
        """A stage's JSON output (:data:`PENDING` in a dry run where the stage has not made it)."""
        if self.dry_run and not path.is_file():
            return PENDING
        return json.loads(path.read_text())

    def make_data(self) -> None:
        """The phantom set of the data seed and its datalist."""
        self._phantom_set("", self.phantoms, self.x.phantoms, self.x.data_seed)

    def owner_dir(self, method: str, owner: int) -> Path:
        """The folder of one owner's watermark, release manifest and suspects (legacy: the method's folder)."""
        return self.models / method if self.x.legacy else self.models / method / f"owner{owner}"

    def owner_tag(self, owner: int) -> str:
        """The owner's words in stage names ("" for a legacy declaration's one owner)."""
        return "" if self.x.legacy else f"owner {owner} "

    def independent_owner(self, seed: int) -> tuple[Path, Path]:
        """An independent owner's surrogate (its own seed, on its own phantom set) and that phantom set's folder."""
        if self.x.legacy:
            folder = self.models / "surrogate_independent"
            return self.classifier("surrogate_independent", folder, self.phantoms, seed, False), self.phantoms
        phantom_seed, data = self.x.seed_roles.phantoms_of(seed), self.phantoms
        if phantom_seed != self.x.data_seed:
            data = self.out / "independent_phantoms"
            self._phantom_set("independent owners' ", data, self.x.phantoms, phantom_seed)
        name = f"independent_owner{seed}"
        return self.classifier(f"{name} surrogate", self.models / name / "surrogate", data, seed, False), data

    def _phantom_set(self, label: str, folder: Path, spec: Mapping[str, Any], seed: int) -> None:
        """Stages making a phantom set (scripts/make_phantoms.py) and its datalist in ``folder``."""
        py = sys.executable
        cmd = [py, "scripts/make_phantoms.py", "--out", str(folder), "--n", str(spec["n"]), "--seed", str(seed)]
        cmd += ["--min-size", str(spec["min_size"]), "--max-size", str(spec["max_size"]), "--valid-fraction", "0.25"]
        if spec.get("family", "classic") != "classic":  # classic declarations keep their published commands
            cmd += ["--family", spec["family"]]
        self.stages.run(f"{label}phantoms", [*cmd, "--workers", "2"], folder / "valid.csv")
        datalist = [py, "scripts/prepare_datalist.py", "--csv", str(folder / "train.csv"), "--test-csv"]
        datalist += [str(folder / "valid.csv"), "--out", str(folder / "datalist.json"), "--seed", str(seed)]
        self.stages.run(f"{label}datalist", datalist, folder / "datalist.json")

    def classifier(
        self,
        name: str,
        ckpt: Path,
        data_dir: Path,
        seed: int,
        evaluate: bool,
        datalist: Path | None = None,
        **recipe: Any,
    ) -> Path:
        """Train (and evaluate on the clean test split) a classifier on ``data_dir`` (``datalist``: another datalist
        than its datalist.json); its checkpoint folder.

        A recipe's ``configs`` are override files layered on configs/train_classifier.json (e.g. stronger
        augmentation); its other keys are overrides."""
        data = {"dataset_dir": data_dir, "datalist_file": datalist or data_dir / "datalist.json"}
        extra = list(recipe.get("configs", ()))
        overrides = {**self.x.classifier, **_training_keys(recipe), **data}
        cmd = bundle_cmd("training", CLASSIFIER + extra, ckpt_dir=ckpt, seed=seed, **overrides)
        start = [Path(recipe["pretrained_weights"])] if "pretrained_weights" in recipe else []
        self.stages.run(f"classifier '{name}'", cmd, ckpt / "training_info.json", needs=start)
        return self.evaluation(name, ckpt, recipe) if evaluate else ckpt

    def evaluation(self, name: str, ckpt: Path, recipe: Mapping[str, Any]) -> Path:
        """Evaluate the classifier folder ``ckpt`` on the clean test split (classification_report.json); ``ckpt``."""
        keys = {**self.eval_keys, **_evaluation_keys(recipe)}
        cmd = bundle_cmd(
            "run", CLASSIFIER + list(recipe.get("configs", ())) + EVALUATE, ckpt_dir=ckpt, **self.data, **keys
        )
        self.stages.run(f"evaluation '{name}'", cmd, ckpt / "classification_report.json", needs=[ckpt / "model.pt"])
        return ckpt

    @functools.cache  # noqa: B019 - one run object per experiment run: a stage is made (or reported) once
    def pretrained(self, arch: str, size: int) -> Path:
        """A classifier pre-trained on the declaration's disjoint phantom set (``pretrain``), the suspects' start."""
        spec, data = self.x.pretrain, self.out / "pretrain_phantoms"
        self._phantom_set("pre-training ", data, spec["phantoms"], int(spec["seed"]))
        recipe = {"arch": arch, "image_size": size, "max_epochs": spec.get("max_epochs", 5)}
        folder = self.models / "pretrained" / f"{arch}_{size}px"
        return self.classifier(f"pre-trained {arch}", folder, data, int(spec["seed"]), False, **recipe) / "model.pt"

    @functools.cache  # noqa: B019 - as above
    def clean_subset(self) -> Path:
        """The data user's small clean set for fine-tuning: a share of the clean training split (``removal``)."""
        out = self.phantoms / "datalist_clean_subset.json"
        fraction, seed = self.x.removal.get("clean_fraction", 0.1), self.x.data_seed
        cmd = [sys.executable, "scripts/subset_datalist.py", "--datalist", str(self.data["datalist_file"])]
        cmd += ["--fraction", str(fraction), "--seed", str(seed), "--out", str(out)]
        self.stages.run("clean subset for fine-tuning", cmd, out)
        return out

    def removal(self, method: str, suspect: Path, watermark: Path, recipe: dict[str, Any]) -> dict[str, Any]:
        """Fine-tune ``suspect`` on the clean subset, the head only or every layer, for each declared number of
        epochs, and prune it at each declared rate, alone and then fine-tuned (fine-pruning); the clean BA and the
        Malicious verification of each."""
        spec, size = self.x.removal, int(recipe.get("image_size", self.x.query_size))

        def measured(folder: Path, mode: str, epochs: int, **rate: float) -> dict[str, Any]:
            report = self.read(folder / "classification_report.json")
            verified = self.verify(method, "malicious", folder, watermark, size, self._verification(method, folder))
            run = {"mode": mode, "epochs": epochs, **rate, "mean_ba": report["mean_ba"], **verified}
            if not epochs:  # pruned alone: nothing trained
                return run
            # a fine-tuning keeps its best epoch on the clean validation split, or its last (``kept_checkpoint``)
            info = self.read(folder / "training_info.json")  # folders before 0.14.0 kept the best
            kept = info.get("kept_checkpoint", "best")
            return run | {"kept_checkpoint": kept, "kept_epoch": info.get("kept_epoch", info.get("best_epoch"))}

        results: dict[str, Any] = {}
        for mode in ("head", "full"):
            for epochs in spec.get(f"{mode}_epochs", []):
                folder = self._fine_tuned(method, suspect, f"{mode}_{epochs}", mode, epochs, recipe)
                results[f"{mode}_{epochs}"] = measured(folder, mode, epochs)
                self._discard_measured(folder)
        for rate in map(float, spec.get("prune_rates", [])):
            pruned = self.pruned(method, suspect, rate, recipe)
            results[f"pruned_{rate:g}"] = measured(pruned, "pruned", 0, rate=rate)
            epochs = spec.get("prune_epochs", 2)
            folder = self._fine_tuned(method, pruned, str(epochs), "fine-pruned", epochs, recipe)
            results[f"fine_pruned_{rate:g}"] = measured(folder, "fine-pruned", epochs, rate=rate)
            self._discard_measured(folder)
            self._discard_measured(pruned)  # after its fine-pruning, which starts from it
        return results

    def _discard_measured(self, folder: Path) -> None:
        """Discard the model of a fine-tuned or pruned ``folder`` whose evaluation and verification are recorded,
        when the run was asked to (``--discard-tuned-models``): each is 45 MB and nothing else reads it."""
        if self.discard_tuned:
            self.stages.discard(folder / "model.pt")

    def pruned(self, method: str, suspect: Path, rate: float, recipe: dict[str, Any]) -> Path:
        """``suspect`` with the ``rate`` share of its penultimate units that the clean subset leaves least active
        pruned (scripts/prune_classifier.py), evaluated: a classifier folder, the start of its fine-pruning."""
        out = suspect.parent / f"{suspect.name}_pruned_{rate:g}"
        cmd = [sys.executable, "scripts/prune_classifier.py", "--ckpt", str(suspect / "model.pt"), "--rate", str(rate)]
        cmd += ["--datalist", str(self.clean_subset()), "--dataset-dir", str(self.phantoms), "--out", str(out)]
        name = f"{method} {self._model_name(method, suspect)} pruning at {rate:g}"
        self.stages.run(name, cmd, out / "model.pt", needs=[suspect / "model.pt"])
        return self.evaluation(f"{method} {self._model_name(method, out)}", out, recipe)

    def _fine_tuned(self, method: str, start: Path, key: str, mode: str, epochs: int, recipe: dict[str, Any]) -> Path:
        """The classifier folder ``start`` fine-tuned on the clean subset (``mode`` head, full or fine-pruned) and
        evaluated; its folder (beside ``start``)."""
        configs = {"head": ["configs/finetune_head.json"], "full": [], "fine-pruned": ["configs/finetune_pruned.json"]}
        tuned = {**_evaluation_keys(recipe), "configs": configs[mode], "max_epochs": epochs}
        tuned |= {"pretrained_weights": start / "model.pt", "learning_rate": self.x.removal.get("learning_rate", 1e-4)}
        kept = self.x.removal.get("kept_checkpoint", "best")
        tuned |= {"kept_checkpoint": kept}
        name = f"{start.name}_finetuned_{key}" + ("" if kept == "best" else f"_{kept}")
        layers = "every layer" if mode != "head" else "head"
        last = ", last kept" if kept == "last" else ""
        label = f"{method} {self._model_name(method, start)} fine-tuned ({layers}, {epochs} epochs{last})"
        return self.classifier(label, start.parent / name, self.phantoms, 0, True, self.clean_subset(), **tuned)

    def evaded(self, method: str, release: Path, evasion: str) -> Path:
        """``release`` as a data user who applies ``evasion`` to every image trains on it (scripts/evade_release.py)."""
        which = release.relative_to(self.out / "release")  # the method's release (and its owner's)
        out = self.out / "release_evaded" / which / evasion
        cmd = [sys.executable, "scripts/evade_release.py", "--release", str(release), "--evasion", evasion]
        self.stages.run(
            f"{' '.join(which.parts)} release after {evasion}",
            [*cmd, "--out", str(out), "--seed", str(self.x.data_seed)],
            out / "datalist.json",
        )
        return out

    def watermark(
        self, method: Method, folder: Path, surrogate: Path, seed: int, vetting: bool, data: Path | None = None
    ) -> Path:
        """Make ``method``'s watermark checkpoint in ``folder`` (a trained generator or a trigger; a generator learns
        on ``data``, default the experiment's phantoms), or reuse the one an earlier method of the experiment made
        with the same recipe (e.g. arms that differ in the release's gamma)."""
        recipe = watermark_recipe(method, surrogate, seed, vetting)
        if recipe in self.trained:
            print(f"[{self.x.name}] {method.name} watermark '{folder.name}': the recipe of {self.trained[recipe]}")
            return self.trained[recipe]
        self.trained[recipe] = self._watermark(method, folder, surrogate, seed, vetting, data or self.phantoms)
        return self.trained[recipe]

    def _watermark(self, method: Method, folder: Path, surrogate: Path, seed: int, vetting: bool, data: Path) -> Path:
        where = folder.name if self.x.legacy else str(folder.relative_to(self.models / method.name))
        name = f"{method.name} watermark '{where}'"
        common = {"ckpt_dir": folder, "seed": seed, **self.surrogate_keys, **method.settings}
        if method.kind == "trigger":
            trigger = {"method": method.name, **common}
            cmd = bundle_cmd("making", ["configs/trigger.json"], surrogate_ckpt=surrogate / "model.pt", **trigger)
            self.stages.run(name, cmd, folder / "model.pt")
            return folder / "model.pt"
        key: dict[str, Any] = {}
        if method.settings.get("key_cells"):
            key = {"key_seed": self._vetted_key(method, folder, surrogate, seed) if vetting else seed + 1}
        configs = ["configs/train.json", *method.configs]
        training_data = {"dataset_dir": data, "datalist_file": data / "datalist.json"}
        overrides = {**training_data, **common, **key, "output_dir": folder / "logs"}
        cmd = bundle_cmd("training", configs, surrogate_ckpt=surrogate / "model.pt", **overrides)
        self.stages.run(name, cmd, folder / "training_info.json", prepare=lambda: self._clear_unfinished(folder))
        return folder / "model.pt"

    def _clear_unfinished(self, folder: Path) -> None:
        """Remove the model.pt an interrupted run of a watermark stage left (train.json refuses to overwrite one)."""
        unfinished = folder / "model.pt"
        if unfinished.exists():
            print(f"[{self.x.name}] removing {unfinished}: left by an interrupted run of this stage")
            unfinished.unlink()

    def _vetted_key(self, method: Method, folder: Path, surrogate: Path, owner: int) -> int:
        """Our key seed, vetted against the surrogate (configs/vet_key.json; drawn with the owner's seed, legacy: the
        data seed)."""
        vetting = folder.parent / "key_vetting.json"
        vet = {k: method.settings[k] for k in ("image_size", "key_cells", "key_pattern", "key_magnitude")}
        vet |= {**self.surrogate_keys, "query_size": self.x.query_size}
        configs = ["configs/train.json", "configs/vet_key.json"]
        seed = self.x.data_seed if self.x.legacy else owner
        overrides = {"surrogate_ckpt": surrogate / "model.pt", "key_vetting_file": vetting, "seed": seed}
        cmd = bundle_cmd("vetting", configs, **self.data, **overrides, **vet)
        self.stages.run(f"{method.name} {self.owner_tag(owner)}key vetting", cmd, vetting)
        return int(self.read(vetting)["key_seed"])

    def watermark_family(
        self,
        method: Method,
        checkpoint: Path,
        surrogate: Path,
        owner: int,
        who: str | None = None,
        pool_folder: Path | None = None,
        data: Path | None = None,
    ) -> Path | None:
        """The owner's family for the calibrated verdict, fixed before the release: ``family.json`` beside the
        owner's ``checkpoint`` (where configs/verify.json finds it) over the owner's watermark and the method's pool
        (watermarks made with the same recipe and the ``family_pool`` seeds against ``surrogate``, shared by every
        owner; ``pool_folder`` and ``data``: another pool's folder and phantoms, e.g. an independent owner's), the
        owner's place drawn from its seed (``who``: the owner's words in the stage name). None without a pool."""
        pool_seeds = self.x.seed_roles.family_pool
        if not pool_seeds:
            return None
        folder = pool_folder or self.models / method.name / "family_pool"
        pool = [self.watermark(method, folder / f"seed{seed}", surrogate, seed, False, data) for seed in pool_seeds]
        out = checkpoint.parent / "family.json"
        index = int(np.random.default_rng([owner, 17]).integers(len(pool) + 1))
        cmd = [sys.executable, "scripts/make_family.py", "assemble", "--owner_ckpt", str(checkpoint), "--others"]
        cmd += [*map(str, pool), "--owner_index", str(index), "--out", str(out)]
        if method.kind != "trigger":  # a trigger pool also serves independent owners, whose surrogates are others
            cmd.append("--strip_surrogates")  # a generator pool was trained against the owners' surrogate
        who = self.owner_tag(owner) if who is None else who
        self.stages.run(f"{method.name} {who}family of {len(pool) + 1}", cmd, out)
        return out

    def release(self, method: Method, checkpoint: Path, owner: int) -> tuple[Path, Path]:
        """The owner's release of the phantoms (marked images drawn with the owner's seed; legacy: the data seed)
        and its private manifest."""
        release = self.out / "release" / method.name
        release = release if self.x.legacy else release / f"owner{owner}"
        manifest = self.owner_dir(method.name, owner) / "release_manifest.json"
        cmd = bundle_cmd(
            "watermarking",
            ["configs/watermark.json"],
            **self.data,
            release_dir=release,
            manifest_file=manifest,
            ckpt_path=checkpoint,
            gamma=method.gamma,
            decoy_fraction=method.decoy_fraction,
            seed=self.x.data_seed if self.x.legacy else owner,
            progress=False,
        )
        # the manifest is written first with "complete": false: a release interrupted (e.g. a full disk) runs again
        self.stages.run(f"{method.name} {self.owner_tag(owner)}release", cmd, manifest, finished=_complete_release)
        return release, manifest

    def evaluate_suspect(self, method: str, suspect: Path, manifest: Path, **recipe: Any) -> dict[str, Any]:
        """The suspect's clean-test accuracy, its WSR at its validation threshold and the release's quality."""
        configs = CLASSIFIER + list(recipe.get("configs", ())) + EVALUATE + ["configs/evaluate.json"]
        keys = {**self.eval_keys, **_evaluation_keys(recipe)}
        cmd = bundle_cmd("run", configs, ckpt_dir=suspect, release_manifest=manifest, **self.data, **keys)
        self.stages.run(f"{method} evaluation '{self._model_name(method, suspect)}'", cmd, suspect / "evaluation.json")
        return self.read(suspect / "evaluation.json")

    def _model_name(self, method: str, model: Path) -> str:
        """A model's name in stage names: its folder (under the method's folder, beyond a legacy declaration)."""
        inside = model.is_relative_to(self.models / method) and not self.x.legacy
        return str(model.relative_to(self.models / method)) if inside else model.name

    def _verification(self, method: str, model: Path, scenario: str = "malicious", tag: str = "") -> Path:
        """The verification folder of ``model`` in ``scenario`` (``tag``: the watermark's owner, when not the
        model's own)."""
        name = f"{scenario}_{tag}{self._model_name(method, model).replace('/', '_')}"
        return self.out / "verification" / method / name

    def detectability(
        self, method: str, release: Path, manifest: Path, suspect: Path, variant: str, owner: int
    ) -> dict[str, Any]:
        """How well a data user finds the release's marked files (scripts/detect_marked.py), with ``suspect``'s
        features (a malicious model of kind ``variant``)."""
        recipe = {**self.x.classifier, **self.x.suspect, **self.x.suspect_variants.get(variant, {})}
        out = self.owner_dir(method, owner) / "detectability.json"
        cmd = [sys.executable, "scripts/detect_marked.py", "--release", str(release), "--manifest", str(manifest)]
        cmd += ["--suspect", str(suspect / "model.pt"), "--arch", str(recipe.get("arch", "resnet18"))]
        cmd += ["--image-size", str(recipe.get("image_size", self.x.query_size)), "--seed", str(self.x.data_seed)]
        self.stages.run(f"{method} {self.owner_tag(owner)}detectability", [*cmd, "--out", str(out)], out)
        return self.read(out)

    def verify(
        self, method: str, scenario: str, suspect: Path, watermark: Path, query_size: int, folder: Path
    ) -> dict[str, Any]:
        """Verify ``suspect`` (queried at ``query_size``; under the current protocol from the files at that size)
        with ``watermark`` (configs/verify.json) into ``folder``; the numbers the tables need, with the calibrated
        verdict's block where the report has one."""
        overrides = {**self.data, "suspect": suspect, "generator_ckpt": watermark, "output_dir": folder}
        overrides |= {"query_size": query_size, "seed": self.x.data_seed, "progress": False}
        configs = ["configs/verify.json"] + ([] if self.x.legacy else [VERIFY_OWN_SIZE])
        cmd = bundle_cmd("verifying", configs, **{**overrides, **self.x.verification})
        where = folder.name if self.x.legacy else folder.relative_to(self.out / "verification" / method)
        if self.x.legacy:  # the stage names it was published with
            where = f"{scenario} '{suspect.name}'"
        self.stages.run(
            f"{method} verification {where}", cmd, folder / "verification.json", needs=[suspect / "model.pt"]
        )
        report = self.read(folder / "verification.json")
        keep = ("p_value", "wilcoxon_p", "delta_p", "wsr", "verdict", "owned", "n", "control", "calibrated")
        available = (report.get("calibrated") or {}).get("available")  # only where the watermark has a family
        kept = {key: report.get(key) for key in keep if key != "calibrated" or available}
        return kept | {"report": str(folder / "verification.json")}


def _complete_release(manifest: Path) -> bool:
    """Whether a release manifest records a finished release (an unreadable one is not)."""
    try:
        return bool(json.loads(manifest.read_text(encoding="utf-8")).get("complete"))
    except (OSError, ValueError):
        return False


def watermark_recipe(method: Method, surrogate: Path, seed: int, vetting: bool) -> str:
    """What makes a watermark: the method's kind, override files and settings, the surrogate, seed and key vetting
    (not its name, nor the release's gamma or decoys). Two methods with the same recipe get the same checkpoint."""
    made = {"kind": method.kind, "configs": list(method.configs), "settings": dict(method.settings)}
    made |= {"surrogate": str(surrogate), "seed": seed, "vetting": vetting}
    if method.kind == "trigger":  # a trigger is made for its method name (badnets, blended, ...)
        made["method"] = method.name
    return json.dumps(made, sort_keys=True)


def _training_keys(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe's config overrides (its override files and its evasion are not)."""
    return {k: v for k, v in recipe.items() if k not in ("configs", "evasion")}


def _evaluation_keys(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A training recipe's overrides that an evaluation of the same classifier needs (all but the epochs)."""
    return {k: v for k, v in _training_keys(recipe).items() if k != "max_epochs"}


def run_experiment(
    experiment: Experiment | SegmentationExperiment,
    root: Path,
    out: Path,
    dry_run: bool = False,
    discard_tuned: bool = False,
    min_free_gb: float = MIN_FREE_GB,
) -> dict[str, Any]:
    """Run (or resume) every stage of ``experiment`` under ``out``; write and return ``collected.json`` (a
    segmentation declaration: :func:`~xmark_bundle.experiments.segmentation.run_segmentation`).

    ``dry_run``: print every stage and its command, run none, write nothing; the returned numbers are
    :data:`PENDING` where a stage has not run, and ``planned_stages`` lists (name, command) of those still to run.
    ``discard_tuned``: discard each fine-tuned and pruned model once its evaluation and verification are recorded
    (:meth:`~xmark_bundle.experiments.stages.Stages.discard`; the numbers do not change). ``min_free_gb``: stop
    before a stage when less disk is free under ``out``."""
    if isinstance(experiment, SegmentationExperiment):
        collected = run_segmentation(experiment, root, out, dry_run, min_free_gb)
        if not dry_run:
            save_figures(collected, out)
        return collected
    run, x, roles = _Run(experiment, root, out, dry_run, discard_tuned, min_free_gb), experiment, experiment.seed_roles
    run.make_data()
    surrogate = run.classifier("surrogate", run.models / "surrogate", run.phantoms, roles.surrogate, evaluate=True)
    independents = {seed: run.independent_owner(seed) for seed in roles.independent_owners}
    collected: dict[str, Any] = {
        "experiment": x.name,
        "protocol": "legacy" if x.legacy else "current",
        "seeds": dict(x.seeds),
        "surrogate": _report(surrogate),
        "benign": {},
        "suspect_kinds": {},  # each kind of suspect (variant): its architecture, size and evasion, for the labels
        "methods": {},
    }
    if not x.legacy:
        collected["seed_roles"] = {"data": roles.data, "development": roles.development, **roles.by_role()}
        collected["seed_roles"]["independent_phantoms"] = roles.independent_phantoms

    def started(recipe: dict[str, Any]) -> dict[str, Any]:  # a suspect's or benign model's recipe, pre-trained start
        if not x.pretrain:
            return recipe
        return {**recipe, "pretrained_weights": run.pretrained(*x.kind_of(recipe))}

    def benign_model(arch: str, seed: int, overrides: Mapping[str, Any]) -> tuple[Path, int]:
        size = overrides.get("image_size")
        name = f"{arch}_seed{seed}" if size is None else f"{arch}_{size}px_seed{seed}"
        folder = run.models / "benign" / name
        recipe = started({**x.suspect, "arch": arch, **overrides})
        run.classifier(folder.name, folder, run.phantoms, seed, evaluate=True, **recipe)
        return folder, int(recipe.get("image_size", x.query_size))

    benign_models = []
    for arch, benign_seed, overrides in x.benign:
        folder, size = benign_model(arch, benign_seed, overrides)
        benign_models.append((folder, size))
        collected["benign"][folder.name] = {"arch": arch, "seed": benign_seed, **overrides, **_report(folder)}
    seed_controls = [] if x.legacy else [(surrogate, x.query_size)]
    if not x.legacy:  # a benign model of each other declared architecture trained with the surrogate's seed
        surrogate_arch, other = x.kind_of(x.classifier)[0], {}
        for arch, _, overrides in x.benign:
            if arch != surrogate_arch:
                other.setdefault(arch, overrides)
        seed_controls += [benign_model(arch, roles.surrogate, overrides) for arch, overrides in other.items()]
    for variant, overrides in x.suspect_variants.items():
        recipe = {**x.suspect, **overrides}
        arch, size = x.kind_of(recipe)
        collected["suspect_kinds"][variant] = {
            "arch": arch,
            "image_size": size,
            **{key: recipe[key] for key in ("evasion", "configs") if key in recipe},
        }
    for method in x.methods.values():
        others = {}
        for seed, (other_surrogate, data) in independents.items():
            folder = run.models / method.name
            folder = folder / "watermark_independent" if x.legacy else folder / f"independent_owner{seed}" / "watermark"
            others[f"independent_owner{seed}"] = run.watermark(method, folder, other_surrogate, seed, False, data)
            who = f"independent owner {seed} "
            if method.kind == "trigger" and not x.legacy:
                # a trigger's pattern depends on its seed only, not on the surrogate: the method's pool is also an
                # independent owner's family, so Ind-W gets the calibrated verdict too
                run.watermark_family(method, others[f"independent_owner{seed}"], surrogate, seed, who)
            elif x.independent_families:  # a generator's pool trained against this owner's surrogate, on its data
                pool = folder.parent / "family_pool"
                run.watermark_family(method, others[f"independent_owner{seed}"], other_surrogate, seed, who, pool, data)
        entry: dict[str, Any] = {"kind": method.kind, "gamma": method.gamma, "suspects": {}, "ind_m": {}}
        if not x.legacy:
            entry["ind_m_seed_controls"] = {}
        for owner in roles.owners:
            _owner_runs(run, method, owner, surrogate, others, benign_models, seed_controls, entry, started)
        collected["methods"][method.name] = entry
    run.stages.finish(collected, out)
    if not dry_run:
        save_figures(collected, out)
    return collected


def _owner_runs(
    run: _Run,
    method: Method,
    owner: int,
    surrogate: Path,
    others: Mapping[str, Path],
    benign_models: list[tuple[Path, int]],
    seed_controls: list[tuple[Path, int]],
    entry: dict[str, Any],
    started: Any,
) -> None:
    """One owner's watermark, release, suspects (each verified with the owner's and every independent owner's
    watermark) and Ind-M rows, into the method's ``entry`` (keys prefixed with the owner beyond a legacy run)."""
    x, prefix = run.x, "" if run.x.legacy else f"owner{owner}/"
    folder = run.owner_dir(method.name, owner)
    ours = run.watermark(method, folder / "watermark", surrogate, owner, vetting=method.vet_key)
    run.watermark_family(method, ours, surrogate, owner)  # before the release, as an owner must
    release, manifest = run.release(method, ours, owner)
    if owner == x.seed_roles.owners[0]:  # the release's summary and the watermark's training: the first owner's
        entry["release"] = _release_summary(run.read(manifest))
        entry["watermark"] = _watermark_training(ours.parent)
    tag, owner_field = ("", {}) if x.legacy else (f"owner{owner}_", {"owner": owner})
    for variant, overrides in x.suspect_variants.items():
        recipe = started({**x.suspect, **overrides})
        query_size = int(recipe.get("image_size", x.query_size))
        data_dir = release if "evasion" not in recipe else run.evaded(method.name, release, recipe["evasion"])
        for suspect_seed in x.seeds["suspects"]:
            name = f"suspect_seed{suspect_seed}" if not variant else f"suspect_{variant}_seed{suspect_seed}"
            label = f"{method.name} {run.owner_tag(owner)}suspect {variant + ' ' if variant else ''}seed {suspect_seed}"
            suspect = run.classifier(label, folder / name, data_dir, suspect_seed, evaluate=False, **recipe)
            evaluation = run.evaluate_suspect(method.name, suspect, manifest, **recipe)
            where = run._verification(method.name, suspect)
            malicious = run.verify(method.name, "malicious", suspect, ours, query_size, where)
            ind_w = {}
            for other, watermark in others.items():
                where = run._verification(method.name, suspect, "ind_w", "" if x.legacy else f"{other}_")
                ind_w[other] = run.verify(method.name, "ind_w", suspect, watermark, query_size, where)
            row = {
                **owner_field,
                "seed": suspect_seed,
                "variant": variant,
                "mean_ba": evaluation["mean_ba"],
                "mean_auroc": evaluation["mean_auroc"],
                "wsr_at_validation_threshold": evaluation["wsr"],
                "release_quality": {k: v for k, v in evaluation["release_quality"].items() if k != "files"},
                "lpips_backbone": evaluation.get("lpips_backbone"),
                "malicious": malicious,
            }
            row |= {"ind_w": next(iter(ind_w.values()))} if x.legacy else {"ind_w_owners": ind_w}
            entry["suspects"][prefix + suspect.name] = row
            if x.removal and not variant:
                row["removal"] = run.removal(method.name, suspect, ours, recipe)
    for rows, models in (("ind_m", benign_models), ("ind_m_seed_controls", seed_controls)):
        for benign, query_size in models:
            where = run._verification(method.name, benign, "ind_m", tag)
            entry[rows][prefix + benign.name] = owner_field | run.verify(
                method.name, "ind_m", benign, ours, query_size, where
            )
    if x.detectability and owner == x.seed_roles.owners[0]:
        name, first = next((k, s) for k, s in entry["suspects"].items() if k.startswith(prefix))
        suspect = folder / name.removeprefix(prefix)
        detected = run.detectability(method.name, release, manifest, suspect, first["variant"], owner)
        entry["detectability"] = detected


def _report(ckpt: Path) -> dict[str, Any]:
    """BA and AUROC of a classifier's clean test evaluation (empty when it was not evaluated)."""
    path = ckpt / "classification_report.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    return {"mean_ba": report["mean_ba"], "mean_auroc": report["mean_auroc"]}


def _watermark_training(folder: Path) -> dict[str, Any]:
    """A trained generator's validation metrics at its kept (best) epoch; empty for a trigger."""
    path = folder / "logs" / "metrics.json"
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text())
    best = int(metrics["best"]["epoch"])
    row = next(r for r in metrics["history"] if r["epoch"] == best)
    return {"epoch": best, **{key: row[key] for key in ("val_wsr", "val_lap", "val_lpips", "val_psnr") if key in row}}


def _release_summary(m: Mapping[str, Any]) -> dict[str, Any]:
    """What the release (its manifest ``m``) marked and whether every file kept the budget."""
    keys = ("counts", "max_abs_change01", "max_change_of_range", "budget_ok")
    return {key: m[key] for key in keys if key in m}
