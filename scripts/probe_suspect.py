"""What does a suspect model react to? Its mean target-label probability on non-target samples under probes.

Probes: the benign image; our watermark; other generators' watermarks (the Ind-W question); our residual with its
sign flipped, or taken from another sample (is the reaction tied to this image's watermark?); for a keyed generator
our key through the keyed head at residual 0 (what key vetting queries: does training G matter?); the unkeyed control
of the verification report (the residual's magnitudes with random signs); uniform and sign noise filling the whole
budget eps; and the benign image and our watermark "as released": the residual mapped to the file's own grid (as
the release writes it, before re-quantisation) and the full-resolution result letterboxed straight to the query size,
the way a classifier trained on the release reads it (the other probes, like the verification, resize G's
model-resolution output). A suspect that learned *our* watermark reacts to the watermark only; one that learned
"perturbed" reacts to the noise probes as well.

    python scripts/probe_suspect.py --suspect outputs/demo/models/suspect_malicious \\
        --generator outputs/demo/models/generator/model.pt \\
        --other outputs/demo/models/generator_independent/model.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xmark_bundle.data import LoadXRayd  # noqa: E402
from xmark_bundle.data.labels import LABELS  # noqa: E402
from xmark_bundle.fileio import write_json  # noqa: E402
from xmark_bundle.keyed.keys import flat_keyed_watermark  # noqa: E402
from xmark_bundle.networks.checkpoint import load_watermark  # noqa: E402
from xmark_bundle.networks.pipeline import WatermarkPipeline, is_keyed  # noqa: E402
from xmark_bundle.transforms import full_resolution_residual, letterbox, letterbox_geometry  # noqa: E402
from xmark_bundle.transforms.geometry import resize_square  # noqa: E402
from xmark_bundle.verification import open_suspect, other_key_control, unkeyed_control  # noqa: E402
from xmark_bundle.verification.queries import QuerySettings, load_letterboxed, query_samples  # noqa: E402


def probes(x: torch.Tensor, generators: dict[str, WatermarkPipeline], eps: float, seed: int) -> dict[str, torch.Tensor]:
    """Every probe image batch for the letterboxed batch ``x`` (B x 1 x S x S in [0, 1])."""
    rng = torch.Generator().manual_seed(seed)
    inside = (x > 0).to(x.dtype)  # the letterbox padding stays black, as in every watermark
    with torch.no_grad():
        marked = {name: g(x) for name, g in generators.items()}
        if is_keyed(generators["watermark"]):
            marked["our G with another key"] = other_key_control(generators["watermark"], x, rng)
            core = generators["watermark"].generator
            magnitude = float(torch.sigmoid(core.magnitude_offset))
            marked["our key, flat head (r = 0)"] = flat_keyed_watermark(x, core.key, core.eps, magnitude)
    ours = marked.pop("watermark")
    residual = ours - x
    noise = (torch.rand(x.shape, generator=rng) * 2 - 1) * eps * inside
    signs = (torch.randint(0, 2, x.shape, generator=rng).to(x) * 2 - 1) * eps * inside
    return {
        "benign": x,
        "watermark": ours,
        **marked,
        "watermark, sign flipped": (x - residual).clamp(0, 1),
        "watermark of another sample": (x + residual.roll(1, 0)).clamp(0, 1),
        "unkeyed control": unkeyed_control(x, ours, rng),
        "uniform noise +-eps": (x + noise).clamp(0, 1),
        "sign noise +-eps": (x + signs).clamp(0, 1),
    }


def released_probes(
    items: list, chosen: list[int], x: torch.Tensor, ours: torch.Tensor, eps: float, query_size: int
) -> dict[str, torch.Tensor]:
    """Benign and watermarked queries made from the full-resolution files, as a suspect trained on the release sees
    them: our watermark's change ``ours - x`` (``x``: the letterboxed ``items[i]``, ``i`` in ``chosen``) mapped to each
    file's grid as the release maps it, then both letterboxed to ``query_size``."""
    load, benign, marked = LoadXRayd(keys="image"), [], []
    for j, i in enumerate(chosen):
        full = load({"image": items[i]["image"]})["image"].as_tensor().float()[None]
        model_grid = letterbox_geometry(full.shape[-2:], x.shape[-1])
        query_grid = letterbox_geometry(full.shape[-2:], query_size)
        residual = full_resolution_residual(ours[j : j + 1], x[j : j + 1], model_grid, eps)
        benign.append(letterbox(full, query_grid))
        marked.append(letterbox((full + residual).clamp(0, 1), query_grid))
    return {"benign, as released": torch.cat(benign), "watermark, as released": torch.cat(marked)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suspect", action="append", required=True, help="suspect spec (repeatable)")
    parser.add_argument("--generator", type=Path, required=True, help="our generator checkpoint")
    parser.add_argument(
        "--other", type=Path, action="append", default=[],
        help="another generator (repeatable; a family member kept without its surrogate takes our generator's)",
    )  # fmt: skip
    parser.add_argument("--datalist", type=Path, default=ROOT / "outputs/demo/phantoms/datalist.json")
    parser.add_argument("--split", default="test")
    parser.add_argument("--query-size", type=int, default=224)
    parser.add_argument("--target-label", default="No Finding", choices=LABELS)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = parser.parse_args()

    generators = {"watermark": load_watermark(args.generator)}
    ours = generators["watermark"].state_dict()
    generators.update({f"other generator {p}": load_watermark(p, surrogate=ours) for p in args.other})
    eps, image_size = generators["watermark"].eps, generators["watermark"].image_size
    sizes = {name: g.image_size for name, g in generators.items() if g.image_size != image_size}
    if sizes:
        parser.error(f"every generator must work at our generator's {image_size} px; these do not: {sizes}")
    queries = QuerySettings(args.target_label, args.split, args.n, args.seed, args.query_size)
    items, chosen, _ = query_samples(args.datalist, None, queries)
    x = load_letterboxed(items, chosen, image_size)
    batches = probes(x, generators, eps, args.seed)
    batches.update(released_probes(items, chosen, x, batches["watermark"], eps, args.query_size))

    table: dict[str, dict[str, float]] = {}
    for spec in args.suspect:
        suspect = open_suspect(spec)
        table[spec] = {
            name: float(suspect.label_probability(resize_square(images, args.query_size), args.target_label).mean())
            for name, images in batches.items()
        }
    residual = (batches["watermark"] - x).flatten(1)
    similarity = {
        name: float(torch.nn.functional.cosine_similarity(residual, (batches[name] - x).flatten(1)).mean())
        for name in generators
        if name != "watermark"
    }
    width = max(len(name) for name in batches)
    for name, value in similarity.items():
        print(f"mean cosine similarity of our residual and the {name}'s: {value:.3f}")
    print(f"mean P({args.target_label}) over {len(chosen)} non-target samples of {args.datalist} [{args.split}]")
    for spec, row in table.items():
        print(f"\nsuspect {spec}")
        for name, value in row.items():
            print(f"  {name:<{width}}  {value:.3f}")
    if args.out:
        record = {"n": len(chosen), "target_label": args.target_label, "eps": eps, "residual_cosine": similarity}
        write_json(args.out, {**record, "mean_p": table})
        print(f"\n-> {args.out}")


if __name__ == "__main__":
    main()
