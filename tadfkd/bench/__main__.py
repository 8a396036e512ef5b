"""``python -m tadfkd.bench``: see tadfkd.bench.compare."""

from tadfkd.base.errors import exit_on_known_errors
from tadfkd.bench.compare import main

with exit_on_known_errors():  # a bad --set value: one sentence, exit 2
    main()
