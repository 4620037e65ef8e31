"""Planning from the data: a fingerprint of the dataset, then per configuration (``2d``,
``3d_fullres``, ``3d_lowres``) the spacing, the network topology, the patch and batch size for a
budget and the normalisation, as config keys that ``unet train`` applies (see ``unet plan``)."""
