"""Tools that try to escape or exhaust the sandbox. Each must end in its own clear error."""

import os
import socket
import time


def read_passwd() -> str:
    with open("/etc/passwd") as f:
        return f.read()


def list_root() -> list:
    return os.listdir("/")


def open_socket() -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect(("127.0.0.1", 22))
    return "connected"


def read_env() -> dict:
    return dict(os.environ)


def loop_forever() -> None:
    n = 0
    while True:
        n += 1


def allocate_4gib() -> int:
    chunks = [bytearray(64 << 20) for _ in range(64)]  # 64 x 64 MiB
    return len(chunks)


def allocate_at_once() -> int:
    return len(bytearray(2**31 - 1))


def recurse(n: int = 0) -> int:
    return recurse(n + 1)


def deep_json() -> int:
    # Recursion in C (the JSON parser), not in Python frames: exhausts the wasm stack.
    import json

    return len(json.loads("[" * 200_000 + "]" * 200_000))


def return_100mb() -> str:
    return "x" * 100_000_000


def raise_error() -> None:
    raise ValueError("this tool always fails")


def return_set() -> set:
    return {1, 2, 3}


def os_system() -> int:
    return __import__("os").system("cat /etc/passwd")


def sleep_long() -> str:
    time.sleep(3600)
    return "woke up"


def exit_process() -> None:
    raise SystemExit(3)


def recreate_time() -> str:
    # The guest removed the means to build a fresh `time` module with the real sleep.
    import _imp
    import importlib.machinery

    fresh = _imp.create_builtin(importlib.machinery.ModuleSpec("time", None))
    fresh.sleep(3600)
    return "slept"
