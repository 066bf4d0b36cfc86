"""``python -m proxy --control PATH [--exit-with-agent]`` or ``python -m proxy
--snapshot FILE``: one proxy worker (see ``proxy/server.py``)."""

import sys

from proxy.server import main

sys.exit(main())
