"""Start real ComfyUI headless (``main.py --cpu``) with this pack and drive it over HTTP (stdlib only)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from . import runtime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``with ComfyServer(base_dir) as srv: srv.queue(graph)``. ``base_dir`` holds models/,
    custom_nodes/, input/, output/ (``--base-directory``); the log goes to ``base_dir/server.log``."""

    def __init__(self, base_dir: Path, extra_args=(), start_timeout: float = 240.0):
        self.base = Path(base_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.client_id = uuid.uuid4().hex

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "ComfyServer":
        root = runtime.comfyui_dir()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(runtime.comfy_pythonpath() + [env.get("PYTHONPATH", "")])
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, str(runtime.SUPPORT_DIR / "launch.py"), str(root),
               "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--preview-method", "none",
               *self.extra_args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(self.base), env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {self.start_timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)      # its own session: only what we started
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP ----------------------------------------------------------------------------------
    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def queue(self, graph: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
        """POST /prompt; returns (HTTP status, JSON body) — 400 carries ``node_errors``."""
        body = json.dumps({"prompt": graph, "client_id": self.client_id}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait(self, prompt_id: str, timeout: float = 300.0) -> Dict[str, Any]:
        """The history entry of a finished prompt (``status.status_str`` success / error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"ComfyUI died:\n{self.log()[-4000:]}")
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout}s:\n{self.log()[-3000:]}")

    def run(self, graph: Dict[str, Any], timeout: float = 300.0) -> Dict[str, Any]:
        status, body = self.queue(graph)
        if status != 200:
            raise AssertionError(f"/prompt refused the graph ({status}): {json.dumps(body)[:3000]}")
        return self.wait(body["prompt_id"], timeout)


def widget_defaults(object_info: Dict[str, Any], node: str) -> Dict[str, Any]:
    """Default values of a node's required widget inputs, as /object_info declares them."""
    out = {}
    for name, decl in object_info[node]["input"]["required"].items():
        kind = decl[0]
        opts = decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {}
        if "default" in opts:
            out[name] = opts["default"]
        elif isinstance(kind, list) and kind:
            out[name] = kind[0]
    return out
