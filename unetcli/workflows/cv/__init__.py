"""``unet cv``: k-fold cross-validation, out-of-fold scoring, postprocessing choice; ``unet predict CV`` ensembles the folds."""
