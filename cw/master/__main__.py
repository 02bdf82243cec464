"""``python -m cw.master``."""
from cw.master.daemon import main

main()
