"""``python -m cw.worker``."""
from cw.worker.options import main

main()
