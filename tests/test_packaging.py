"""The install pins agree with each other and with the real torch wheels.

The machines that run this suite may carry a CPU build of torch that declares
no triton at all, so an installable-looking requirements.txt can still be
impossible to resolve against PyPI's CUDA build of the same torch version. The
table below records what each real wheel declares, so that the check does not
depend on which torch build happens to be installed.
"""
import ast
import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

# torch version -> (its triton requirement, the wheel metadata it was read from).
# Only the Linux wheels name triton (macOS, Windows and, for 2.13.0, aarch64
# wheels declare none); each line is verbatim from the x86-64 Linux wheel.
TORCH_DECLARES_TRITON = {
    "2.13.0": (
        'triton==3.7.1; platform_system == "Linux" and python_version < "3.15"',
        "https://files.pythonhosted.org/packages/01/79/1f2d34ad7034ee1c7ffc1cf8bf0f8213af2a81df"
        "6ecdb3997ecec107c09d/torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl.metadata",
    ),
    "2.11.0": (
        'triton==3.6.0; platform_system == "Linux"',
        "https://files.pythonhosted.org/packages/8c/8b/d7be22fbec9ffee6cff31a39f8750d4b3a65d349"
        "a286cf4aec74c2375662/torch-2.11.0-cp311-cp311-manylinux_2_28_x86_64.whl.metadata",
    ),
    "2.4.0": (
        'triton==3.0.0; platform_system == "Linux" and platform_machine == "x86_64"'
        ' and python_version < "3.13"',
        "https://files.pythonhosted.org/packages/80/83/9b7681e41e59adb6c2b042f7e8eb716515665a6e"
        "ed3dda4215c6b3385b90/torch-2.4.0-cp311-cp311-manylinux1_x86_64.whl.metadata",
    ),
}

HOW_TO_READ_A_WHEEL = (
    "add it to TORCH_DECLARES_TRITON from the real wheel's metadata: "
    "curl -s -H 'Accept: application/vnd.pypi.simple.v1+json' https://pypi.org/simple/torch/ "
    "lists every wheel's url; `curl -s <url of the x86_64 Linux wheel>.metadata | grep triton` "
    "prints the requirement (a locally installed CPU build of torch declares none, so "
    "importlib.metadata cannot tell)"
)


def requirements_txt():
    """name -> Requirement for every package line of requirements.txt."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement = Requirement(line)
        pins[requirement.name.lower()] = requirement
    return pins


def setup_install_requires():
    """name -> Requirement for setup.py's install_requires, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            requirements = [Requirement(text) for text in ast.literal_eval(node.value)]
            return {r.name.lower(): r for r in requirements}
    raise AssertionError("setup.py has no install_requires")


def pinned_version(requirement):
    """The X of an exact pin ``name==X``."""
    specs = list(requirement.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", (
        f"requirements.txt: {requirement} is not an exact pin name==X")
    return specs[0].version


def lower_bound(requirement):
    """The X of ``name>=X``."""
    bounds = [s.version for s in requirement.specifier if s.operator == ">="]
    assert len(bounds) == 1, f"setup.py: {requirement} has no single lower bound name>=X"
    return bounds[0]


def torch_wheel_record(torch_version):
    """(triton requirement, source) of a torch version, matched as versions (2.4 == 2.4.0)."""
    for version, record in TORCH_DECLARES_TRITON.items():
        if Version(version) == Version(torch_version):
            return Requirement(record[0]), record[1]
    pytest.fail(f"torch {torch_version} is not in TORCH_DECLARES_TRITON; " + HOW_TO_READ_A_WHEEL)


def test_triton_pin_is_the_one_the_pinned_torch_requires():
    pins = requirements_txt()
    torch_version = pinned_version(pins["torch"])
    declared, source = torch_wheel_record(torch_version)
    pin = pins.get("triton")
    assert pin is not None, (
        f"requirements.txt pins no triton; torch {torch_version} requires `{declared}`")
    assert (pin.specifier, str(pin.marker)) == (declared.specifier, str(declared.marker)), (
        f"requirements.txt pins `{pin}`, but torch {torch_version} from PyPI requires "
        f"`{declared}` ({source}): pip cannot install both")


def lowest_admitted_version(requirement):
    """The X of an exact pin ``name==X``, or of the lower bound of a range ``name>=X``."""
    specs = list(requirement.specifier)
    exact = [s.version for s in specs if s.operator == "=="]
    if exact:
        return pinned_version(requirement)
    bounds = [s.version for s in specs if s.operator == ">="]
    assert len(bounds) == 1, (
        f"requirements.txt: {requirement} is neither an exact pin name==X nor a range "
        f"with one lower bound name>=X")
    return bounds[0]


