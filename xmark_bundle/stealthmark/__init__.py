"""StealthMark: ownership verification of segmentation models by a keyed trigger that lifts the background floor.

A second MONAI bundle (``stealthmark/``) uses this subpackage: networks, triggers, soft targets, harmlessness metrics
and black-box verification. See ``stealthmark/docs/README.md`` and docs/DESIGN notes §7.
"""
