"""``python -m cw.worker``."""
from cw.worker.process import main

main()
