"""``python -m tadfkd.bench``: see tadfkd.bench.compare."""

from tadfkd.bench.compare import main

main()
