"""Real datasets and the views of generated images. ``loading`` turns a dataset's source, built
from the ``source`` node of ``conf/dataset/<name>.yaml`` (``idx``, ``cifar``, ``folders``,
``digits``), into normalised (image, label) splits and loaders; ``views`` makes the train and
test views of generated batches. Imports only ``tadfkd.base``.
"""
