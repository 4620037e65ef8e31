"""unetcli: train, apply and score U-Net segmentation models from the command line."""

__version__ = "0.1.0"
