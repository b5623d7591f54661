"""Transports: how the runner reaches the device (``local`` subprocess, ``adb`` phones, ``ssh`` boards)."""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass
class CommandResult:
    """A command run on the device."""

    argv: list[str]
    """What ran (as the host invoked it)."""
    returncode: int
    """Exit status."""
    stdout: str
    """Standard output."""
    stderr: str
    """Standard error (llama.cpp logs here)."""


class TransportError(RuntimeError):
    """A command or a copy on the device failed."""


class Transport(Protocol):
    """How the runner reaches the device."""

    name: str

    def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        """Run ``argv`` on the device."""
        ...

    def push(self, local: Path, remote: str) -> None:
        """Copy a file to the device."""
        ...

    def host(self) -> str:
        """A name for the device in results."""
        ...


def _run(argv: list[str], timeout: float) -> CommandResult:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as err:
        raise TransportError(f"{argv[0]} is not installed on the runner: {err}") from err
    except subprocess.TimeoutExpired as err:
        raise TransportError(f"{shlex.join(argv)} ran past {timeout:.0f}s") from err
    return CommandResult(argv, done.returncode, done.stdout, done.stderr)


def _checked(result: CommandResult, what: str) -> CommandResult:
    if result.returncode != 0:
        raise TransportError(f"{what} failed (exit {result.returncode}): {result.stderr.strip()[-800:]}")
    return result


class LocalTransport:
    """The device is the runner's own machine (host-cpu, a Jetson running its own worker)."""

    name = "local"

    def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        """Run ``argv`` as a subprocess."""
        return _run(list(argv), timeout)

    def push(self, local: Path, remote: str) -> None:
        """Copy ``local`` to ``remote`` unless it is the same file."""
        target = Path(remote)
        if target.resolve() != local.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local, target)

    def host(self) -> str:
        """This machine's host name."""
        return socket.gethostname()


@dataclass
class AdbTransport:
    """An Android phone over adb (USB or ``adb connect``), commands through ``adb shell``."""

    serial: str | None = None
    """Device serial (``adb devices``); None for the only device attached."""
    adb: str = "adb"
    """adb executable."""
    name: str = "adb"
    """Transport name in results."""

    def _base(self) -> list[str]:
        return [self.adb, *(["-s", self.serial] if self.serial else [])]

    def command(self, argv: Sequence[str]) -> list[str]:
        """The host command that runs ``argv`` on the phone."""
        return [*self._base(), "shell", shlex.join(argv)]

    def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        """Run ``argv`` in the phone's shell."""
        return _run(self.command(argv), timeout)

    def push(self, local: Path, remote: str) -> None:
        """``adb push``."""
        _checked(_run([*self._base(), "shell", "mkdir", "-p", str(Path(remote).parent)], 60), "adb mkdir")
        _checked(_run([*self._base(), "push", str(local), remote], 3600), f"adb push {local.name}")

    def host(self) -> str:
        """The phone's model name (``ro.product.model``)."""
        result = self.run(["getprop", "ro.product.model"], 30)
        return result.stdout.strip() or (self.serial or "android")


@dataclass
class SshTransport:
    """A board reachable over ssh (key authentication, no prompts)."""

    host_name: str
    """Host name or address."""
    user: str | None = None
    """Login user (default: ssh's)."""
    port: int = 22
    """ssh port."""
    identity: str | None = None
    """Private key file."""
    options: tuple[str, ...] = ("BatchMode=yes", "StrictHostKeyChecking=accept-new")
    """``-o`` options."""
    name: str = "ssh"
    """Transport name in results."""

    def _options(self, port_flag: str) -> list[str]:
        args = [port_flag, str(self.port)]
        for option in self.options:
            args += ["-o", option]
        return args + (["-i", self.identity] if self.identity else [])

    def _target(self) -> str:
        return f"{self.user}@{self.host_name}" if self.user else self.host_name

    def command(self, argv: Sequence[str]) -> list[str]:
        """The host command that runs ``argv`` on the board."""
        return ["ssh", *self._options("-p"), self._target(), shlex.join(argv)]

    def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        """Run ``argv`` on the board."""
        return _run(self.command(argv), timeout)

    def push(self, local: Path, remote: str) -> None:
        """``scp`` (after ``mkdir -p`` of the folder)."""
        _checked(self.run(["mkdir", "-p", str(Path(remote).parent)], 60), "ssh mkdir")
        _checked(_run(["scp", *self._options("-P"), str(local), f"{self._target()}:{remote}"], 3600), "scp")

    def host(self) -> str:
        """The board's host name."""
        return self.run(["hostname"], 30).stdout.strip() or self.host_name
