"""The Flower app of an installed fedkd: a folder holding only a ``pyproject.toml``.

``flwr run <folder>`` packs the folder into an app bundle; its components name fedkd's installed
ServerApp and ClientApp, so no source checkout is needed (``flwr run .`` in a checkout uses the
repository's own pyproject.toml, which names the same components).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import fedkd

log = logging.getLogger(__name__)

SERVERAPP = "fedkd.simulations.serverapp:app"
CLIENTAPP = "fedkd.client.app:app"

PYPROJECT = f'''[project]
name = "fedkd"
version = "{fedkd.__version__}"
description = "Federated and multi-teacher knowledge distillation on Flower (installed fedkd)"
license = "Apache-2.0"
dependencies = []  # fedkd is installed on every machine that runs this app

[tool.flwr.app]
publisher = "fedkd"

[tool.flwr.app.components]
serverapp = "{SERVERAPP}"
clientapp = "{CLIENTAPP}"

[tool.flwr.app.config]
overrides = ""              # Hydra overrides, e.g. "strategy=fedmd num_rounds=5"
output-dir = "outputs/flwr" # results land in <output-dir>/<run id>
'''


def write_app(folder: str | Path) -> Path:
    """Write the app's ``pyproject.toml`` into `folder` (created if needed); return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    return folder


def main(argv: list[str] | None = None) -> None:
    """``fedkd-app FOLDER``: write the Flower app of the installed fedkd, for ``flwr run FOLDER``."""
    parser = argparse.ArgumentParser(prog="fedkd-app", description=main.__doc__)
    parser.add_argument("folder", nargs="?", default="fedkd-app",
                        help="where to write pyproject.toml (default: ./fedkd-app)")
    folder = write_app(parser.parse_args(argv).folder)
    print(f"wrote {folder / 'pyproject.toml'}; run it with: flwr run {folder}")  # CLI output


if __name__ == "__main__":
    main()
