"""X-Mark: saliency-guided dataset ownership verification for chest X-rays, as a MONAI bundle."""
