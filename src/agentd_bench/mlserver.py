"""MLServer as a benchmark peer: its own virtual environment, a model repository, the process.

MLServer 1.7 pins protobuf<7 and an older FastAPI than agentd, so it cannot share agentd's
environment. The suite builds ``<repo>/.bench/venv-mlserver`` once (pip, a minute or two) and
reuses it while its marker file says the same requirements were installed. Each run writes a
fresh model repository (``settings.json`` and, per model, ``model-settings.json``, the ONNX file
and the custom runtime ``baselines/mlserver_onnx.py``) and starts ``mlserver start DIR``; the
process is stopped by PID like every other benchmark server.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from agentd.errors import Unavailable
from agentd_bench.errors import BenchError
from agentd_bench.servers import ServerError, ServerProcess, free_port

__all__ = [
    "MLSERVER_VERSION",
    "REQUIREMENTS",
    "MLServerError",
    "MLServerModel",
    "MLServerPorts",
    "default_venv_dir",
    "ensure_venv",
    "running_mlserver",
    "write_repository",
]

MLSERVER_VERSION = "1.7.1"
REQUIREMENTS = (f"mlserver=={MLSERVER_VERSION}", "onnxruntime", "numpy")
RUNTIME_FILE = Path(__file__).parent / "baselines" / "mlserver_onnx.py"
RUNTIME_CLASS = "mlserver_onnx.OnnxModel"
_MARKER = ".agentd-bench-ready"


class MLServerError(BenchError, Unavailable):
    """The MLServer environment could not be built, or the server did not come up."""


def default_venv_dir() -> Path:
    """``<repo>/.bench/venv-mlserver`` for a source checkout, else ``./.bench/venv-mlserver``."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        root = Path.cwd()
    return root / ".bench" / "venv-mlserver"


# ---------------------------------------------------------------- the virtual environment


def _bin(venv: Path, name: str) -> Path:
    return venv / "bin" / name


