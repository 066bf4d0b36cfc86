"""``python -m proxy --config FILE``: one proxy worker (see ``proxy/server.py``)."""

import sys

from proxy.server import main

sys.exit(main())
