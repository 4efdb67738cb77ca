"""Build a watermarking module from a checkpoint's record without running anything the record says.

A checkpoint travels between colleagues and into MONAI Label servers, so its record is data: MONAI's
``ConfigParser`` would evaluate ``$`` expressions, import ``_requires_`` entries and locate any ``_target_`` (an
``os.system`` reached through a module of ours included), and MONAI has no mode that turns this off per call.
:func:`build_from_record` instead instantiates only the bundle's own classes named exactly in :data:`ALLOWED`, with
plain JSON-like arguments; an argument may itself be a config only when it names an allowed class. Anything else
raises a ``ValueError`` naming the file and the offending entry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["ALLOWED", "build_from_record"]

#: The only ``_target_`` values a record may name: the bundle's watermarking modules and their parts.
ALLOWED = (
    "xmark_bundle.networks.pipeline.WatermarkPipeline",
    "xmark_bundle.networks.generator.XMarkGenerator",
    "xmark_bundle.networks.generator.SSCLBWGenerator",
    "xmark_bundle.networks.classifier.ResizedClassifier",
    "xmark_bundle.networks.classifier.build_classifier",
    "xmark_bundle.networks.triggers.BadNetsTrigger",
    "xmark_bundle.networks.triggers.BlendedTrigger",
    "xmark_bundle.networks.triggers.WaNetTrigger",
    "xmark_bundle.networks.triggers.LabelConsistentTrigger",
    "xmark_bundle.networks.triggers.UBWPTrigger",
)
#: Deepest nesting a record may have (a pipeline holds a surrogate that holds a classifier: 3).
MAX_DEPTH = 8
#: First characters of a MONAI config string that would be evaluated (``$``), referenced (``@``) or macro-expanded.
_EXPRESSION_MARKS = ("$", "@", "%")


def _constructors() -> dict[str, Callable[..., Any]]:
    """The allowed names mapped to their objects, imported here (the networks import the checkpoint module)."""
    from xmark_bundle.networks import classifier, generator, pipeline, triggers

    found = {
        "xmark_bundle.networks.pipeline.WatermarkPipeline": pipeline.WatermarkPipeline,
        "xmark_bundle.networks.generator.XMarkGenerator": generator.XMarkGenerator,
        "xmark_bundle.networks.generator.SSCLBWGenerator": generator.SSCLBWGenerator,
        "xmark_bundle.networks.classifier.ResizedClassifier": classifier.ResizedClassifier,
        "xmark_bundle.networks.classifier.build_classifier": classifier.build_classifier,
        "xmark_bundle.networks.triggers.BadNetsTrigger": triggers.BadNetsTrigger,
        "xmark_bundle.networks.triggers.BlendedTrigger": triggers.BlendedTrigger,
        "xmark_bundle.networks.triggers.WaNetTrigger": triggers.WaNetTrigger,
        "xmark_bundle.networks.triggers.LabelConsistentTrigger": triggers.LabelConsistentTrigger,
        "xmark_bundle.networks.triggers.UBWPTrigger": triggers.UBWPTrigger,
    }
    if tuple(found) != ALLOWED:  # the two lists are one list written twice (names without imports, objects)
        raise RuntimeError("record_builder: ALLOWED and the imported constructors disagree")
    return found


def _plain(value: Any, where: str, path: str, depth: int) -> Any:
    """``value`` when it is a JSON-like scalar or a list of them; a clear error otherwise."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: the watermark record nests deeper than {MAX_DEPTH} levels at '{where}'")
    if isinstance(value, str):
        if value.startswith(_EXPRESSION_MARKS):
            raise ValueError(
                f"{path}: the watermark record's entry '{where}' is a config expression ({value[:60]!r}); a record "
                "holds plain values only, and nothing in it is evaluated"
            )
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]", path, depth + 1) for i, item in enumerate(value)]
    raise ValueError(
        f"{path}: the watermark record's entry '{where}' is a {type(value).__name__}; only numbers, strings, booleans, "
        "null, lists of them and configs of the bundle's own classes are allowed"
    )


def _build(config: Any, where: str, path: str, depth: int, constructors: dict[str, Callable[..., Any]]) -> Any:
    """Instantiate ``config`` (a dict with an allowed ``_target_``) or return a plain value, checking every entry."""
    if not isinstance(config, dict):
        return _plain(config, where, path, depth)
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: the watermark record nests deeper than {MAX_DEPTH} levels at '{where}'")
    target = config.get("_target_")
    if not isinstance(target, str) or target not in constructors:
        named = f"names {target!r}" if "_target_" in config else "is a mapping without a _target_"
        raise ValueError(
            f"{path}: the watermark record's entry '{where}' {named}, which is not one of the bundle's watermark "
            f"classes ({', '.join(ALLOWED)})"
        )
    arguments = {}
    for key, value in config.items():
        if key == "_target_":
            continue
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            raise ValueError(
                f"{path}: the watermark record's entry '{where}' has the key {key!r}; a record holds constructor "
                "arguments only (no _requires_, _disabled_, _mode_ or other config directives)"
            )
        arguments[key] = _build(value, f"{where}.{key}", path, depth + 1, constructors)
    try:
        return constructors[target](**arguments)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: the watermark record's entry '{where}' does not build a {target} ({err})") from err


def build_from_record(config: Any, path: str | os.PathLike) -> nn.Module:
    """The module a record's ``network`` entry describes (untrained), built from allowed classes and plain values."""
    module = _build(config, "network", os.fspath(path), 0, _constructors())
    if not isinstance(module, nn.Module):
        raise ValueError(f"{os.fspath(path)}: the watermark record's 'network' entry does not build a network")
    return module
