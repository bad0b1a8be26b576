"""Core of napari-histo-wsss: slides, tissue, grid, project store, models, training, CAMs,
metrics and export. Pure numpy/torch/zarr: this package never imports napari or Qt."""
