"""BraTS data: case discovery, validation, splits, NIfTI input/output."""
