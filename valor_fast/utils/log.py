"""One logger for the package; `log_once` for messages that would otherwise repeat per step."""
import logging
import os
import sys

_ONCE: set = set()


def get_logger(name: str = "valor_fast") -> logging.Logger:
    root = logging.getLogger("valor_fast")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%H:%M:%S"))
        root.addHandler(h)
        root.setLevel(os.environ.get("VALOR_FAST_LOG", "INFO").upper())
        root.propagate = False
    return logging.getLogger(name if name.startswith("valor_fast") else "valor_fast." + name)


def log_once(key: str, msg: str, level: int = logging.INFO, name: str = "valor_fast") -> None:
    if key in _ONCE:
        return
    _ONCE.add(key)
    get_logger(name).log(level, msg)


def short_list(items, n: int = 12) -> str:
    """The first `n` items joined for a log line, with a count of the rest ("a, b ... (+7)")."""
    items = list(items)
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n})" if len(items) > n else "")
