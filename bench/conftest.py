"""pytest-benchmark options for ``pytest bench/``: which cases, providers and
modes (the same presets and provider table as ``python -m bench.run``)."""
import pytest
import torch

from .cases import MODES, PRESETS, make_cases
from .providers import PROVIDERS
from .run import CPU_PROVIDERS


def pytest_addoption(parser):
    group = parser.getgroup("lorakern bench")
    group.addoption("--lk-set", choices=sorted(PRESETS), default=None,
                    help="case preset (default: quick with CUDA, cpu-smoke without)")
    group.addoption("--lk-providers", default=None, help=f"subset of {','.join(PROVIDERS)}")
    group.addoption("--lk-modes", default=None, help=f"subset of {','.join(MODES)}")


def pytest_configure(config):
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # steadier CPU timings on a shared machine


def _split(value, default):
    return [v for v in value.split(",") if v] if value else list(default)


def pytest_generate_tests(metafunc):
    if "lk_case" not in metafunc.fixturenames:
        return
    cuda = torch.cuda.is_available()
    opt = metafunc.config.getoption
    preset = PRESETS[opt("--lk-set") or ("quick" if cuda else "cpu-smoke")]
    cases = make_cases(**preset)
    providers = _split(opt("--lk-providers"), PROVIDERS if cuda else CPU_PROVIDERS)
    modes = _split(opt("--lk-modes"), MODES)
    params = [pytest.param(c, PROVIDERS[p], m, id=f"{c.shape}-M{c.tokens}-r{c.rank}-{c.dtype}-{c.adapter_label}"
                           f"-p{c.dropout:g}-{p}-{m}")
              for c in cases for p in providers for m in modes
              if PROVIDERS[p].runs(c, m)]
    metafunc.parametrize("lk_case,lk_provider,lk_mode", params)


@pytest.fixture(scope="session")
def lk_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
