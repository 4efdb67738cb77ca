"""Make the owner's watermark family (``family.json`` beside the owner's checkpoint) before the release.

The calibrated verdict ranks the owner's watermark among m other members of its family (xmark_bundle.verification
.family). Two kinds:

``keys``: a keyed generator's family is its own key and m others drawn the same way; nothing is trained::

    python scripts/make_family.py keys --generator_ckpt models/model.pt --members 19

``train``: an unkeyed generator's (X-Mark, SSCL-BW) family is m + 1 generators trained with one recipe and other
seeds; the owner's is drawn at random among them and copied to ``models/model.pt``. Resumable (a finished member is
kept, an interrupted one retrained); prints each member's wall time and the time left. Extra ``--key value`` pairs
after ``--`` are overrides of configs/train.json (and of ``--config_file`` files layered on it)::

    python scripts/make_family.py train --ckpt_dir models --members 19 -- --dataset_dir /data --image_size 256

``assemble``: a family of checkpoints that exist already (the owner's and m others made with its recipe and other
seeds: trained generators, or triggers of other seeds), the owner's placed at a random index (``--owner_index`` to
fix it, as the experiment runner does for reproducible runs; its pool of other members serves every owner)::

    python scripts/make_family.py assemble --owner_ckpt models/model.pt --others pool/*/model.pt

Every member of a generator family carries the frozen surrogate it was trained against (43 of its 51 MB), the same
for all. ``train`` keeps the other members without it, and ``assemble --strip_surrogates`` rewrites the other
checkpoints so, once each is checked to hold the owner's: the family then loads them with the owner's surrogate
(checked by its hash), and a checkpoint so stripped loads only through a family whose owner holds that surrogate.
The experiment runner does this for its generator pools.

Publish or timestamp the printed commitment when you release: it fixes the family and the owner's member.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xmark_bundle.experiments.stages import Stages, bundle_cmd  # noqa: E402
from xmark_bundle.fileio import atomic_path, write_json  # noqa: E402
from xmark_bundle.verification.family import (  # noqa: E402
    FAMILY_FILE,
    WatermarkFamily,
    default_family_file,
    make_generator_family,
    make_key_family,
)

ROOT = Path(__file__).resolve().parents[1]


def _overrides(extra: list[str]) -> dict[str, str]:
    """``--key value`` pairs after ``--``."""
    if len(extra) % 2 or any(not key.startswith("--") for key in extra[::2]):
        raise SystemExit(f"overrides after -- must be '--key value' pairs, got {extra}")
    return {key[2:]: value for key, value in zip(extra[::2], extra[1::2], strict=True)}


def train_family(ckpt_dir: Path, members: int, configs: list[str], overrides: dict[str, str]) -> WatermarkFamily:
    """Train ``members`` + 1 generators under ``ckpt_dir/family/`` (seeds and the owner's place drawn once, kept in
    ``plan.json``), copy the owner's to ``ckpt_dir/model.pt``, keep the others without the surrogate and write
    ``ckpt_dir/family.json``."""
    out, owner_ckpt, family_file = ckpt_dir / "family", ckpt_dir / "model.pt", ckpt_dir / FAMILY_FILE
    for existing in (owner_ckpt, family_file):
        if existing.exists():
            raise SystemExit(f"{existing} exists: a family is made once, before the release; choose another ckpt_dir")
    plan_file = out / "plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    wanted = {"members": members, "configs": configs, "overrides": overrides}
    if plan is None:
        seeds: list[int] = []
        while len(seeds) < members + 1:  # distinct random seeds: nothing about them is chosen
            seed = secrets.randbelow(2**31)
            seeds += [seed] if seed not in seeds else []
        # the owner's member is drawn with the seeds and kept, so a resumed run strips the same other members
        plan = {**wanted, "seeds": seeds, "owner_index": secrets.randbelow(members + 1)}
        write_json(plan_file, plan)
    elif {key: plan[key] for key in wanted} != wanted:
        raise SystemExit(f"{plan_file} was made for another recipe ({plan}); finish it with the same arguments")
    stages = Stages(ROOT, out, "family")
    checkpoints = []
    for j, seed in enumerate(plan["seeds"]):
        folder = out / f"member_{j:03d}"
        if (folder / "model.pt").exists() and not (folder / "training_info.json").exists():
            (folder / "model.pt").unlink()  # left by an interrupted run: train.json refuses to overwrite it
        cmd = bundle_cmd(
            "training", ["configs/train.json", *configs], ckpt_dir=folder, seed=seed, output_dir=folder / "logs",
            **overrides,
        )  # fmt: skip
        stages.run(f"member {j + 1} of {len(plan['seeds'])}", cmd, folder / "training_info.json")
        done = [stages.times[name] for name in stages.visited if name in stages.times]
        if done:
            left = (len(plan["seeds"]) - j - 1) * sum(done) / len(done)
            print(f"[family] {j + 1} of {len(plan['seeds'])} members trained; about {left / 60:.0f} min left")
        checkpoints.append(folder / "model.pt")
    owner_index = plan.get("owner_index")  # None in a plan written before it was kept: drawn now, nothing stripped
    family = make_generator_family(checkpoints, family_file, owner_index, strip_surrogates=owner_index is not None)
    with atomic_path(owner_ckpt) as tmp:
        shutil.copyfile(family.checkpoint(family.owner_index), tmp)
    total = sum(stages.times.get(name, 0.0) for name in stages.visited)
    print(f"[family] {len(checkpoints)} generators, {total / 60:.1f} min of training in all (this machine)")
    return family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    keys = sub.add_parser("keys", help="a keyed generator's family: other keys, nothing trained")
    keys.add_argument("--generator_ckpt", type=Path, required=True, help="the owner's keyed generator checkpoint")
    keys.add_argument("--members", type=int, default=19, help="other members m (19 reaches p = 0.05, 99 p = 0.01)")
    keys.add_argument("--out", type=Path, default=None, help="family file (default: family.json beside the ckpt)")
    train = sub.add_parser("train", help="an unkeyed generator's family: m + 1 generators, one recipe, other seeds")
    train.add_argument("--ckpt_dir", type=Path, default=ROOT / "models", help="where model.pt and family.json go")
    train.add_argument("--members", type=int, default=19, help="other members m (19 reaches p = 0.05)")
    train.add_argument("--config_file", nargs="*", default=[], help="override files layered on configs/train.json")
    assemble = sub.add_parser("assemble", help="a family of existing checkpoints: the owner's and m others")
    assemble.add_argument("--owner_ckpt", type=Path, required=True, help="the owner's watermark checkpoint")
    assemble.add_argument("--others", type=Path, nargs="+", required=True, help="checkpoints of the other members")
    assemble.add_argument("--owner_index", type=int, default=None, help="the owner's place (default: drawn at random)")
    assemble.add_argument("--out", type=Path, default=None, help="family file (default: family.json beside the owner)")
    assemble.add_argument(
        "--strip_surrogates", action="store_true", help="rewrite the other checkpoints without the owner's surrogate"
    )
    args, extra = parser.parse_known_args()
    if extra and extra[0] == "--":
        extra = extra[1:]
    if args.kind != "train" and extra:
        parser.error(f"unexpected arguments {extra}")
    if args.kind == "keys":
        family = make_key_family(args.generator_ckpt, args.members, args.out)
    elif args.kind == "assemble":
        index = secrets.randbelow(len(args.others) + 1) if args.owner_index is None else args.owner_index
        if not 0 <= index <= len(args.others):
            parser.error(f"--owner_index must be within 0..{len(args.others)}, got {index}")
        members = [*args.others[:index], args.owner_ckpt, *args.others[index:]]
        out = args.out or default_family_file(args.owner_ckpt)
        family = make_generator_family(members, out, owner_index=index, strip_surrogates=args.strip_surrogates)
    else:
        family = train_family(args.ckpt_dir.resolve(), args.members, args.config_file, _overrides(extra))
    print(f"[family] {family.path}: {family.m} other {family.kind} of {family.method}, owner's member drawn at random")
    print(f"[family] commitment {family.commitment}: publish or timestamp it with the release")


if __name__ == "__main__":
    main()
