"""fedkd: federated and multi-teacher knowledge distillation on Flower.

Installed, ``fedkd.strategies``, ``fedkd.simulations`` and ``fedkd.conf`` are subpackages (setuptools
maps the repository's ``strategies/``, ``simulations/`` and ``conf/`` there). In a source checkout,
or in a Flower app bundle built from one (``flwr run .``), those folders sit beside ``fedkd/``: the
repository root then joins this package's search path so the same names import.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "strategies" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821 (the package's own __path__)
del _Path, _root


def run(overrides: list[str] | None = None, out_dir: str | None = None) -> dict:
    """Run one experiment as ``fedkd-sim`` would, and return its summary.

    Parameters
    ----------
    overrides : list of str, optional
        Hydra overrides, as on the command line (``["strategy=fedavg", "num_rounds=5"]``).
    out_dir : str, optional
        Results folder; default ``outputs/api/<date>/<time>``.
    """
    from fedkd.simulations.api import run_experiment

    return run_experiment(overrides, out_dir)