def test_requirements_pins_meet_setup_lower_bounds():
    # an exact pin must lie inside setup.py's range; a range (numpy>=2) must start inside it
    pins = requirements_txt()
    for name, bound in setup_install_requires().items():
        assert name in pins, f"requirements.txt does not pin {name}, which setup.py requires"
        version = lowest_admitted_version(pins[name])
        assert bound.specifier.contains(version, prereleases=True), (
            f"requirements.txt admits {name} {version}, outside setup.py's `{bound}`")


def test_oldest_supported_torch_installs_beside_setup_triton_bound():
    # `pip install .` next to the oldest torch setup.py admits must be able to
    # keep the exact triton that torch requires.
    requires = setup_install_requires()
    oldest_torch = lower_bound(requires["torch"])
    declared, source = torch_wheel_record(oldest_torch)
    triton_version = pinned_version(declared)
    assert requires["triton"].specifier.contains(triton_version, prereleases=True), (
        f"setup.py requires `{requires['triton']}` and `{requires['torch']}`, but torch "
        f"{oldest_torch} requires `{declared}` ({source}): raise the torch bound with "
        f"the triton bound")


def test_readme_states_setup_lower_bounds():
    requires = setup_install_requires()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("torch", "triton"):
        stated = re.findall(rf"\b{name} ≥ ?([0-9][0-9.]*[0-9])", readme)
        assert stated == [lower_bound(requires[name])], (
            f"README.md states {name} ≥ {stated}; setup.py requires `{requires[name]}`")


def installed_release(name):
    """The installed version without a local label (2.13.0+cpu -> 2.13.0), or None."""
    try:
        return importlib.metadata.version(name).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def test_quickstart_python_is_admitted_by_every_exact_pin():
    # An exact pin cannot fall back to an older release for an older Python, so
    # its Requires-Python bounds the Python the Quickstart can promise.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stated = re.findall(r"Python ≥ ?([0-9]+\.[0-9]+) and pip", readme)
    assert len(stated) == 1, f"README.md states the Quickstart's Python as {stated}"
    for name, pin in requirements_txt().items():
        if pin.marker is not None and not pin.marker.evaluate():
            continue
        version = pinned_version(pin) if "==" in str(pin.specifier) else None
        if version is None or installed_release(name) != version:
            continue  # a range, or not this pin's release: its Requires-Python is unknown here
        requires_python = importlib.metadata.metadata(name).get("Requires-Python")
        if requires_python:
            assert SpecifierSet(requires_python).contains(stated[0]), (
                f"README.md says the Quickstart works with Python ≥ {stated[0]}, but the "
                f"pinned {name}=={version} requires Python {requires_python}")


def unmet_triton_requirements(torch_requires, triton_version):
    """The triton requirements among ``torch_requires`` (Requires-Dist lines) that
    apply here and that ``triton_version`` (None: not installed) does not meet."""
    needed = [Requirement(text) for text in torch_requires]
    needed = [r for r in needed
              if r.name.lower() == "triton" and (r.marker is None or r.marker.evaluate())]
    return [r for r in needed
            if triton_version is None
            or not r.specifier.contains(Version(triton_version), prereleases=True)]


def test_a_triton_other_than_torch_requires_is_reported():
    requirement = TORCH_DECLARES_TRITON["2.11.0"][0]  # applies on any Linux
    if not Requirement(requirement).marker.evaluate():
        pytest.skip("torch wheels require triton on Linux only")
    assert unmet_triton_requirements([requirement], "3.6.0") == []
    assert [str(r) for r in unmet_triton_requirements([requirement], "3.9.0")] == [requirement]
    assert [str(r) for r in unmet_triton_requirements([requirement], None)] == [requirement]
    assert unmet_triton_requirements(['numpy>=2', 'triton==3.6.0; platform_system == "Nowhere"'],
                                     "3.9.0") == []


def test_installed_triton_satisfies_installed_torch():
    torch_version = importlib.metadata.version("torch")
    torch_requires = importlib.metadata.requires("torch") or []
    if not any(Requirement(text).name.lower() == "triton" for text in torch_requires):
        pytest.skip(f"the installed torch {torch_version} declares no triton (a CPU build, "
                    f"or a platform without triton wheels)")
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    unmet = unmet_triton_requirements(torch_requires, triton_version)
    assert not unmet, (f"triton {triton_version or '(none)'} is installed, but torch "
                       f"{torch_version} requires {', '.join(map(str, unmet))}")
