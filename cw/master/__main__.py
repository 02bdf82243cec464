"""``python -m cw.master``."""
from cw.master.options import main

main()
