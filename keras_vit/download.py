"""Verified, cached, atomic downloads of the official checkpoint files.

Where files go:
    $KERAS_VIT_CACHE, else $KERAS_HOME/keras_vit (KERAS_HOME defaults to
    ~/.keras, as in Keras). A file keeps its official relative path, e.g.
    imagenet21k/ViT-B_16.npz, so same-named files of different folders
    never collide.

Where files come from:
    $KERAS_VIT_BASE_URL, else the official bucket
    https://storage.googleapis.com/vit_models/ . Point it at a mirror (or at
    a local HTTP server, as the tests do) holding the same relative paths.

Guarantees:
    * Atomic: a download goes to a temporary file in the cache folder and is
      moved into place (os.replace) only once complete and verified, so an
      interrupted or failed download never leaves a file that a later run
      takes for good.
    * Verified: the SHA-256 is checked against, in order of precedence, the
      hash the caller passes (expected_sha256), the registry's hash, or the
      hash recorded beside the file (NAME.sha256) at its first download;
      every later load checks it again. The archive is also checked whole
      (every member's CRC) before it enters the cache.
    * Safe with several processes: an exclusive lock file (NAME.lock, fcntl)
      serialises them, so two processes fetching the same file end with one
      good file, downloaded once.
    * Offline: a cached file is used without any network request.

This module needs only the standard library, numpy and tqdm (no Keras), so it
can be used, and tested, on its own.
"""

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile

OFFICIAL_BASE_URL = "https://storage.googleapis.com/vit_models/"
BASE_URL_ENV = "KERAS_VIT_BASE_URL"
CACHE_ENV = "KERAS_VIT_CACHE"
HASH_SUFFIX = ".sha256"
LOCK_SUFFIX = ".lock"
CHUNK_SIZE = 1 << 20
TIMEOUT_SECONDS = 60


class DownloadError(OSError):
    """The file could not be fetched (HTTP error, network down, cut short)."""


def cache_dir():
    """The checkpoint cache folder (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return os.path.expanduser(os.environ[CACHE_ENV])
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(keras_home, "keras_vit")


def base_url():
    url = os.environ.get(BASE_URL_ENV) or OFFICIAL_BASE_URL
    return url if url.endswith("/") else url + "/"


def url_for(relative_path):
    # quote: "imagenet21k+imagenet2012" must reach the server as a literal "+".
    return base_url() + urllib.parse.quote(relative_path, safe="/")


def cached_path(relative_path):
    return os.path.join(cache_dir(), *relative_path.split("/"))


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path, expected):
    """Raises ValueError when the file's SHA-256 is not `expected`."""
    actual = sha256_of(path)
    if actual != expected.lower():
        raise ValueError(
            f"{path} has SHA-256 {actual}, expected {expected.lower()}: the file is not the "
            "expected checkpoint (download it again, or pass the right expected_sha256)."
        )


def remove_cached(relative_path):
    """Deletes a cached file and the hash recorded for it (missing is fine)."""
    path = cached_path(relative_path)
    for name in (path, path + HASH_SUFFIX):
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


def fetch(relative_path, sha256=None, expected_sha256=None, progress=True):
    """Returns the path of a verified local copy of `relative_path`, downloading it once.

    Args:
        relative_path: path under the base URL, e.g. "imagenet21k/ViT-B_16.npz".
        sha256: the registry's hash of the file, or None when unknown.
        expected_sha256: a hash the caller requires; wins over `sha256`.
        progress: show a progress bar while downloading.
    """
    path = cached_path(relative_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _exclusive_lock(path + LOCK_SUFFIX):
        if os.path.exists(path):
            _verify_cached(path, sha256, expected_sha256)
            return path
        _download(url_for(relative_path), path, expected_sha256 or sha256, progress)
    return path


def _verify_cached(path, sha256, expected_sha256):
    """Checks a cached file; removes it when it no longer matches its reference hash."""
    actual = sha256_of(path)
    recorded = _read_hash(path + HASH_SUFFIX)
    reference = sha256 or recorded
    if reference is not None and actual != reference:
        for name in (path, path + HASH_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(name)
        raise ValueError(
            f"Cached checkpoint {path} is corrupt (SHA-256 {actual}, expected {reference}); "
            "it was removed from the cache: run again to download it again."
        )
    if expected_sha256 is not None and actual != expected_sha256.lower():
        raise ValueError(
            f"Cached checkpoint {path} has SHA-256 {actual}, not the expected_sha256 "
            f"{expected_sha256.lower()} (it matches the hash recorded at download, so it was "
            "kept): check the expected hash."
        )
    if recorded is None:  # placed in the cache by hand: remember what it was
        _write_hash(path + HASH_SUFFIX, actual)


def _download(url, path, expected, progress):
    folder, name = os.path.split(path)
    descriptor, partial = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as out:
            actual = _stream(url, out, name, progress)
        if expected is not None and actual != expected.lower():
            raise ValueError(
                f"Downloaded {url} has SHA-256 {actual}, expected {expected.lower()}: nothing was "
                "cached. If the file changed upstream, pass expected_sha256 to accept it."
            )
        _check_archive(partial, url)
        _write_hash(path + HASH_SUFFIX, actual)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


def _stream(url, out, name, progress):
    """Writes the body of `url` to `out`; returns its SHA-256."""
    import tqdm

    digest = hashlib.sha256()
    try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as error:
        raise DownloadError(f"Cannot download {url}: HTTP {error.code} {error.reason}.") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(
            f"Cannot download {url}: {reason}. Check the network, set {BASE_URL_ENV} to a "
            "mirror, or pass the path of a local .npz file."
        ) from None
    with response:
        total = response.headers.get("Content-Length")
        total = int(total) if total is not None else None
        received = 0
        with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK_SIZE)
                except (OSError, ValueError, http.client.HTTPException) as error:  # IncompleteRead, reset
                    raise DownloadError(f"Download of {url} failed after {received} bytes: {error}.") from None
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise DownloadError(
            f"Download of {url} was cut short ({received} of {total} bytes): nothing was cached; "
            "run again to retry."
        )
    return digest.hexdigest()


def _check_archive(path, url):
    """The whole archive must read back (CRC of every member): never cache a bad file."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        bad_member = f"({error})"
    if bad_member is not None:
        raise ValueError(
            f"Downloaded {url} is not a valid .npz archive (truncated or corrupt at {bad_member}): "
            "nothing was cached; run again to retry."
        )


def _read_hash(path):
    try:
        with open(path, encoding="ascii") as file:
            return file.read().split()[0].lower()
    except (FileNotFoundError, IndexError):
        return None


def _write_hash(path, value):
    folder, name = os.path.split(path)
    descriptor, partial = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=folder)
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(value + "\n")
    os.replace(partial, path)


@contextlib.contextmanager
def _exclusive_lock(lock_path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, downloads stay atomic
        yield
        return
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
