"""CPU stand-in for the ``flash_attn`` package (tests only; see ``flash_attn_interface.py``).

Its version, and with it the calling convention of ``flash_attn_interface``, comes from the environment
variable ``RINGRT_STAND_IN_FLASH_VERSION`` (default 2.8.3) read at import time: purge ``flash_attn*``
from ``sys.modules`` to load another one.
"""

import os

__version__ = os.environ.get("RINGRT_STAND_IN_FLASH_VERSION", "2.8.3")
