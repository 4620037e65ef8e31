"""The commands' workflows: ``unet predict`` (:mod:`.predict`), ``unet eval`` (:mod:`.eval`), ``unet demo`` (:mod:`.demo`) and ``unet compare``
(:mod:`.compare`). Each strings together data, training, inference and evaluation; the CLI calls one of them."""
