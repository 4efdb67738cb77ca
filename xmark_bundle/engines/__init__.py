"""Ignite/MONAI engine pieces: metrics, reports and custom trainers used by the bundle configs."""
