"""What ``[ota]`` allows an update to be; the MCU only asks (see bridged.net.ota).

* the server: https, or plain http only with ``insecure_http``;
* the partition: one of ``partitions`` (default ``ota`` alone);
* the version: 1 to 64 of ``A-Z a-z 0-9 . _ + -``, and not older than the
  running one unless ``allow_downgrade`` (bridged.ota_image orders them);
* the image: signed by one of ``public_key`` over {partition, version, size,
  sha256}, or, with ``allow_unsigned``, unsigned (logged as a warning).

"Running version" of a partition: the newer of what its last successful
update recorded in ``<state dir>/ota/<partition>.version`` (bridged's own
file, out of the MCU's reach: AT+RESTORE does not clear it) and, for the
``ota`` partition, ``[ota] current_version`` (what the device shipped with).
Equal versions are allowed (a reinstall).
"""

from __future__ import annotations

from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bridged import ota_image
from bridged.atomic import write_atomic
from bridged.config import OtaConfig

__all__ = ["OtaFailed", "OtaRefused", "Policy", "FIRMWARE"]

log = structlog.get_logger()

FIRMWARE = "ota"  # the partition [ota] current_version speaks of


class OtaFailed(Exception):
    """The update (or the version list) failed; ``why`` is for the log."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class OtaRefused(OtaFailed):
    """``[ota]`` does not allow this update (server, partition, version or signature)."""


class Policy:
    """``[ota]``'s rules, with the image directory holding the version records."""

    def __init__(self, config: OtaConfig, directory: Path, tls: bool) -> None:
        self.config = config
        self.directory = directory
        self.tls = tls

    def check_server(self) -> None:
        """Raises OtaRefused when the server may not be used at all (plain http)."""
        if not self.tls and not self.config.insecure_http:
            raise OtaRefused(f"update server {self.config.server}: plain http is refused"
                             " (use https, or set [ota] insecure_http = true)")

    def check(self, version: str, partition: str) -> list[Ed25519PublicKey]:
        """What ``[ota]`` says of a request, before anything is requested.

        Args:
            version: as the MCU gave it, "" for the server's latest.

        Returns:
            The public keys to verify the image with (none: unsigned is allowed).

        Raises:
            OtaRefused: with the reason (a key file that cannot be read is one).
        """
        self.check_server()
        if partition not in self.config.partitions:
            raise OtaRefused(f"partition {partition!r} is not in [ota] partitions"
                             f" ({', '.join(self.config.partitions)})")
        if version:
            self.check_version(version, partition)
        if not self.config.public_key and not self.config.allow_unsigned:
            raise OtaRefused("no [ota] public_key to verify images with (or set [ota] allow_unsigned = true)")
        return self._public_keys()

    def check_version(self, version: str, partition: str) -> None:
        """Raises OtaRefused for a malformed version or a downgrade."""
        problem = ota_image.version_problem(version)
        if problem is not None:
            raise OtaRefused(problem)
        running = self.running_version(partition)
        if running and ota_image.is_older(version, running) and not self.config.allow_downgrade:
            raise OtaRefused(f"version {version} is older than the running {running} of partition"
                             f" {partition}: a downgrade ([ota] allow_downgrade = true allows it)")

    def running_version(self, partition: str) -> str:
        """See the module docstring; "" when nothing says.

        Raises:
            OtaRefused: the record exists but cannot be read or is damaged.
        """
        floor = self.config.current_version if partition == FIRMWARE else ""
        record = self.directory / f"{partition}.version"
        try:
            recorded = record.read_bytes()[:200].decode("ascii", "replace").strip()
        except (FileNotFoundError, NotADirectoryError):  # no update of it so far
            return floor
        except OSError as exc:
            raise OtaRefused(f"cannot read {record}: {exc.strerror or exc}") from None
        if ota_image.version_problem(recorded) is not None:
            raise OtaRefused(f"{record} holds no valid version: remove it or write the running one into it")
        return recorded if not floor or ota_image.is_older(floor, recorded) else floor

    def record_version(self, partition: str, version: str) -> None:
        """Remember ``version`` as the running one of ``partition`` (atomically, on disk)."""
        record = self.directory / f"{partition}.version"
        try:
            write_atomic(record, (version + "\n").encode("ascii"))
        except OSError as exc:
            # The image is installed, so the update succeeded; but the floor did not move.
            log.error("ota_version_not_recorded", file=str(record), version=version,
                      error=exc.strerror or str(exc))

    def _public_keys(self) -> list[Ed25519PublicKey]:
        # Read at every update: a rotated key file applies without a reload.
        try:
            return ota_image.load_public_keys(self.config.public_key)
        except ota_image.SignatureError as exc:
            raise OtaRefused(str(exc)) from None

    def verify(self, manifest: ota_image.Manifest, signature: bytes | None,
               keys: list[Ed25519PublicKey]) -> None:
        """Raises OtaRefused unless the signature verifies (None: unsigned, which check() allowed)."""
        if signature is None:
            log.warning("ota_unsigned_image", partition=manifest.partition, version=manifest.version,
                        sha256=manifest.sha256, hint="installed because [ota] allow_unsigned = true")
            return
        try:
            index = ota_image.verify(manifest, signature, keys)
        except ota_image.SignatureError as exc:
            raise OtaRefused(f"image: {exc}") from None
        log.info("ota_signature_verified", key=self.config.public_key[index], partition=manifest.partition,
                 version=manifest.version, sha256=manifest.sha256)
