"""The training recipes. In the repository they are files to run (``accelerate launch
train_scripts/train_sd_ietagc.py``); an install ships this folder as ``sd_memfree.recipes``
(pyproject.toml), which the ``sd-memfree train``, ``train-sdxl`` and ``demo`` commands import.
A recipe imports a sibling relatively when imported as a package module and by its bare name when
run as a file (its folder is then ``sys.path[0]``)."""
