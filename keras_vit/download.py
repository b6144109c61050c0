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
      hash the caller passes (expected_sha256), a hash the caller accepted
      before, the registry's hash, or the hash recorded beside the file
      (NAME.sha256) at its first download; every later load checks it again.
      A file accepted with expected_sha256 (say, one that changed upstream)
      has that hash recorded as accepted, so later loads without it keep
      using the file instead of calling it corrupt. The archive is also
      checked whole (every member's CRC) before it enters the cache.
    * Safe with several processes: an exclusive lock file (NAME.lock, fcntl)
      serialises writers, so two processes fetching the same file end with
      one good file, downloaded once; a process that has to wait says so.
      Temporary files left by a killed process are removed by the next one.
    * Offline and read-only: a cached, verified file is used without any
      network request and without writing anything (no lock either), so a
      shared read-only cache (a cluster's model store, a container image)
      works. Files are created with the permissions the umask allows, as
      any other file, so a cache can be shared.

This module needs only the standard library, numpy and tqdm (no Keras), so it
can be used, and tested, on its own.
"""

import contextlib
import errno
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from typing import NamedTuple, Optional

OFFICIAL_BASE_URL = "https://storage.googleapis.com/vit_models/"
BASE_URL_ENV = "KERAS_VIT_BASE_URL"
CACHE_ENV = "KERAS_VIT_CACHE"
HASH_SUFFIX = ".sha256"
LOCK_SUFFIX = ".lock"
PARTIAL_SUFFIX = ".part"
ACCEPTED = "accepted"  # the record's second word for a hash the caller accepted (expected_sha256)
CHUNK_SIZE = 1 << 20
TIMEOUT_SECONDS = 60


class DownloadError(OSError):
    """The file could not be fetched (HTTP error, network down, cut short)."""


class ReadOnlyCacheError(OSError):
    """The cache cannot be written, and the file needs a write (a download, a removal)."""


# What a read-only cache (a read-only mount, or a folder without write permission) raises.
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def open_url(url, timeout):
    """`urllib.request.urlopen` through the proxies the environment names now:
    urlopen's shared opener keeps the proxies of its first call in the process,
    so a proxy set and unset before (a test, a notebook cell) would stay."""
    return urllib.request.build_opener().open(url, timeout=timeout)


def cache_dir():
    """The checkpoint cache folder (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return os.path.expanduser(os.environ[CACHE_ENV])
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(keras_home, "keras_vit")


def base_url():
    url = os.environ.get(BASE_URL_ENV) or OFFICIAL_BASE_URL
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https", "file") or (parts.scheme != "file" and not parts.netloc):
        raise DownloadError(
            f"{BASE_URL_ENV}={url!r} is not a URL: set it to a mirror such as https://host/vit_models/ "
            "(or file:///path/to/mirror/), or unset it for the official storage."
        )
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
            "expected checkpoint (download it again, or pass the right expected_sha256; keras-vit: --sha256)."
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
        expected_sha256: a hash the caller requires; wins over `sha256`, and a
            cached file that has it is used from then on without it.
        progress: show a progress bar while downloading, and say so while
            waiting for another process.
    """
    path = cached_path(relative_path)
    if os.path.isfile(path):
        verdict = _judge(path, sha256_of(path), sha256, expected_sha256)
        if verdict.action == "use" and verdict.record is None:
            return path  # verified without writing: a read-only cache serves it
        if verdict.action == "refuse":
            raise ValueError(verdict.message)
    try:  # the first write: a cache that cannot be written ends here
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock_file = open(path + LOCK_SUFFIX, "a")
    except OSError as error:
        if error.errno not in _READ_ONLY_ERRNOS:
            raise
        return _read_only(relative_path, path, sha256, expected_sha256, error)
    with lock_file, _exclusive_lock(lock_file, relative_path, progress) as locked:
        if locked:  # every temporary file is written under the lock: any left is a killed process's
            _remove_partials(path)
        if os.path.exists(path):
            _apply(path, _judge(path, sha256_of(path), sha256, expected_sha256))
            return path
        accepted = expected_sha256 is not None and sha256 not in (None, expected_sha256.lower())
        _download(url_for(relative_path), path, expected_sha256 or sha256, progress, accepted)
    return path


class _Verdict(NamedTuple):
    """What to do with a cached file: "use" it (writing `record` beside it
    first when not None), remove it as "corrupt", or "refuse" it (kept)."""

    action: str
    message: Optional[str] = None
    record: Optional[str] = None


def _judge(path, actual, sha256, expected_sha256):
    """The verdict on cached file `path` with SHA-256 `actual` (writes nothing)."""
    recorded, accepted = _read_hash(path + HASH_SUFFIX)
    # The hash the file must have unless the caller says otherwise: one the
    # caller accepted before, else the registry's, else the one recorded at download.
    reference = recorded if accepted else (sha256 or recorded)
    if expected_sha256 is not None:
        expected = expected_sha256.lower()
        if actual == expected:
            if reference == actual and recorded == actual:
                return _Verdict("use")
            # Accepted: later loads without expected_sha256 must check this hash, not the registry's.
            return _Verdict("use", record=actual + (f" {ACCEPTED}" if sha256 not in (None, actual) else ""))
        if reference is None or actual == reference:
            why = "nothing records another hash for it" if reference is None else "it matches the hash recorded for it"
            return _Verdict("refuse", (
                f"Cached checkpoint {path} has SHA-256 {actual}, not the expected_sha256 {expected} ({why}, so it "
                "was kept): check the expected hash."
            ))
    elif reference is None or actual == reference:
        return _Verdict("use", record=None if recorded == actual else actual)  # placed by hand: remember it
    return _Verdict("corrupt", f"Cached checkpoint {path} is corrupt (SHA-256 {actual}, expected {reference})")


def _apply(path, verdict):
    """Carries out a verdict on a cached file (under the lock)."""
    if verdict.action == "refuse":
        raise ValueError(verdict.message)
    if verdict.action == "corrupt":
        for name in (path, path + HASH_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(name)
        raise ValueError(f"{verdict.message}; it was removed from the cache: run again to download it again.")
    if verdict.record is not None:
        _write_hash(path + HASH_SUFFIX, verdict.record)


def _read_only(relative_path, path, sha256, expected_sha256, error):
    """`fetch` in a cache it cannot write: a good file is used as it is (its
    hash unrecorded), anything that needs a write is one clear error."""
    where = f"The checkpoint cache {cache_dir()} is read-only ({error.strerror})"
    if os.path.isfile(path):
        verdict = _judge(path, sha256_of(path), sha256, expected_sha256)
        if verdict.action == "use":
            return path
        raise ReadOnlyCacheError(
            f"{verdict.message}. {where}, so it stays there: replace it (and its {HASH_SUFFIX}) with a good copy, "
            f"or set {CACHE_ENV} to a writable folder."
        )
    raise ReadOnlyCacheError(
        f"{where} and does not hold {relative_path}: set {CACHE_ENV} to a writable folder to download it, "
        "or put the file there (with its .sha256)."
    )


def _remove_partials(path):
    """Removes the temporary files of `path` (and of its hash) that a killed process left."""
    folder, name = os.path.split(path)
    for entry in os.listdir(folder):
        if entry.startswith(name + ".") and entry.endswith(PARTIAL_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, entry))


def _create_partial(path):
    """A new temporary file beside `path`: (open binary file, its path). Created
    as any file is (mode 0666 less the umask), unlike tempfile's private 0600,
    so that what is moved into a shared cache can be read by its other users."""
    folder, name = os.path.split(path)
    while True:
        partial = os.path.join(folder, f"{name}.{os.urandom(6).hex()}{PARTIAL_SUFFIX}")
        try:
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        return os.fdopen(descriptor, "wb"), partial


def _download(url, path, expected, progress, accepted=False):
    out, partial = _create_partial(path)
    try:
        with out:
            actual = _stream(url, out, os.path.basename(path), progress)
        if expected is not None and actual != expected.lower():
            raise ValueError(
                f"Downloaded {url} has SHA-256 {actual}, expected {expected.lower()}: nothing was "
                "cached. If the file changed upstream, pass expected_sha256 (keras-vit: --sha256) to accept it."
            )
        _check_archive(partial, url)
        _write_hash(path + HASH_SUFFIX, actual + (f" {ACCEPTED}" if accepted else ""))
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


def _stream(url, out, name, progress):
    """Writes the body of `url` to `out`; returns its SHA-256."""
    import tqdm

    digest = hashlib.sha256()
    try:
        response = open_url(url, TIMEOUT_SECONDS)
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
    """(the hash recorded in `path`, whether the caller accepted it), (None, False) without one."""
    try:
        with open(path, encoding="ascii") as file:
            words = file.read().split()
    except FileNotFoundError:
        return None, False
    if not words:
        return None, False
    return words[0].lower(), words[1:2] == [ACCEPTED]


def _write_hash(path, value):
    out, partial = _create_partial(path)
    with out:
        out.write((value + "\n").encode("ascii"))
    os.replace(partial, path)


@contextlib.contextmanager
def _exclusive_lock(lock_file, relative_path, progress):
    """Holds the open `lock_file` exclusively (fcntl.flock); gives True, or
    False where there is no fcntl (not POSIX: downloads stay atomic, not
    serialised). A process that has to wait says so on stderr (with `progress`)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if progress:
            print(f"keras_vit: waiting for another process to finish {relative_path} (lock {lock_file.name})",
                  file=sys.stderr, flush=True)
        fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
        yield True
    finally:
        fcntl.flock(lock_file, fcntl.LOCK_UN)
