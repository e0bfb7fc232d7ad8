"""Call-time escapes: each tool tries one way out of the sandbox or into another call."""

import os
import sys

_CALLS = []  # a call's leftovers: the next call must never see them


def write_root_file() -> str:
    with open("/agentd-intruder.txt", "w") as handle:
        handle.write("x")
    return "written"


def read_host_file(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def list_cwd() -> list:
    return os.listdir(".")


def environment() -> dict:
    return dict(os.environ)


def run_subprocess() -> str:
    import subprocess

    return subprocess.run(["cat", "/etc/passwd"], capture_output=True, text=True).stdout


def fork() -> int:
    return os.fork()


def load_libc() -> str:
    import ctypes

    return str(ctypes.CDLL(None))


def start_thread() -> str:
    import threading

    worker = threading.Thread(target=lambda: None)
    worker.start()
    worker.join()
    return "ran a thread"


def connect(port: int) -> str:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return "connected"


def sleep_patched() -> str:
    import time

    time.sleep(3600)
    return "slept"


def sleep_fresh_time_module() -> str:
    import _imp
    import importlib.machinery

    fresh = _imp.create_builtin(importlib.machinery.ModuleSpec("time", None, origin="built-in"))
    fresh.sleep(3600)
    return "slept"


def sleep_reloaded_time() -> str:
    import importlib
    import time

    importlib.reload(time).sleep(3600)
    return "slept"


def sleep_reimported_time() -> str:
    sys.modules.pop("time", None)
    import time

    time.sleep(3600)
    return "slept"


def sleep_select() -> str:
    import select

    select.select([], [], [], 3600)
    return "slept"


def sleep_asyncio() -> str:
    import asyncio

    asyncio.run(asyncio.sleep(3600))
    return "slept"


def remember(value: str) -> list:
    """Appends to a module global: a fresh instance per call must never show earlier values."""
    _CALLS.append(value)
    return list(_CALLS)


def flood_stdout() -> int:
    chunk = "x" * 65536
    for _ in range(2048):  # 128 MiB
        print(chunk)
    return 0


def flood_stderr() -> int:
    chunk = "x" * 65536
    for _ in range(2048):
        sys.stderr.write(chunk)
    return 0


def burn() -> int:
    n = 0
    while True:
        n += 1


def hoard_memory() -> int:
    blocks = []
    while True:
        blocks.append(bytearray(16 << 20))


def recurse_deeply(depth: int = 0) -> int:
    return recurse_deeply(depth + 1)


def huge_result() -> str:
    return "y" * (64 << 20)
