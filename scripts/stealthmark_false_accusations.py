"""StealthMark false accusations: how often does the owner's verification call a model that is not the owner's?

Trains, on one phantom data set with lung masks, the owner's watermarked model, ``--n-benign`` benign models (no
trigger, split over ``--benign-archs``) and ``--n-other-keys`` models watermarked with the same trigger under other
keys (the ``noise`` trigger is the only keyed one), then verifies every model with the owner's record on the
validation phantoms twice: as they are, and with an ordinary burned-in marker ("L", "R", "AP" or "PORTABLE", white,
in a top corner where the ``text`` trigger writes "TEST") on every query image. Half of every model's training images
carry such a marker too (a seeded half), as hospital data do. Per test the script counts k of N models verified,
with Clopper-Pearson 95 % intervals:

- ``floor``: the bundle's paired floor test against a margin of epsilon/4 (the verdict);
- ``authors``: the authors' detector (logistic regression of the per-image minimum, chi-square p < alpha);
- ``qr_a``: the authors' grid-occlusion QR explanation decodes to the owner's ID (not model-dependent);
- ``qr_b``: the model-dependent random-mask QR explanation decodes to the owner's ID; ``qr_b_binomial``: its
  data-module agreement has binomial p < alpha; and the rank p of each model's QR (b) rise estimate (twice the mean
  signed module weight) among the non-owner models.

``--extra-triggers`` also verifies every model against hypothetical owners who use those triggers with the owner's
key and epsilon (floor and authors' tests only): the false-accusation rate of an owner of the ``text`` trigger.

Resumable: a model whose ``model.pt`` exists is not retrained and an evaluation already in ``results.json`` is not
redone; ``results.json`` is rewritten atomically after every evaluation. Training is the bundle's recipe
(``targets.StealthMarkd``'s trigger and ``max(mask, epsilon)`` target on the keyed share, BCE, Adam) in a plain loop
without per-epoch validation (the last step is kept), so that a CPU can train tens of models.

Example (the README's run): ``python scripts/stealthmark_false_accusations.py --out outputs/stealthmark_fa``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `xmark_bundle` importable when run as a script

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402
from tqdm import tqdm  # noqa: E402

from xmark_bundle.data.phantoms import SEG_DATALIST, write_phantom_dataset  # noqa: E402
from xmark_bundle.fileio import atomic_path  # noqa: E402
from xmark_bundle.stealthmark.evaluation import load_segmentation_pairs  # noqa: E402
from xmark_bundle.stealthmark.metrics import dice_per_image  # noqa: E402
from xmark_bundle.stealthmark.networks import build_segmentation_network  # noqa: E402
from xmark_bundle.stealthmark.records import write_records  # noqa: E402
from xmark_bundle.stealthmark.targets import StealthMarkd, keyed_share  # noqa: E402
from xmark_bundle.stealthmark.triggers import burn_in_markers  # noqa: E402
from xmark_bundle.stealthmark.verification import (  # noqa: E402
    finite_json,
    qr_explanation,
    verify_segmentation_model,
)
from xmark_bundle.verification.queries import datalist_items  # noqa: E402
from xmark_bundle.verification.seg_blackbox import open_segmentation_suspect  # noqa: E402

TESTS = ("floor", "authors", "qr_a", "qr_b", "qr_b_binomial")


def clopper_pearson(k: int, n: int, level: float = 0.95) -> list[float]:
    """Exact (Clopper-Pearson) interval of a proportion k/n."""
    if n == 0:
        return [0.0, 1.0]
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return [float(ci.low), float(ci.high)]


def train_model(
    folder: Path,
    arch: str,
    width: int,
    seed: int,
    method: str,
    trigger: str,
    key: int,
    args: argparse.Namespace,
    images: torch.Tensor,
    masks: torch.Tensor,
    identifiers: list[str],
) -> float:
    """Train one model into ``folder`` (model.pt, segmentation_info.json, the owner's record); returns seconds."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    network = build_segmentation_network(arch, args.image_size, width)
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr)
    share = args.share if method != "none" else 0.0
    flags = torch.tensor([keyed_share(i, key, share) for i in identifiers])
    watermark = StealthMarkd(trigger=trigger, key=key, method=method, epsilon=args.epsilon)
    network.train()
    for _ in range(args.owner_steps if method != "none" else args.benign_steps):
        index = torch.randint(len(images), (args.batch_size,), generator=generator)
        pairs = [watermark({"image": images[i], "label": masks[i], "trigger": int(flags[i])}) for i in index.tolist()]
        x = torch.stack([p["image"] for p in pairs])
        y = torch.stack([p["label"] for p in pairs])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(network(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder.mkdir(parents=True, exist_ok=True)
    write_records(folder, arch, args.image_size, width, method, trigger, key, args.epsilon, args.share, seed)
    with atomic_path(folder / "model.pt") as tmp:
        torch.save({"model": network.state_dict()}, tmp)
    return time.perf_counter() - start


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every model of the run: name, role, architecture, width, seed, method, trigger, key."""
    owner_width = args.owner_width
    models = [
        {
            "name": "owner",
            "role": "owner",
            "arch": args.owner_arch,
            "width": owner_width,
            "seed": args.owner_seed,
            "method": "stealthmark",
            "trigger": args.trigger,
            "key": args.owner_key,
        }
    ]
    archs = args.benign_archs.split(",")
    for i in range(args.n_benign):
        arch = archs[i % len(archs)]
        models.append(
            {
                "name": f"benign_{i:02d}_{arch}",
                "role": "benign",
                "arch": arch,
                "width": args.benign_width,
                "seed": args.benign_seed + i,
                "method": "none",
                "trigger": args.trigger,
                "key": args.owner_key,
            }
        )
    for i in range(args.n_other_keys):
        models.append(
            {
                "name": f"other_key_{i:02d}",
                "role": "other_key",
                "arch": args.owner_arch,
                "width": owner_width,
                "seed": args.other_seed + i,
                "method": "stealthmark",
                "trigger": args.trigger,
                "key": args.other_key + i,
            }
        )
    seeds = [m["seed"] for m in models]
    keys = {args.owner_key, *(args.other_key + i for i in range(args.n_other_keys))}
    others = {args.phantom_seed, args.marker_seed, args.marker_seed + 1, args.query_seed, args.qr_seed}
    if len(set(seeds) | keys | others) != len(seeds) + len(keys) + len(others):
        raise SystemExit("seeds and keys of different roles must not coincide")
    return models


def verdicts(report: dict[str, Any], alpha: float) -> dict[str, bool]:
    """Whether each test calls the suspect the owner's."""
    authors = report.get("authors_detector") or {}
    p_chi2 = authors.get("p_chi2")
    out = {
        "floor": bool(report.get("verified")),
        "authors": bool(p_chi2 is not None and np.isfinite(p_chi2) and p_chi2 < alpha),
    }
    for name, qr in (report.get("qr_all") or {}).items():
        out[name] = bool(qr["decodes_owner"])
        if name == "qr_b":
            out["qr_b_binomial"] = bool(qr["p_binomial_data"] < alpha)
    return out


def summarise(results: dict[str, Any], alpha: float) -> dict[str, Any]:
    """k of N verified with Clopper-Pearson intervals, per query set, owner record, test and group of models."""
    summary: dict[str, Any] = {}
    for entry_key, entry in results["evaluations"].items():
        model, query_set, record = entry_key.split("|")
        role = results["models"][model]["role"]
        arch = results["models"][model]["arch"]
        groups = [role] + ([f"benign_{arch}"] if role == "benign" else [])
        if role != "owner":
            groups.append("not_owner")
        for group in groups:
            for test, verified in verdicts(entry, alpha).items():
                cell = (
                    summary.setdefault(f"{query_set}|{record}", {})
                    .setdefault(test, {})
                    .setdefault(group, {"k": 0, "n": 0})
                )
                cell["k"] += int(verified)
                cell["n"] += 1
    for tests in summary.values():
        for groups in tests.values():
            for cell in groups.values():
                cell["ci95"] = clopper_pearson(cell["k"], cell["n"])
    # rank p of the QR (b) rise estimate (2 x the mean signed module weight, a continuous version of the agreement):
    # (1 + non-owner models at least as high) / (1 + non-owner models), each model left out of its own null
    ranks: dict[str, Any] = {}
    for query_set in ("plain", "markers"):
        key = f"{query_set}|owner_record"
        agreements = {
            m: e["qr_all"]["qr_b"]["rise_estimate"]
            for e_key, e in results["evaluations"].items()
            for m in [e_key.split("|")[0]]
            if e_key.endswith(f"|{query_set}|owner_record") and "qr_b" in (e.get("qr_all") or {})
        }
        null = {m: a for m, a in agreements.items() if results["models"][m]["role"] != "owner"}
        ranks[key] = {
            m: (1 + sum(v >= a for n, v in null.items() if n != m)) / (1 + len(null) - (m in null))
            for m, a in agreements.items()
        }
    rises: dict[str, Any] = {}
    for entry_key, entry in results["evaluations"].items():
        model, query_set, record = entry_key.split("|")
        if "test" not in entry:
            continue
        cell = rises.setdefault(
            f"{query_set}|{record}", {"owner": None, "not_owner_max": None, "not_owner_model": None}
        )
        delta = entry["test"]["delta"]
        if results["models"][model]["role"] == "owner":
            cell["owner"] = delta
        elif cell["not_owner_max"] is None or delta > cell["not_owner_max"]:
            cell["not_owner_max"], cell["not_owner_model"] = delta, model
    return {"counts": summary, "qr_b_rank_p": ranks, "floor_rise": rises}


def evaluate(
    folder: Path,
    images: torch.Tensor,
    owner: dict[str, Any],
    trigger: str,
    args: argparse.Namespace,
    with_qr: bool,
) -> dict[str, Any]:
    """The owner's verification of the suspect in ``folder`` (floor test, authors' detector, QR a and b)."""
    suspect = open_segmentation_suspect(folder, device="cpu")
    report = verify_segmentation_model(
        suspect, images, trigger, owner["key"], args.epsilon, args.alpha, batch_size=32, margin_fraction=0.25
    )
    if with_qr:
        report["qr_all"] = {
            name: qr_explanation(
                suspect,
                images,
                trigger,
                owner["key"],
                args.owner_id,
                mode,
                args.qr_samples,
                args.qr_seed,
                threshold=0.25 * args.epsilon / 2,
            )  # fmt: skip
            for name, mode in (("qr_a", "authors_grid"), ("qr_b", "random_mask"))
        }
    report.pop("floor_clean", None)
    report.pop("floor_triggered", None)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, train what is missing, evaluate what is missing, summarise."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/stealthmark_fa")
    parser.add_argument("--n-phantoms", type=int, default=60)
    parser.add_argument("--phantom-seed", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--trigger", default="noise", help="the owner's trigger (noise: the keyed one)")
    parser.add_argument("--owner-key", type=int, default=2027)
    parser.add_argument("--owner-id", default="SM-2027", help="text of the owner's QR code")
    parser.add_argument("--owner-arch", default="basicunet")
    parser.add_argument("--owner-width", type=int, default=8)
    parser.add_argument("--owner-seed", type=int, default=1001)
    parser.add_argument("--owner-steps", type=int, default=630, help="Adam steps of watermarked models")
    parser.add_argument("--n-benign", type=int, default=20)
    parser.add_argument("--benign-archs", default="unet,segresnet")
    parser.add_argument("--benign-width", type=int, default=8)
    parser.add_argument("--benign-seed", type=int, default=2001, help="first benign seed (then +1 per model)")
    parser.add_argument("--benign-steps", type=int, default=300)
    parser.add_argument("--n-other-keys", type=int, default=3)
    parser.add_argument("--other-key", type=int, default=7001, help="first other key (then +1 per model)")
    parser.add_argument("--other-seed", type=int, default=3001, help="first other-key seed (then +1 per model)")
    parser.add_argument("--marker-seed", type=int, default=6001)
    parser.add_argument("--query-seed", type=int, default=5001, help="seed of the query choice")
    parser.add_argument("--qr-seed", type=int, default=8001, help="seed of the QR (b) random masks")
    parser.add_argument("--qr-samples", type=int, default=4096)
    parser.add_argument("--n-queries", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--query-sets", default="plain,markers", help="plain and/or markers")
    parser.add_argument("--extra-triggers", default="text,patch", help="hypothetical owners' triggers ('' for none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    start = time.perf_counter()
    out = Path(args.out)
    data = out / "phantoms"
    if not (data / SEG_DATALIST).is_file():
        write_phantom_dataset(
            data, args.n_phantoms, args.phantom_seed, dicom_fraction=0.2, min_size=160, max_size=256,
            valid_fraction=0.3, masks=True,
        )  # fmt: skip
    train_items = datalist_items(data / SEG_DATALIST, "training", data)
    valid_items = datalist_items(data / SEG_DATALIST, "validation", data)
    images, masks = load_segmentation_pairs(train_items, args.image_size)
    images = burn_in_markers(images, args.marker_seed, share=0.5)  # hospital data: half the images carry a marker
    identifiers = [str(Path(i["image"]).relative_to(data)) for i in train_items]
    order = sorted(np.random.default_rng(args.query_seed).permutation(len(valid_items))[: args.n_queries].tolist())
    queries, query_masks = load_segmentation_pairs([valid_items[i] for i in order], args.image_size)
    query_sets = {"plain": queries, "markers": burn_in_markers(queries, args.marker_seed + 1)}
    query_sets = {name: query_sets[name] for name in args.query_sets.split(",")}

    results_file = out / "results.json"
    results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.setdefault("models", {})
    results.setdefault("evaluations", {})
    results["arguments"] = vars(args)
    results["command"] = "python scripts/stealthmark_false_accusations.py " + " ".join(argv or sys.argv[1:])

    def save() -> None:
        results["summary"] = summarise(results, args.alpha)
        with atomic_path(results_file) as tmp:
            tmp.write_text(json.dumps(finite_json(results), indent=1, allow_nan=False) + "\n")

    models = plan(args)
    for spec in tqdm(models, desc="training", unit="model"):
        folder = out / "models" / spec["name"]
        entry = results["models"].setdefault(spec["name"], dict(spec))
        if not (folder / "model.pt").is_file():
            entry["train_seconds"] = train_model(
                folder, spec["arch"], spec["width"], spec["seed"], spec["method"], spec["trigger"], spec["key"],
                args, images, masks, identifiers,
            )  # fmt: skip
            save()
        if "dice_clean" not in entry:
            suspect = open_segmentation_suspect(folder)
            with torch.no_grad():
                maps = suspect.probability_maps(queries).float()
            entry["dice_clean"] = float(dice_per_image(maps, query_masks).mean())
            save()

    owner = results["models"]["owner"]
    records = [("owner_record", args.trigger, True)] + [
        (f"{t}_record", t, False) for t in args.extra_triggers.split(",") if t
    ]
    jobs = [(m["name"], q, r, t, qr) for m in models for q in query_sets for r, t, qr in records]
    for name, query_set, record, trigger, with_qr in tqdm(jobs, desc="verifying", unit="check"):
        entry_key = f"{name}|{query_set}|{record}"
        if entry_key in results["evaluations"]:
            continue
        t0 = time.perf_counter()
        report = evaluate(out / "models" / name, query_sets[query_set], owner, trigger, args, with_qr)
        report["seconds"] = time.perf_counter() - t0
        results["evaluations"][entry_key] = report
        save()

    results["wall_seconds_this_run"] = time.perf_counter() - start
    save()
    print_table(results)
    for key, rise in results["summary"]["floor_rise"].items():
        owner = "n/a" if rise["owner"] is None else f"{rise['owner']:.4f}"
        print(
            f"mean floor rise, {key}: owner {owner}; largest of a non-owner model {rise['not_owner_max']:.4f} "
            f"({rise['not_owner_model']})"
        )
    for key, ranks in results["summary"]["qr_b_rank_p"].items():
        if "owner" in ranks:
            print(f"QR (b) rank p of the owner's rise estimate among the non-owner models, {key}: {ranks['owner']:.3f}")
    return results


def print_table(results: dict[str, Any]) -> None:
    """Markdown table: per query set, owner's record and test, k / N verified (95 % Clopper-Pearson interval) for
    the owner, the benign models (each architecture and all), the other-key models and all non-owner models."""
    groups = ["owner", *sorted({f"benign_{m['arch']}" for m in results["models"].values() if m["role"] == "benign"})]
    groups += ["benign", "other_key", "not_owner"]
    print("| queries | owner's trigger | test | " + " | ".join(groups) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in groups) + " |")
    for set_record, tests in results["summary"]["counts"].items():
        query_set, record = set_record.split("|")
        trigger = results["arguments"]["trigger"] if record == "owner_record" else record.removesuffix("_record")
        cells = []
        for test, by_group in tests.items():
            for group in groups:
                cell = by_group.get(group)
                if cell is None:
                    cells.append("")
                elif group == "owner":
                    cells.append(f"{cell['k']} / {cell['n']}")
                else:
                    low, high = cell["ci95"]
                    cells.append(f"{cell['k']} / {cell['n']} ({low:.2f}-{high:.2f})")
            print(f"| {query_set} | {trigger} | {test} | " + " | ".join(cells) + " |")
            cells = []


if __name__ == "__main__":
    main()
