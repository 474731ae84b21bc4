"""``python -m tidal.demo``: see :mod:`tidal.demo.main`."""

from tidal.demo.main import main

if __name__ == "__main__":
    raise SystemExit(main())
