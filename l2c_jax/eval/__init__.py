"""Sample-quality measures: FID in a feature space, fidelity of cached to uncached samples."""
