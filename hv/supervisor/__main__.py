"""``python -m hv.supervisor``: run one cluster's supervisor (hv/supervisor/lifecycle.py ``main``).

Layer: hv.
"""

from hv.supervisor.lifecycle import main

if __name__ == "__main__":
    raise SystemExit(main())
