"""Run a declared experiment as ``monai.bundle`` runs: data, surrogates, each method's watermarks and release,
suspects, benign models, evaluations and the three verification scenarios, then collect what they measured.

Layout under the output folder: ``phantoms/`` (the data and its datalist), ``models/surrogate``,
``models/surrogate_independent`` (the independent owner's), ``models/benign/<arch>_seed<k>``, and per method
``models/<method>/{watermark,watermark_independent,release_manifest.json,suspect_seed<k>}``,
``release/<method>/`` and ``verification/<method>/<scenario>_<model>/``. Every stage is skipped when its output
exists, so an interrupted run resumes; ``collected.json`` holds every number the tables are made of and the figures
beside it (``scenarios.png``; ``removal.png``, ``variants.png``, ``detectability.png`` where they apply) are drawn by
:mod:`~xmark_bundle.experiments.figures`.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xmark_bundle.experiments.figures import save_figures
from xmark_bundle.experiments.plan import Experiment, Method
from xmark_bundle.experiments.stages import Stages, bundle_cmd
from xmark_bundle.fileio import write_json

__all__ = ["INDEPENDENT_OFFSET", "run_experiment", "watermark_recipe"]

#: The independent owner's surrogate and watermark seeds are the data seed plus this offset (never a suspect's seed).
INDEPENDENT_OFFSET = 1000
CLASSIFIER = ["configs/train_classifier.json"]
EVALUATE = ["configs/evaluate_classifier.json"]  # layered on CLASSIFIER and a recipe's own override files


class _Run:
    """One run of ``experiment`` into ``out``."""

    def __init__(self, experiment: Experiment, root: Path, out: Path) -> None:
        self.x, self.root, self.out = experiment, root, out
        self.stages = Stages(root, out, experiment.name)
        self.trained: dict[str, Path] = {}  # a watermark recipe (watermark_recipe) -> the checkpoint it made
        self.phantoms, self.models = out / "phantoms", out / "models"
        self.data = {"dataset_dir": self.phantoms, "datalist_file": self.phantoms / "datalist.json"}
        self.eval_keys = _evaluation_keys(experiment.classifier)
        # the surrogate sees images at the size it was trained at (train.json and trigger.json default to 224 px)
        self.surrogate_keys = {
            "surrogate_size": experiment.query_size,
            "surrogate_arch": experiment.classifier.get("arch", "resnet18"),
        }

    def make_data(self) -> None:
        """The phantom set of the data seed and its datalist."""
        self._phantom_set("", self.phantoms, self.x.phantoms, self.x.data_seed)

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
        self.stages.run(f"classifier '{name}'", cmd, ckpt / "training_info.json")
        return self.evaluation(name, ckpt, recipe) if evaluate else ckpt

    def evaluation(self, name: str, ckpt: Path, recipe: Mapping[str, Any]) -> Path:
        """Evaluate the classifier folder ``ckpt`` on the clean test split (classification_report.json); ``ckpt``."""
        keys = {**self.eval_keys, **_evaluation_keys(recipe)}
        cmd = bundle_cmd(
            "run", CLASSIFIER + list(recipe.get("configs", ())) + EVALUATE, ckpt_dir=ckpt, **self.data, **keys
        )
        self.stages.run(f"evaluation '{name}'", cmd, ckpt / "classification_report.json")
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
            report = json.loads((folder / "classification_report.json").read_text())
            verified = self.verify(method, "malicious", folder, watermark, size)
            run = {"mode": mode, "epochs": epochs, **rate, "mean_ba": report["mean_ba"], **verified}
            if not epochs:  # pruned alone: nothing trained
                return run
            # a fine-tuning keeps its best epoch on the clean validation split, or its last (``kept_checkpoint``)
            info = json.loads((folder / "training_info.json").read_text())  # folders before 0.14.0 kept the best
            kept = info.get("kept_checkpoint", "best")
            return run | {"kept_checkpoint": kept, "kept_epoch": info.get("kept_epoch", info.get("best_epoch"))}

        results: dict[str, Any] = {}
        for mode in ("head", "full"):
            for epochs in spec.get(f"{mode}_epochs", []):
                folder = self._fine_tuned(method, suspect, f"{mode}_{epochs}", mode, epochs, recipe)
                results[f"{mode}_{epochs}"] = measured(folder, mode, epochs)
        for rate in map(float, spec.get("prune_rates", [])):
            pruned = self.pruned(method, suspect, rate, recipe)
            results[f"pruned_{rate:g}"] = measured(pruned, "pruned", 0, rate=rate)
            epochs = spec.get("prune_epochs", 2)
            folder = self._fine_tuned(method, pruned, str(epochs), "fine-pruned", epochs, recipe)
            results[f"fine_pruned_{rate:g}"] = measured(folder, "fine-pruned", epochs, rate=rate)
        return results

    def pruned(self, method: str, suspect: Path, rate: float, recipe: dict[str, Any]) -> Path:
        """``suspect`` with the ``rate`` share of its penultimate units that the clean subset leaves least active
        pruned (scripts/prune_classifier.py), evaluated: a classifier folder, the start of its fine-pruning."""
        out = suspect.parent / f"{suspect.name}_pruned_{rate:g}"
        cmd = [sys.executable, "scripts/prune_classifier.py", "--ckpt", str(suspect / "model.pt"), "--rate", str(rate)]
        cmd += ["--datalist", str(self.clean_subset()), "--dataset-dir", str(self.phantoms), "--out", str(out)]
        self.stages.run(f"{method} {suspect.name} pruning at {rate:g}", cmd, out / "model.pt")
        return self.evaluation(f"{method} {out.name}", out, recipe)

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
        label = f"{method} {start.name} fine-tuned ({layers}, {epochs} epochs{', last kept' if kept == 'last' else ''})"
        return self.classifier(label, start.parent / name, self.phantoms, 0, True, self.clean_subset(), **tuned)

    def evaded(self, method: str, release: Path, evasion: str) -> Path:
        """``release`` as a data user who applies ``evasion`` to every image trains on it (scripts/evade_release.py)."""
        out = self.out / "release_evaded" / method / evasion
        cmd = [sys.executable, "scripts/evade_release.py", "--release", str(release), "--evasion", evasion]
        self.stages.run(
            f"{method} release after {evasion}",
            [*cmd, "--out", str(out), "--seed", str(self.x.data_seed)],
            out / "datalist.json",
        )
        return out

    def watermark(self, method: Method, folder: Path, surrogate: Path, seed: int, vetting: bool) -> Path:
        """Make ``method``'s watermark checkpoint in ``folder`` (a trained generator or a trigger), or reuse the one an
        earlier method of the experiment made with the same recipe (e.g. arms that differ in the release's gamma)."""
        recipe = watermark_recipe(method, surrogate, seed, vetting)
        if recipe in self.trained:
            print(f"[{self.x.name}] {method.name} watermark '{folder.name}': the recipe of {self.trained[recipe]}")
            return self.trained[recipe]
        self.trained[recipe] = self._watermark(method, folder, surrogate, seed, vetting)
        return self.trained[recipe]

    def _watermark(self, method: Method, folder: Path, surrogate: Path, seed: int, vetting: bool) -> Path:
        name = f"{method.name} watermark '{folder.name}'"
        common = {"ckpt_dir": folder, "seed": seed, **self.surrogate_keys, **method.settings}
        if method.kind == "trigger":
            trigger = {"method": method.name, **common}
            cmd = bundle_cmd("making", ["configs/trigger.json"], surrogate_ckpt=surrogate / "model.pt", **trigger)
            self.stages.run(name, cmd, folder / "model.pt")
            return folder / "model.pt"
        key: dict[str, Any] = {}
        if method.settings.get("key_cells"):
            key = {"key_seed": self._vetted_key(method, folder, surrogate) if vetting else seed + 1}
        unfinished = folder / "model.pt"  # left by an interrupted run: train.json refuses to overwrite a checkpoint
        if unfinished.exists() and not (folder / "training_info.json").exists():
            print(f"[{self.x.name}] removing {unfinished}: left by an interrupted run of this stage")
            unfinished.unlink()
        configs = ["configs/train.json", *method.configs]
        overrides = {**self.data, **common, **key, "output_dir": folder / "logs"}
        cmd = bundle_cmd("training", configs, surrogate_ckpt=surrogate / "model.pt", **overrides)
        self.stages.run(name, cmd, folder / "training_info.json")
        return folder / "model.pt"

    def _vetted_key(self, method: Method, folder: Path, surrogate: Path) -> int:
        """Our key seed, vetted against the surrogate (configs/vet_key.json)."""
        vetting = folder.parent / "key_vetting.json"
        vet = {k: method.settings[k] for k in ("image_size", "key_cells", "key_pattern", "key_magnitude")}
        vet |= {**self.surrogate_keys, "query_size": self.x.query_size}
        configs = ["configs/train.json", "configs/vet_key.json"]
        overrides = {"surrogate_ckpt": surrogate / "model.pt", "key_vetting_file": vetting, "seed": self.x.data_seed}
        cmd = bundle_cmd("vetting", configs, **self.data, **overrides, **vet)
        self.stages.run(f"{method.name} key vetting", cmd, vetting)
        return int(json.loads(vetting.read_text())["key_seed"])

    def release(self, method: Method, checkpoint: Path) -> tuple[Path, Path]:
        """The method's release of the phantoms and its private manifest."""
        release, manifest = self.out / "release" / method.name, self.models / method.name / "release_manifest.json"
        cmd = bundle_cmd(
            "watermarking",
            ["configs/watermark.json"],
            **self.data,
            release_dir=release,
            manifest_file=manifest,
            ckpt_path=checkpoint,
            gamma=method.gamma,
            decoy_fraction=method.decoy_fraction,
            seed=self.x.data_seed,
            progress=False,
        )
        self.stages.run(f"{method.name} release", cmd, manifest)
        return release, manifest

    def evaluate_suspect(self, method: str, suspect: Path, manifest: Path, **recipe: Any) -> dict[str, Any]:
        """The suspect's clean-test accuracy, its WSR at its validation threshold and the release's quality."""
        configs = CLASSIFIER + list(recipe.get("configs", ())) + EVALUATE + ["configs/evaluate.json"]
        keys = {**self.eval_keys, **_evaluation_keys(recipe)}
        cmd = bundle_cmd("run", configs, ckpt_dir=suspect, release_manifest=manifest, **self.data, **keys)
        self.stages.run(f"{method} evaluation '{suspect.name}'", cmd, suspect / "evaluation.json")
        return json.loads((suspect / "evaluation.json").read_text())

    def detectability(self, method: str, release: Path, manifest: Path, suspect: Path, variant: str) -> dict[str, Any]:
        """How well a data user finds the release's marked files (scripts/detect_marked.py), with ``suspect``'s
        features (a malicious model of kind ``variant``)."""
        recipe = {**self.x.classifier, **self.x.suspect, **self.x.suspect_variants.get(variant, {})}
        out = self.models / method / "detectability.json"
        cmd = [sys.executable, "scripts/detect_marked.py", "--release", str(release), "--manifest", str(manifest)]
        cmd += ["--suspect", str(suspect / "model.pt"), "--arch", str(recipe.get("arch", "resnet18"))]
        cmd += ["--image-size", str(recipe.get("image_size", self.x.query_size)), "--seed", str(self.x.data_seed)]
        self.stages.run(f"{method} detectability", [*cmd, "--out", str(out)], out)
        return json.loads(out.read_text())

    def verify(self, method: str, scenario: str, suspect: Path, watermark: Path, query_size: int) -> dict[str, Any]:
        """Verify ``suspect`` (queried at ``query_size``) with ``watermark`` (configs/verify.json); the numbers the
        tables need."""
        folder = self.out / "verification" / method / f"{scenario}_{suspect.name}"
        overrides = {**self.data, "suspect": suspect, "generator_ckpt": watermark, "output_dir": folder}
        overrides |= {"query_size": query_size, "seed": self.x.data_seed, "progress": False}
        cmd = bundle_cmd("verifying", ["configs/verify.json"], **{**overrides, **self.x.verification})
        self.stages.run(f"{method} verification {scenario} '{suspect.name}'", cmd, folder / "verification.json")
        report = json.loads((folder / "verification.json").read_text())
        keep = ("p_value", "wilcoxon_p", "delta_p", "wsr", "verdict", "owned", "n", "control")
        return {key: report.get(key) for key in keep} | {"report": str(folder / "verification.json")}


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


def run_experiment(experiment: Experiment, root: Path, out: Path) -> dict[str, Any]:
    """Run (or resume) every stage of ``experiment`` under ``out``; write and return ``collected.json``."""
    run, x = _Run(experiment, root, out), experiment
    run.make_data()
    seed = x.data_seed
    surrogate = run.classifier("surrogate", run.models / "surrogate", run.phantoms, seed, evaluate=True)
    independent_surrogate = run.classifier(
        "surrogate_independent", run.models / "surrogate_independent", run.phantoms, seed + INDEPENDENT_OFFSET, False
    )
    collected: dict[str, Any] = {
        "experiment": x.name,
        "seeds": dict(x.seeds),
        "surrogate": _report(surrogate),
        "benign": {},
        "suspect_kinds": {},  # each kind of suspect (variant): its architecture, size and evasion, for the labels
        "methods": {},
    }

    def started(recipe: dict[str, Any]) -> dict[str, Any]:  # a suspect's or benign model's recipe, pre-trained start
        if not x.pretrain:
            return recipe
        return {**recipe, "pretrained_weights": run.pretrained(*x.kind_of(recipe))}

    benign_models = []
    for arch, benign_seed, overrides in x.benign:
        size = overrides.get("image_size")
        name = f"{arch}_seed{benign_seed}" if size is None else f"{arch}_{size}px_seed{benign_seed}"
        folder = run.models / "benign" / name
        recipe = started({**x.suspect, "arch": arch, **overrides})
        run.classifier(folder.name, folder, run.phantoms, benign_seed, evaluate=True, **recipe)
        benign_models.append((folder, recipe.get("image_size", x.query_size)))
        collected["benign"][folder.name] = {"arch": arch, "seed": benign_seed, **overrides, **_report(folder)}
    for variant, overrides in x.suspect_variants.items():
        recipe = {**x.suspect, **overrides}
        arch, size = x.kind_of(recipe)
        collected["suspect_kinds"][variant] = {
            "arch": arch,
            "image_size": size,
            **{key: recipe[key] for key in ("evasion", "configs") if key in recipe},
        }
    for method in x.methods.values():
        folder = run.models / method.name
        ours = run.watermark(method, folder / "watermark", surrogate, seed, vetting=method.vet_key)
        other = run.watermark(
            method, folder / "watermark_independent", independent_surrogate, seed + INDEPENDENT_OFFSET, False
        )
        release, manifest = run.release(method, ours)
        entry: dict[str, Any] = {"kind": method.kind, "gamma": method.gamma, "suspects": {}, "ind_m": {}}
        entry["release"] = _release_summary(manifest)
        entry["watermark"] = _watermark_training(ours.parent)
        for variant, overrides in x.suspect_variants.items():
            recipe = started({**x.suspect, **overrides})
            query_size = int(recipe.get("image_size", x.query_size))
            data_dir = release if "evasion" not in recipe else run.evaded(method.name, release, recipe["evasion"])
            for suspect_seed in x.seeds["suspects"]:
                name = f"suspect_seed{suspect_seed}" if not variant else f"suspect_{variant}_seed{suspect_seed}"
                label = f"{method.name} suspect {variant + ' ' if variant else ''}seed {suspect_seed}"
                suspect = run.classifier(label, folder / name, data_dir, suspect_seed, evaluate=False, **recipe)
                evaluation = run.evaluate_suspect(method.name, suspect, manifest, **recipe)
                entry["suspects"][suspect.name] = {
                    "seed": suspect_seed,
                    "variant": variant,
                    "mean_ba": evaluation["mean_ba"],
                    "mean_auroc": evaluation["mean_auroc"],
                    "wsr_at_validation_threshold": evaluation["wsr"],
                    "release_quality": {k: v for k, v in evaluation["release_quality"].items() if k != "files"},
                    "lpips_backbone": evaluation.get("lpips_backbone"),
                    "malicious": run.verify(method.name, "malicious", suspect, ours, query_size),
                    "ind_w": run.verify(method.name, "ind_w", suspect, other, query_size),
                }
                if x.removal and not variant:
                    entry["suspects"][suspect.name]["removal"] = run.removal(method.name, suspect, ours, recipe)
        for benign, query_size in benign_models:
            entry["ind_m"][benign.name] = run.verify(method.name, "ind_m", benign, ours, query_size)
        if x.detectability:
            name, first = next(iter(entry["suspects"].items()))
            suspect = run.models / method.name / name
            entry["detectability"] = run.detectability(method.name, release, manifest, suspect, first["variant"])
        collected["methods"][method.name] = entry
    collected["stage_times_s"] = run.stages.run_times()
    write_json(out / "collected.json", collected)
    save_figures(collected, out)
    return collected


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


def _release_summary(manifest: Path) -> dict[str, Any]:
    """What the release marked and whether every file kept the budget."""
    m = json.loads(manifest.read_text())
    return {"counts": m["counts"], "max_abs_change01": m["max_abs_change01"], "budget_ok": m["budget_ok"]}
