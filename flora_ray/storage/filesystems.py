"""Turn ``run.storage`` into a ``pyarrow.fs`` filesystem, and check before a run that it is reachable and writable.

``run.storage`` is one string: a local path (relative or absolute, ``~`` expanded), a ``file:///abs/path`` URI, an
``s3://bucket/prefix`` or a ``gs://bucket/prefix`` URI. ``resolve_filesystem`` turns it into ``(filesystem, path)``
without touching the network; ``location_uri`` is its inverse (for messages, and for re-resolving the location in
another process); ``check_storage`` writes, reads back and deletes a small probe object under the location, within
a deadline, and turns every failure into one ``ValueError`` line that says what to do.

S3 is configured from the standard AWS variables, read here and passed to pyarrow explicitly, because pyarrow's
``S3FileSystem`` does not read the endpoint variables itself (it would silently talk to the public AWS endpoint):

* ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``: the endpoint (``http://host:port``); its scheme becomes the
  transport scheme and ``host:port`` the ``endpoint_override``. Unset: the AWS endpoint of the region.
* ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``: credentials; unset, the AWS SDK's
  default chain (``AWS_PROFILE``, ``~/.aws``, instance metadata) is used.
* ``AWS_REGION``, else ``AWS_DEFAULT_REGION``: the region (``us-east-1`` when an endpoint is set without one).
* ``AWS_CA_BUNDLE``: the CA certificates for an ``https`` endpoint.

Every S3 filesystem gets short connect and request timeouts and few retries, so an unreachable endpoint fails in
seconds. GCS honours ``STORAGE_EMULATOR_HOST`` (anonymous, to the emulator); otherwise Google's default credentials,
with a short retry time limit.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import posixpath
import re
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from flora_ray.errors import InputError

if TYPE_CHECKING:
    import pyarrow.fs

ALLOWED = "a local path, file:///abs/path, s3://bucket/prefix or gs://bucket/prefix"
"""What ``run.storage`` may be (for error messages)."""

S3_CONNECT_TIMEOUT_S = 3.0
"""Socket connect timeout of every S3 filesystem built here."""
S3_REQUEST_TIMEOUT_S = 10.0
"""S3 request timeout: the AWS SDK aborts a request that transfers nothing for this long."""
S3_MAX_ATTEMPTS = 3
"""Attempts per S3 request (the AWS standard retry strategy, with its short jittered backoff)."""
GCS_RETRY_TIME_LIMIT_S = 15
"""How long the GCS client retries transient errors (its default is 15 minutes)."""

PROBE_PREFIX = ".flora-ray-probe-"
"""Name prefix of the object ``check_storage`` writes and deletes."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# A scheme of two or more letters and a colon not followed by '//' (s3:/bucket, gs:bucket): a mistyped URI, not a
# local path (one letter is a Windows drive, C:\\runs).
_ALMOST_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(?!//)")


class StorageLocationError(InputError):
    """``run.storage`` is not a location flora-ray can use; ``cause`` and ``advice`` are short phrases."""

    def __init__(self, location: str, cause: str, advice: str) -> None:
        self.location = location
        self.cause = cause
        self.advice = advice
        super().__init__(f"run.storage {location!r} is not a usable location: {cause}; {advice}")


@dataclass(frozen=True)
class _Parsed:
    """A syntactically valid ``run.storage``: ``kind`` is ``local``, ``s3`` or ``gcs``; ``path`` is the fs path."""

    kind: str
    path: str


def _parse(location: str) -> _Parsed:
    """Split ``location`` into a kind and a filesystem path, without any I/O beyond ``~`` and ``cwd``."""
    if not location.strip():
        raise StorageLocationError(location, "it is empty", f"set it to {ALLOWED}")
    match = _SCHEME.match(location)
    if match is None and (almost := _ALMOST_URI.match(location)):
        scheme = almost.group(1)
        example = "file:///abs/path" if scheme.lower() == "file" else f"{scheme}://bucket/prefix"
        raise StorageLocationError(location, f"'{scheme}:' is not followed by '//'", f"write {example}")
    if match is None:
        return _Parsed("local", os.path.abspath(os.path.expanduser(location)))
    scheme = match.group(1).lower()
    rest = location[match.end() :]
    if scheme == "file":
        parts = urlsplit(location)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise StorageLocationError(location, "a file:// URI needs an absolute path", "write file:///abs/path")
        return _Parsed("local", os.path.normpath(unquote(parts.path)))
    if scheme in ("s3", "gs", "gcs"):
        if "?" in rest or "#" in rest:
            raise StorageLocationError(
                location,
                "URI options are not supported",
                "drop the '?...' part and configure the endpoint through the environment",
            )
        path = re.sub(r"/+", "/", rest).strip("/")
        if not path:
            raise StorageLocationError(location, "the bucket is missing", f"write {scheme}://bucket/prefix")
        return _Parsed("s3" if scheme == "s3" else "gcs", path)
    raise StorageLocationError(location, f"unsupported scheme {scheme!r}", f"use {ALLOWED}")


def uri_scheme(location: str) -> str | None:
    """The lower-case scheme of a URI (``s3``, ``gs``, ``file``, ...), or None for a path (and an almost-URI)."""
    match = _SCHEME.match(location)
    return match.group(1).lower() if match else None


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _get(env: Mapping[str, str], *names: str) -> str | None:
    """The first of ``names`` set to a non-blank value in ``env``."""
    for name in names:
        value = (env.get(name) or "").strip()
        if value:
            return value
    return None


def _split_endpoint(url: str, variable: str) -> tuple[str, str]:
    """``http://host:port`` -> ``("http", "host:port")``; a bare ``host:port`` is https."""
    if "://" not in url:
        return "https", url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise InputError(f"{variable}={url!r} is not an endpoint URL; set it to http(s)://host[:port]")
    return parts.scheme.lower(), parts.netloc


def s3_endpoint(env: Mapping[str, str] | None = None) -> str | None:
    """The S3 endpoint URL the environment configures (``AWS_ENDPOINT_URL_S3`` first), or None for AWS itself."""
    return _get(_env(env), "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def s3_filesystem(env: Mapping[str, str] | None = None, **overrides: object) -> pyarrow.fs.S3FileSystem:
    """An ``S3FileSystem`` configured from the AWS variables of ``env`` (default ``os.environ``); no network access.

    Args:
        env: The environment to read; ``os.environ`` when None.
        **overrides: Further ``S3FileSystem`` arguments (``allow_bucket_creation=True`` for test fixtures).

    Raises:
        ValueError: An endpoint variable is not a URL, or only one of the access key id and secret is set.
    """
    from pyarrow.fs import AwsStandardS3RetryStrategy, S3FileSystem

    env = _env(env)
    options: dict[str, object] = {
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "request_timeout": S3_REQUEST_TIMEOUT_S,
        "retry_strategy": AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    }
    endpoint = s3_endpoint(env)
    if endpoint is not None:
        variable = "AWS_ENDPOINT_URL_S3" if _get(env, "AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
        options["scheme"], options["endpoint_override"] = _split_endpoint(endpoint, variable)
    region = _get(env, "AWS_REGION", "AWS_DEFAULT_REGION") or ("us-east-1" if endpoint is not None else None)
    if region is not None:
        options["region"] = region
    key, secret = _get(env, "AWS_ACCESS_KEY_ID"), _get(env, "AWS_SECRET_ACCESS_KEY")
    if (key is None) != (secret is None):
        missing = "AWS_SECRET_ACCESS_KEY" if secret is None else "AWS_ACCESS_KEY_ID"
        raise InputError(f"{missing} is not set but its pair is; set both AWS credential variables or neither")
    if key is not None:
        options.update(access_key=key, secret_key=secret, session_token=_get(env, "AWS_SESSION_TOKEN"))
    ca_bundle = _get(env, "AWS_CA_BUNDLE")
    if ca_bundle is not None and options.get("scheme", "https") == "https":
        options["tls_ca_file_path"] = ca_bundle
    options.update(overrides)
    try:
        return S3FileSystem(**options)
    except TypeError:  # pyarrow < 19 has no tls_ca_file_path
        if "tls_ca_file_path" in overrides or "tls_ca_file_path" not in options:
            raise
        options.pop("tls_ca_file_path")
        return S3FileSystem(**options)


def gcs_filesystem(env: Mapping[str, str] | None = None) -> pyarrow.fs.GcsFileSystem:
    """A ``GcsFileSystem``: anonymous to ``STORAGE_EMULATOR_HOST`` when set, else default credentials; no I/O."""
    from pyarrow.fs import GcsFileSystem

    options: dict[str, object] = {"retry_time_limit": datetime.timedelta(seconds=GCS_RETRY_TIME_LIMIT_S)}
    emulator = _get(_env(env), "STORAGE_EMULATOR_HOST")
    if emulator is not None:
        scheme, host = _split_endpoint(emulator if "://" in emulator else f"http://{emulator}", "STORAGE_EMULATOR_HOST")
        options.update(anonymous=True, scheme=scheme, endpoint_override=host)
    return GcsFileSystem(**options)


def resolve_filesystem(
    location: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem and path of a ``run.storage`` location, without network access.

    Args:
        location: A local path (relative to the working directory or absolute; ``~`` expanded), ``file:///abs``,
            ``s3://bucket/prefix`` or ``gs://bucket/prefix``.
        env: The environment to configure S3/GCS from; ``os.environ`` when None.

    Returns:
        ``(LocalFileSystem(), absolute path)``, ``(S3FileSystem, "bucket/prefix")`` or
        ``(GcsFileSystem, "bucket/prefix")``.

    Raises:
        StorageLocationError: (a ``ValueError``) an empty location, an unknown scheme or a malformed URI.
        ValueError: The S3/GCS environment variables are malformed.
    """
    location = os.fspath(location)
    parsed = _parse(location)
    if parsed.kind == "s3":
        return s3_filesystem(env), parsed.path
    if parsed.kind == "gcs":
        return gcs_filesystem(env), parsed.path
    from pyarrow.fs import LocalFileSystem

    return LocalFileSystem(), parsed.path


def location_uri(fs: pyarrow.fs.FileSystem, path: str) -> str:
    """The ``run.storage`` string of ``path`` on ``fs``: the inverse of ``resolve_filesystem``.

    ``s3://bucket/prefix``, ``gs://bucket/prefix`` or the local absolute path; a path inside a
    ``SubTreeFileSystem`` is mapped through its base. Other filesystems (in-memory ones in tests) give
    ``<type_name>://path``, which is for messages only and cannot be resolved again.
    """
    kind = fs.type_name
    if kind == "local":
        return path
    if kind == "s3":
        return f"s3://{path.strip('/')}"
    if kind == "gcs":
        return f"gs://{path.strip('/')}"
    if kind == "subtree":
        return location_uri(fs.base_fs, posixpath.join(fs.base_path, path.lstrip("/")))
    return f"{kind}://{path}"


def is_shared_location(location: str | os.PathLike[str]) -> bool:
    """Whether other nodes can see ``location``: False for a relative local path, True for URIs and absolute paths.

    An absolute path may be a shared (NFS) mount; whether it really is cannot be told from here.

    Raises:
        StorageLocationError: As ``resolve_filesystem``.
    """
    location = os.fspath(location)
    parsed = _parse(location)
    if parsed.kind != "local" or _SCHEME.match(location):
        return True
    return os.path.isabs(os.path.expanduser(location))


def _not_writable(location: str, cause: str, advice: str) -> InputError:
    return InputError(f"run.storage {location!r} is not writable: {cause}; {advice}")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _probe(fs: pyarrow.fs.FileSystem, path: str) -> None:
    """Create ``path`` (locally), write, read back and delete a probe object under it."""
    if fs.type_name == "local":
        fs.create_dir(path, recursive=True)
    # Object stores have no directories: the probe's write creates the prefix, and writing a directory marker
    # would leave an object behind.
    probe = posixpath.join(path, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    payload = f"flora-ray storage probe {probe}\n".encode()
    written = False
    try:
        with fs.open_output_stream(probe) as out:
            out.write(payload)
        written = True
        with fs.open_input_stream(probe) as inp:
            data = inp.read()
        if data != payload:
            raise OSError(f"the probe read back {len(data)} bytes instead of the {len(payload)} written")
        fs.delete_file(probe)
    except BaseException:
        if written:
            with contextlib.suppress(Exception):
                fs.delete_file(probe)
        raise


def _first_existing(path: str) -> str:
    """The longest prefix of the local ``path`` that exists."""
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _explain(exc: BaseException, kind: str, path: str, env: Mapping[str, str]) -> tuple[str, str]:
    """A short cause and what to do about a failed probe."""
    message = str(exc)
    if kind == "local":
        code = getattr(exc, "errno", None)
        if isinstance(exc, (NotADirectoryError, FileExistsError)) or code in (errno.ENOTDIR, errno.EEXIST):
            blocker = _first_existing(path)
            if os.path.lexists(blocker) and not os.path.isdir(blocker):
                return f"{blocker!r} is a regular file, not a directory", "choose a directory path"
            return "a non-directory is in the way", "choose a directory path"
        if isinstance(exc, PermissionError) or code in (errno.EACCES, errno.EPERM):
            return "permission denied", "choose a directory this user can write to"
        if code == errno.EROFS:
            return "the filesystem is read-only", "choose a writable directory"
        if code == errno.ENOSPC:
            return "no space left on the device", "free space or choose another directory"
        return _one_line(message), "choose a writable directory"
    upper = message.upper()
    bucket = path.split("/", 1)[0]
    if kind == "s3":
        endpoint = s3_endpoint(env)
        where = endpoint or "the AWS S3 endpoint (AWS_ENDPOINT_URL is not set)"
        endpoint_advice = "check AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and that the S3 server is up"
    else:
        endpoint = _get(env, "STORAGE_EMULATOR_HOST")
        where = endpoint or "Google Cloud Storage"
        endpoint_advice = "check STORAGE_EMULATOR_HOST and that the server is up, or the network to GCS"
    if "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper or re.search(r"BUCKET '.*' NOT FOUND", upper):
        return f"bucket {bucket!r} does not exist at {where}", "create it, or fix the bucket name"
    if any(m in upper for m in ("NETWORK_CONNECTION", "CURLCODE", "CURL ERROR", "UNAVAILABLE", "COULD NOT CONNECT")):
        detail = "timed out" if ("TIMEOUT" in upper or "TIMED OUT" in upper or "TOO SLOW" in upper) else "no connection"
        return f"cannot reach {where} ({detail})", endpoint_advice
    if any(m in upper for m in ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "UNAUTHENTICATED", "CREDENTIAL")):
        credentials = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE" if kind == "s3" else "the credentials"
        return "the credentials were rejected", f"check {credentials}"
    if any(m in upper for m in ("ACCESS_DENIED", "ACCESSDENIED", "PERMISSION_DENIED", "FORBIDDEN", " 403")):
        return "access denied", "check the credentials and the bucket's policy (write, read and delete are needed)"
    if "NOT_FOUND" in upper and bucket.upper() in upper:
        return f"bucket {bucket!r} does not exist at {where}", "create it, or fix the bucket name"
    return _one_line(message), "check the location, the credentials and the endpoint"


def explain_failure(
    exc: BaseException, fs: pyarrow.fs.FileSystem, path: str, env: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """A short cause and what to do about ``exc``, raised by ``fs`` on ``path`` (for one-line errors)."""
    kind = fs.type_name if fs.type_name in ("local", "s3") else "gcs" if fs.type_name == "gcs" else "other"
    if kind == "other":
        return _one_line(str(exc)), "check the location and its credentials"
    return _explain(exc, kind, path, _env(env))


def check_storage(
    location: str | os.PathLike[str], timeout_s: float = 15, *, env: Mapping[str, str] | None = None
) -> None:
    """Check that ``location`` is reachable and writable, within ``timeout_s`` seconds.

    Creates the directory (local paths), writes a small probe object under it, reads it back and deletes it. The
    probe runs in a daemon thread: a blackholed endpoint is reported after ``timeout_s`` while the thread finishes
    (and still deletes the probe) on its own, within the filesystem's own timeouts.

    Args:
        location: A ``run.storage`` value (see ``resolve_filesystem``).
        timeout_s: The deadline, in seconds.
        env: The environment to configure S3/GCS from; ``os.environ`` when None.

    Raises:
        ValueError: One line ``run.storage '<location>' is not writable: <cause>; <what to do>``.
    """
    location = os.fspath(location)
    environ = _env(env)
    try:
        fs, path = resolve_filesystem(location, env=environ)
    except StorageLocationError as exc:
        raise _not_writable(location, exc.cause, exc.advice) from None
    except ValueError as exc:
        raise _not_writable(location, _one_line(str(exc)), "fix the environment variable") from None
    outcome: dict[str, BaseException] = {}
    done = threading.Event()

    def run() -> None:
        try:
            _probe(fs, path)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="flora-ray-storage-probe", daemon=True).start()
    if not done.wait(timeout_s):
        kind = fs.type_name
        if kind == "local":
            where, advice = "the filesystem", "check the mount (a hung network filesystem?)"
        elif kind == "s3":
            where = s3_endpoint(environ) or "the AWS S3 endpoint"
            advice = "check AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and the network"
        else:
            where = _get(environ, "STORAGE_EMULATOR_HOST") or "Google Cloud Storage"
            advice = "check STORAGE_EMULATOR_HOST and the network"
        raise _not_writable(location, f"no answer from {where} within {timeout_s:g} s", advice)
    error = outcome.get("error")
    if error is not None:
        cause, advice = _explain(error, fs.type_name, path, environ)
        raise _not_writable(location, cause, advice) from error