def _read_marker(venv: Path) -> dict | None:
    try:
        data = json.loads((venv / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def ensure_venv(venv: Path, progress: Callable[[str], None]) -> dict[str, str]:
    """Build the MLServer venv unless a complete one is there; return its package versions.

    A folder without the marker (an interrupted install) is removed and built again. A lock
    file keeps two suites started at once from installing into the same folder.
    """
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = _read_marker(venv)
        if (
            marker is not None
            and marker.get("requirements") == list(REQUIREMENTS)
            and _bin(venv, "mlserver").is_file()
        ):
            return marker["versions"]
        if venv.exists():
            progress(f"removing incomplete MLServer environment {venv}")
            shutil.rmtree(venv)
        versions = _build(venv, progress)
        (venv / _MARKER).write_text(
            json.dumps({"requirements": list(REQUIREMENTS), "versions": versions}) + "\n"
        )
        return versions


def _build(venv: Path, progress: Callable[[str], None]) -> dict[str, str]:
    log_path = venv.parent / f"{venv.name}-install.log"
    progress(f"creating {venv} for MLServer {MLSERVER_VERSION} (once; pip log: {log_path})")
    started = time.monotonic()
    with open(log_path, "w") as log:
        _run_logged([sys.executable, "-m", "venv", str(venv)], log, log_path, progress)
        _run_logged(
            [
                str(_bin(venv, "python")),
                "-m",
                "pip",
                "install",
                "--progress-bar",
                "off",
                "--disable-pip-version-check",
                *REQUIREMENTS,
            ],
            log,
            log_path,
            progress,
        )
    check = subprocess.run(
        [
            str(_bin(venv, "python")),
            "-c",
            "import json, mlserver, onnxruntime, numpy; print(json.dumps({"
            "'mlserver': mlserver.__version__, 'onnxruntime': onnxruntime.__version__, "
            "'numpy': numpy.__version__}))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check.returncode != 0:
        raise MLServerError(
            f"the MLServer environment {venv} does not import: {check.stderr.strip()[-1500:]}"
        )
    versions = json.loads(check.stdout)
    progress(
        f"MLServer {versions['mlserver']} (onnxruntime {versions['onnxruntime']}) installed "
        f"in {time.monotonic() - started:.0f}s"
    )
    return versions


def _run_logged(
    argv: Sequence[str], log: TextIO, log_path: Path, progress: Callable[[str], None]
) -> None:
    """Run a command with its output in the log; report pip's progress every few seconds.

    pip prints a line per package; echoing them all would bury the benchmark's own output
    (and CI logs), so one summary line at most every 5 s is shown, the full text on failure.
    """
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    tail: deque[str] = deque(maxlen=40)
    collected = 0
    installing = False
    started = last_report = time.monotonic()
    for line in proc.stdout:
        log.write(line)
        tail.append(line.rstrip())
        now = time.monotonic()
        if line.startswith("Collecting "):
            collected += 1
        elif line.startswith("Installing collected packages"):
            installing = True
            progress(f"  pip: installing {collected} packages ({now - started:.0f}s)")
            last_report = now
            continue
        if now - last_report >= 5:
            doing = "still installing" if installing else f"{collected} packages collected"
            progress(f"  pip: {doing} ({now - started:.0f}s)")
            last_report = now
    code = proc.wait()
    log.flush()
    if code != 0:
        shown = "\n".join(tail)
        raise MLServerError(
            f"{' '.join(argv[:4])} ... failed with exit status {code}; last lines:\n{shown}\n"
            f"(full output: {log_path})"
        )


# ---------------------------------------------------------------- the model repository


@dataclass(frozen=True, slots=True)
class MLServerModel:
    """One model MLServer serves through the custom runtime, with adaptive batching."""

    name: str
    onnx_path: Path
    max_batch_size: int
    max_batch_time_s: float


@dataclass(frozen=True, slots=True)
class MLServerPorts:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def pick(cls) -> MLServerPorts:
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        http_port, grpc_port, metrics_port = sorted(ports)
        return cls(http_port, grpc_port, metrics_port)


def write_repository(root: Path, models: Sequence[MLServerModel], ports: MLServerPorts) -> None:
    """``settings.json`` and one folder per model, as ``mlserver start ROOT`` reads them."""
    root.mkdir(parents=True, exist_ok=True)
    settings = {
        "host": "127.0.0.1",
        "http_port": ports.http,
        "grpc_port": ports.grpc,
        "metrics_port": ports.metrics,
        # One process, as agentd: inference in the server process, no worker pool.
        "parallel_workers": 0,
        "debug": False,
    }
    (root / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    for model in models:
        folder = root / model.name
        folder.mkdir()
        shutil.copyfile(model.onnx_path, folder / "model.onnx")
        shutil.copyfile(RUNTIME_FILE, folder / RUNTIME_FILE.name)
        model_settings = {
            "name": model.name,
            "implementation": RUNTIME_CLASS,
            "max_batch_size": model.max_batch_size,
            "max_batch_time": model.max_batch_time_s,
            "parameters": {"uri": "./model.onnx"},
        }
        (folder / "model-settings.json").write_text(json.dumps(model_settings, indent=2) + "\n")


# ---------------------------------------------------------------- the process


def _ready(port: int, model: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", f"/v2/models/{model}/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def running_mlserver(
    venv: Path,
    workdir: Path,
    models: Sequence[MLServerModel],
    timeout: float = 120.0,
) -> Iterator[MLServerPorts]:
    """Start MLServer on free 127.0.0.1 ports with ``models``; yield the ports once every
    model is ready; stop it by PID (SIGTERM, then SIGKILL) on the way out."""
    ports = MLServerPorts.pick()
    repo = workdir / "mlserver-repo"
    write_repository(repo, models, ports)
    # A user's MLSERVER_* variables would override settings.json.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVER_")}
    server = ServerProcess(
        "mlserver",
        [str(_bin(venv, "mlserver")), "start", str(repo)],
        ports.http,
        workdir / "mlserver.log",
        env=env,
        cwd=repo,  # MLServer keeps its .metrics and .envs folders in the working directory
    )
    with server:
        end = time.monotonic() + timeout
        pending = [m.name for m in models]
        while pending:
            try:
                server.check_alive()
            except ServerError as exc:
                raise MLServerError(str(exc)) from exc
            if time.monotonic() > end:
                raise MLServerError(
                    f"MLServer did not report {pending} ready within {timeout:.0f}s"
                )
            pending = [name for name in pending if not _ready(ports.http, name)]
            if pending:
                time.sleep(0.1)
        try:
            server.wait_listening(timeout=10)  # HTTP port; gRPC comes up with the models
        except ServerError as exc:
            raise MLServerError(str(exc)) from exc
        yield ports
