"""bridged's pytest plugin: emulated ESP32s for host-firmware tests.

Registered through the ``pytest11`` entry point ``bridged.testing`` (any
``pip install bridged``), or by ``pytest_plugins = ["bridged.testing"]`` in a
conftest.py; both may be present.

Fixtures:

- ``bridged_device``: one started `Device` (the real ``bridged run`` on a
  pty, in a directory of its own under the test's ``tmp_path``), stopped after
  the test; the test errors if the device did not exit 0.
- ``bridged_factory``: ``bridged_factory(name=None, **options)`` starts one
  more device (options as `DeviceOptions`, over the marker's), for several
  devices or one set up inside the test; each is stopped the same way.

``@pytest.mark.bridged(profile=..., config={...}, transcript=..., ...)`` sets
a test's (or a class's, a module's) device options; a marker nearer the test
overrides a farther one, ``config`` tables merged.  ``--bridged-profile NAME``
sets the profile where no marker does; else ``fast``.

When a test fails, each of its devices' log tails is added to the report.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridged.atclient import AtAnswer, AtClient, AtTimeout
from bridged.testing._config import merge, normalise
from bridged.testing.device import (
    ControlRefused,
    Device,
    DeviceError,
    DeviceOptions,
    DeviceTimeout,
    UnknownCommand,
)
from bridged.testing.transcript import TranscriptMark

__all__ = ["AtAnswer", "AtClient", "AtTimeout", "ControlRefused", "Device", "DeviceError", "DeviceFactory",
           "DeviceOptions", "DeviceTimeout", "TranscriptMark", "UnknownCommand"]

DEFAULT_PROFILE = "fast"
_DEVICES = pytest.StashKey[list[Device]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bridged", "bridged emulated ESP32s (bridged.testing)")
    group.addoption("--bridged-profile", metavar="NAME", default=None,
                    help=f"profile of the bridged_device fixture's devices where no "
                         f"@pytest.mark.bridged names one (default {DEFAULT_PROFILE})")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "bridged(profile=None, config=None, transcript=True, start_timeout=30.0, stop_timeout=10.0, "
                   "at_timeout=5.0): options of the test's bridged devices (bridged.testing.DeviceOptions)")


class DeviceFactory:
    """Starts devices for one test (the ``bridged_factory`` fixture) and stops them."""

    def __init__(self, directory: Path, defaults: dict[str, Any]) -> None:
        self.directory = directory
        self.defaults = defaults
        self.devices: list[Device] = []

    def __call__(self, name: str | None = None, **options: Any) -> Device:
        """Start a device in ``<tmp_path>/<name>`` (default ``bridged<N>``); return it once ready.

        Raises:
            DeviceError, DeviceTimeout: it did not start (the message has its log).
        """
        name = name or f"bridged{len(self.devices)}"
        if any(d.directory.name == name for d in self.devices):
            raise ValueError(f"bridged_factory: a device named {name!r} exists already in this test")
        chosen = {**self.defaults, **options}
        if self.defaults.get("config") is not None and options.get("config") is not None:
            chosen["config"] = merge(normalise(self.defaults["config"]), normalise(options["config"]))
        try:
            device_options = DeviceOptions(**chosen)
        except TypeError as exc:
            raise TypeError(f"bridged device options: {exc}; known: {', '.join(DeviceOptions.__slots__)}") from None
        device = Device(self.directory / name, device_options)
        self.devices.append(device)  # first: a device that fails to start is still stopped
        return device.start()

    def stop_all(self) -> list[str]:
        """Stop every device; a line (with its log) for each that served and did not exit 0.

        One that never became ready raised at its start already: the test has its story.
        """
        problems = []
        for device in self.devices:
            code = device.stop()
            if code != 0 and device.ready:
                problems.append(f"bridged device {device.directory.name} (profile {device.options.profile!r}) "
                                f"exited with status {code}, not 0:\n{device.log_tail()}")
        return problems


def _marker_options(node: pytest.Item, config: pytest.Config) -> dict[str, Any]:
    options: dict[str, Any] = {"profile": config.getoption("--bridged-profile") or DEFAULT_PROFILE}
    for marker in reversed(list(node.iter_markers("bridged"))):  # the farthest first
        kwargs = dict(marker.kwargs)
        if marker.args:
            if len(marker.args) > 1 or "profile" in kwargs:
                pytest.fail(f"{node.nodeid}: @pytest.mark.bridged takes one positional argument, "
                            "the profile", pytrace=False)
            kwargs["profile"] = marker.args[0]
        unknown = set(kwargs) - set(DeviceOptions.__slots__)
        if unknown:
            pytest.fail(f"{node.nodeid}: @pytest.mark.bridged: unknown option(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(DeviceOptions.__slots__)}", pytrace=False)
        if options.get("config") is not None and kwargs.get("config") is not None:
            kwargs["config"] = merge(normalise(options["config"]), normalise(kwargs["config"]))
        options.update(kwargs)
    return options


@pytest.fixture
def bridged_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeviceFactory]:
    """Start bridged devices in the test: ``bridged_factory(name=None, **options) -> Device``."""
    factory = DeviceFactory(tmp_path, _marker_options(request.node, request.config))
    request.node.stash[_DEVICES] = factory.devices
    yield factory
    problems = factory.stop_all()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def bridged_device(bridged_factory: DeviceFactory) -> Device:
    """One bridged device, ready: ``.port`` (the pty), ``.at``, ``.status()``,
    ``.fault(name, **params)``, ``.wait_for_transcript(pattern, timeout)``."""
    return bridged_factory()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    devices = item.stash.get(_DEVICES, None)
    if devices and report.failed and report.when == "call":
        for device in devices:
            report.sections.append((f"bridged {device.directory.name} log", device.log_tail()))
