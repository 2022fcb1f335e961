"""``python -m cbd_fast.info``: how cbd_fast was built and which backends can run here.

The command lives in :mod:`cbd_fast.app.info`; this module keeps the short ``-m`` name.
"""

from cbd_fast.app.info import collect, format_report, main

__all__ = ["collect", "format_report", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
