"""Downloads over a real HTTP server on 127.0.0.1: cache, hashes, atomicity, locking.

No machine here reaches the official bucket, so a `http.server` in a thread
serves generated checkpoints under the official relative paths, and
KERAS_VIT_BASE_URL points keras_vit at it. The server counts the requests it
gets, so "the second load uses the cache" is checked, not assumed.
"""

import builtins
import contextlib
import errno
import http.server
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import keras
import numpy as np
import pytest

import harness
import keras_vit
from keras_vit import download, pretrained, registry
from keras_vit.testing import official_arrays, write_checkpoint

TINY = dict(patch_size=8, hidden_size=32, depth=2, num_heads=4, mlp_dim=64)
TINY_FILE = "testing/tiny.npz"


class CheckpointServer:
    """Serves files of `root` by relative path; a path's `mode` can make it misbehave:
    "ok", "404", "truncate" (a complete response with half the file), "corrupt"
    (same size, some bytes zeroed) or "cut" (Content-Length of the whole file,
    then the connection closes halfway)."""

    def __init__(self, root, delay=0.0):
        self.root, self.delay = root, delay
        self.modes, self.requests = {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                relative = urllib.parse.unquote(self.path.lstrip("/"))
                server.requests.append(relative)
                mode = server.modes.get(relative, "ok")
                path = os.path.join(server.root, relative)
                if mode == "404" or not os.path.isfile(path):
                    self.send_error(404, "Not Found")
                    return
                data = open(path, "rb").read()
                if mode == "truncate":
                    data = data[: len(data) // 2]
                elif mode == "corrupt":
                    middle = len(data) // 2
                    data = data[:middle] + bytes(64) + data[middle + 64:]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if mode == "cut":
                    data = data[: len(data) // 2]
                step = max(len(data) // 20, 1 << 16)
                for start in range(0, len(data), step):
                    self.wfile.write(data[start: start + step])
                    time.sleep(server.delay)
                if mode == "cut":
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    root = tmp_path / "bucket"
    (root / "testing").mkdir(parents=True)
    write_checkpoint(root / TINY_FILE, official_arrays(**TINY, image_size=32, classes=5))
    server = CheckpointServer(str(root))
    monkeypatch.setenv(download.BASE_URL_ENV, server.url)
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    yield server
    server.stop()


def cache_files():
    found = []
    for folder, _, names in os.walk(download.cache_dir()):
        found += [os.path.relpath(os.path.join(folder, n), download.cache_dir()) for n in names]
    return sorted(n for n in found if not n.endswith(download.LOCK_SUFFIX))


def served_bytes(server, relative=TINY_FILE):
    return open(os.path.join(server.root, relative), "rb").read()


def one_line(excinfo):
    assert "\n" not in str(excinfo.value), str(excinfo.value)
    return str(excinfo.value)


def test_cache_location_follows_keras_home(monkeypatch, tmp_path):
    monkeypatch.delenv(download.CACHE_ENV, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert download.cache_dir() == str(tmp_path / "kh" / "keras_vit")
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "mine"))
    assert download.cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv(download.BASE_URL_ENV, raising=False)
    assert download.url_for("imagenet21k+imagenet2012/ViT-B_16.npz") == (
        "https://storage.googleapis.com/vit_models/imagenet21k%2Bimagenet2012/ViT-B_16.npz")
    monkeypatch.setenv(download.BASE_URL_ENV, "file:///srv/vit_models")
    assert download.url_for("a.npz") == "file:///srv/vit_models/a.npz"
    for not_a_url in ("not-a-url", "/srv/vit_models", "http:///vit_models", "ftp://host/"):
        monkeypatch.setenv(download.BASE_URL_ENV, not_a_url)
        with pytest.raises(download.DownloadError) as excinfo:
            download.url_for("a.npz")
        assert f"{download.BASE_URL_ENV}={not_a_url!r} is not a URL" in one_line(excinfo)


def test_second_fetch_uses_the_cache(server):
    path = download.fetch(TINY_FILE, progress=False)
    assert server.requests == [TINY_FILE]
    assert open(path, "rb").read() == served_bytes(server)
    recorded = open(path + download.HASH_SUFFIX).read().strip()
    assert recorded == download.sha256_of(path)  # unknown hash: recorded at first download
    assert download.fetch(TINY_FILE, progress=False) == path
    assert server.requests == [TINY_FILE], "no request when the file is cached"
    assert cache_files() == ["testing/tiny.npz", "testing/tiny.npz.sha256"]


def test_hash_mismatch_caches_nothing(server):
    with pytest.raises(ValueError) as excinfo:
        download.fetch(TINY_FILE, sha256="ab" * 32, progress=False)
    message = one_line(excinfo)
    assert server.url + TINY_FILE in message and "ab" * 32 in message and "nothing was cached" in message
    assert cache_files() == []
    good = download.sha256_of(os.path.join(server.root, TINY_FILE))
    # the caller's hash wins over a wrong registry hash, and over a right one
    download.fetch(TINY_FILE, sha256="ab" * 32, expected_sha256=good, progress=False)
    with pytest.raises(ValueError, match="expected_sha256"):
        download.fetch(TINY_FILE, sha256=good, expected_sha256="cd" * 32, progress=False)
    assert cache_files() == ["testing/tiny.npz", "testing/tiny.npz.sha256"], "a good file is kept"


@pytest.mark.parametrize("mode", ["truncate", "corrupt", "cut"])
def test_bad_transfer_caches_nothing_and_a_retry_succeeds(server, mode):
    server.modes[TINY_FILE] = mode
    with pytest.raises((ValueError, OSError)) as excinfo:
        download.fetch(TINY_FILE, progress=False)
    message = one_line(excinfo)
    assert TINY_FILE in message and ("run again" in message or "retry" in message), message
    assert cache_files() == []
    server.modes[TINY_FILE] = "ok"
    path = download.fetch(TINY_FILE, progress=False)
    assert open(path, "rb").read() == served_bytes(server)


def test_404_names_the_url(server):
    with pytest.raises(OSError) as excinfo:
        download.fetch("imagenet21k/ViT-Q_16.npz", progress=False)
    assert f"{server.url}imagenet21k/ViT-Q_16.npz" in one_line(excinfo) and "404" in str(excinfo.value)
    assert cache_files() == []


def test_each_download_uses_the_proxies_of_the_moment(server, monkeypatch):
    """urllib.request.urlopen keeps the proxies of its first call in the process:
    a proxy set once (here, one where nothing listens) must not outlive its setting."""
    with monkeypatch.context() as env:
        harness.refuse_proxies(env)
        with pytest.raises(download.DownloadError, match="Connection refused"):
            download.fetch(TINY_FILE, progress=False)
    assert server.requests == [] and cache_files() == []
    path = download.fetch(TINY_FILE, progress=False)  # the proxy is unset again
    assert server.requests == [TINY_FILE] and open(path, "rb").read() == served_bytes(server)


def test_cached_file_damaged_later_is_removed_and_fetched_again(server):
    path = download.fetch(TINY_FILE, progress=False)
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError) as excinfo:
        download.fetch(TINY_FILE, progress=False)
    assert path in one_line(excinfo) and "removed" in str(excinfo.value)
    assert cache_files() == []
    download.fetch(TINY_FILE, progress=False)
    assert server.requests == [TINY_FILE, TINY_FILE]


def test_unreadable_cached_checkpoint_is_removed_by_the_loader(server):
    """A file whose hash matches its record but does not read as .npz (say, cached by
    an older version) is removed so that the next run downloads it again."""
    entry = registry.Checkpoint(tag="test", architecture="vit", file=TINY_FILE, resolution=32,
                                   classes=5, labels="imagenet1k")
    path = download.cached_path(TINY_FILE)
    os.makedirs(os.path.dirname(path))
    open(path, "wb").write(served_bytes(server)[:300])
    model = keras_vit.ViT(**TINY, input_shape=(32, 32, 3), classes=5)
    with pytest.raises(ValueError) as excinfo:
        pretrained.load_registered(model, entry, progress=False)
    assert path in one_line(excinfo) and "removed from the cache" in str(excinfo.value)
    assert cache_files() == []
    pretrained.load_registered(model, entry, progress=False)
    assert server.requests == [TINY_FILE]


FETCH_IN_SUBPROCESS = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("kv_download", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(module.fetch(sys.argv[2], progress=False))
"""


def test_two_processes_end_with_one_good_file(server):
    server.delay = 0.05  # ~1 s per transfer: the two processes overlap
    module_file = download.__file__  # loaded alone: no Keras import in the children
    env = dict(os.environ)
    children = [subprocess.Popen([sys.executable, "-c", FETCH_IN_SUBPROCESS, module_file, TINY_FILE],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                for _ in range(2)]
    results = [child.communicate(timeout=120) for child in children]
    assert [child.returncode for child in children] == [0, 0], results
    paths = {out.strip() for out, _ in results}
    assert paths == {download.cached_path(TINY_FILE)}
    assert server.requests == [TINY_FILE], "the second process waited and used the first one's file"
    assert open(paths.pop(), "rb").read() == served_bytes(server)
    assert cache_files() == ["testing/tiny.npz", "testing/tiny.npz.sha256"]


@contextlib.contextmanager
def read_only(folder, monkeypatch):
    """Every write under `folder` fails as on a read-only mount (EROFS). The
    tests run as root, whom chmod does not stop, so the file functions that
    write are wrapped; yields the list of write attempts, which must stay empty
    when nothing needs writing."""
    folder = os.path.realpath(folder)
    attempts = []

    def refuse(path, operation):
        path = os.path.realpath(os.fspath(path))
        if path == folder or path.startswith(folder + os.sep):
            attempts.append((operation, path))
            raise OSError(errno.EROFS, "Read-only file system", path)

    def guard(function, operation, writes=lambda *args, **kwargs: True):
        def guarded(path, *args, **kwargs):
            if isinstance(path, (str, bytes, os.PathLike)) and writes(*args, **kwargs):
                refuse(path, operation)
            return function(path, *args, **kwargs)
        return guarded

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", guard(builtins.open, "open", lambda mode="r", *a, **k: set(mode) & set("wax+")))
        patch.setattr(os, "open", guard(os.open, "os.open", lambda flags, *a, **k: flags & write_flags))
        patch.setattr(os, "makedirs", guard(os.makedirs, "makedirs", lambda *a, **k: True))
        for name in ("mkdir", "remove", "unlink", "replace", "rename", "chmod", "utime"):
            patch.setattr(os, name, guard(getattr(os, name), name))
        yield attempts


def snapshot(folder):
    """{relative path: (size, mtime)} of every file under `folder`."""
    found = {}
    for where, _, names in os.walk(folder):
        for name in names:
            info = os.stat(os.path.join(where, name))
            found[os.path.relpath(os.path.join(where, name), folder)] = (info.st_size, info.st_mtime_ns)
    return found


def test_a_complete_cache_on_a_read_only_mount_is_used_without_writing(server, monkeypatch):
    """A shared read-only cache (a model store, a container image): a verified
    file loads, with no write attempted (no lock file either); what would need
    a write is one line saying the cache is read-only and what to do."""
    path = download.fetch(TINY_FILE, progress=False)
    os.remove(path + download.LOCK_SUFFIX)  # as a cache made elsewhere and copied in: file + .sha256
    before = snapshot(download.cache_dir())
    model = keras_vit.ViT(**TINY, input_shape=(32, 32, 3), classes=5)
    entry = registry.Checkpoint(tag="test", architecture="vit", file=TINY_FILE, resolution=32, classes=5,
                                labels="imagenet1k")
    with read_only(download.cache_dir(), monkeypatch) as attempts:
        assert download.fetch(TINY_FILE, progress=False) == path
        pretrained.load_registered(model, entry, progress=False)
        assert attempts == [] and server.requests == [TINY_FILE]
        with pytest.raises(OSError) as excinfo:
            download.fetch("testing/other.npz", progress=False)
        message = one_line(excinfo)
        assert "read-only (Read-only file system)" in message and download.CACHE_ENV in message
        assert "testing/other.npz" in message
    assert snapshot(download.cache_dir()) == before
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("predictions").kernel),
                                  np.load(path)["head/kernel"])

    # A damaged file in a read-only cache: one line saying it cannot be removed, nothing else.
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with read_only(download.cache_dir(), monkeypatch):
        with pytest.raises(OSError) as excinfo:
            download.fetch(TINY_FILE, progress=False)
    message = one_line(excinfo)
    assert "is corrupt" in message and "read-only" in message and "stays there" in message
    assert os.path.exists(path)


def test_a_real_read_only_mount(server, tmp_path):
    """The same on a real read-only bind mount (EROFS, as the report saw), in a
    child process with its own mount namespace, where this machine allows one."""
    path = download.fetch(TINY_FILE, progress=False)
    os.remove(path + download.LOCK_SUFFIX)
    before = snapshot(download.cache_dir())
    script = tmp_path / "child.py"
    script.write_text(FETCH_IN_SUBPROCESS)
    cache = download.cache_dir()
    mount = f"mount --bind -o ro {cache} {cache}"
    try:
        probe = subprocess.run(["unshare", "--mount", "sh", "-c", f"{mount} && ! touch {cache}/probe 2>/dev/null"],
                               capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("no unshare here")
    if probe.returncode != 0:
        pytest.skip(f"no read-only bind mount here: {probe.stderr.strip()}")
    completed = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"{mount} && {sys.executable} {script} {download.__file__} {TINY_FILE}"],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == path
    assert snapshot(cache) == before


def test_an_accepted_hash_sticks(server, monkeypatch):
    """The registry's hash no longer matches (the file changed upstream): the
    file is refused until the caller accepts its hash, then used from the cache
    without it, instead of being called corrupt and deleted."""
    new = download.sha256_of(os.path.join(server.root, TINY_FILE))
    old = "ab" * 32  # what the registry says
    with pytest.raises(ValueError) as excinfo:
        download.fetch(TINY_FILE, sha256=old, progress=False)
    assert "pass expected_sha256 (keras-vit: --sha256) to accept it" in one_line(excinfo)
    path = download.fetch(TINY_FILE, sha256=old, expected_sha256=new, progress=False)
    assert open(path + download.HASH_SUFFIX).read().split() == [new, download.ACCEPTED]
    assert download.fetch(TINY_FILE, sha256=old, progress=False) == path
    assert download.fetch(TINY_FILE, sha256=old, expected_sha256=new, progress=False) == path
    assert server.requests == [TINY_FILE, TINY_FILE] and cache_files() == [TINY_FILE, TINY_FILE + ".sha256"]
    # Accepting a hash for a file cached before (under the registry's hash) also sticks.
    download.remove_cached(TINY_FILE)
    download.fetch(TINY_FILE, progress=False)
    open(path + download.HASH_SUFFIX, "w").write(new + "\n")
    with pytest.raises(ValueError, match="is corrupt"):
        download.fetch(TINY_FILE, sha256=old, progress=False)  # the registry wins over a plain record
    download.fetch(TINY_FILE, progress=False)
    download.fetch(TINY_FILE, sha256=old, expected_sha256=new, progress=False)
    assert download.fetch(TINY_FILE, sha256=old, progress=False) == path


def test_the_command_line_accepts_a_changed_file_once(tmp_path, monkeypatch, capsys):
    """The report's steps: the registry's hash no longer matches the served
    file; `convert TAG ... --sha256 H` accepts it; then `predict --weights TAG`
    (no --sha256) uses the cached file, also from a read-only cache."""
    from keras_vit import cli

    entry = registry.find_checkpoint("augreg_in21k+in1k", "ViT_Ti16")
    assert entry.sha256 is not None  # a registry hash, which the generated file cannot have
    root = tmp_path / "bucket"
    (root / entry.file).parent.mkdir(parents=True)
    write_checkpoint(root / entry.file, official_arrays(**keras_vit.VARIANTS["Ti/16"], image_size=entry.resolution,
                                                        classes=entry.classes))
    new = download.sha256_of(root / entry.file)
    server = CheckpointServer(str(root))
    monkeypatch.setenv(download.BASE_URL_ENV, server.url)
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    image = os.path.join(os.path.dirname(__file__), "..", "examples", "images", "cat.jpg")
    predict = ["predict", image, "--model", "ViT_Ti16", "--weights", entry.tag, "--top", "1"]
    try:
        assert cli.main(predict) == 2
        assert f"expected {entry.sha256}" in capsys.readouterr().err
        assert cli.main(["convert", entry.tag, str(tmp_path / "ti16.keras"), "--model", "ViT_Ti16",
                         "--sha256", new]) == 0
        assert cli.main(predict) == 0
        with read_only(download.cache_dir(), monkeypatch) as attempts:
            assert cli.main(predict) == 0
        assert attempts == []
    finally:
        server.stop()
    assert server.requests == [entry.file, entry.file]  # the refused download, the accepted one
    assert "1. " in capsys.readouterr().out


def test_cache_files_get_the_umask_permissions(server):
    previous = os.umask(0o022)
    try:
        path = download.fetch(TINY_FILE, progress=False)
    finally:
        os.umask(previous)
    for name in (path, path + download.HASH_SUFFIX):
        assert os.stat(name).st_mode & 0o777 == 0o644, oct(os.stat(name).st_mode)


def test_a_download_killed_with_sigkill_leaves_no_partial_file(server, tmp_path):
    server.delay = 0.2  # a few seconds per transfer: killed half-way
    script = tmp_path / "child.py"
    script.write_text(FETCH_IN_SUBPROCESS)
    child = subprocess.Popen([sys.executable, str(script), download.__file__, TINY_FILE],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = os.path.dirname(download.cached_path(TINY_FILE))
    deadline = time.monotonic() + 60
    while not (os.path.isdir(folder) and any(n.endswith(".part") for n in os.listdir(folder))):
        assert time.monotonic() < deadline and child.poll() is None, "the child never started writing"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert any(name.endswith(download.PARTIAL_SUFFIX) for name in os.listdir(folder))
    server.delay = 0.0
    path = download.fetch(TINY_FILE, progress=False)
    assert sorted(os.listdir(folder)) == sorted(os.path.basename(path) + s for s in ("", ".sha256", ".lock"))
    assert open(path, "rb").read() == served_bytes(server)


def test_a_process_waiting_for_the_lock_says_so(server, tmp_path):
    import fcntl

    path = download.cached_path(TINY_FILE)
    os.makedirs(os.path.dirname(path))
    script = tmp_path / "child.py"
    script.write_text(FETCH_IN_SUBPROCESS.replace("progress=False", "progress=True"))
    with open(path + download.LOCK_SUFFIX, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        child = subprocess.Popen([sys.executable, str(script), download.__file__, TINY_FILE],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = []  # the child's first stderr line, said while it waits (read in a thread: it may say nothing)
        reader = threading.Thread(target=lambda: lines.append(child.stderr.readline()), daemon=True)
        reader.start()
        reader.join(timeout=30)
        fcntl.flock(held, fcntl.LOCK_UN)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0 and out.strip() == path
    assert lines and lines[0].startswith(f"keras_vit: waiting for another process to finish {TINY_FILE} (lock ")


def test_a_cached_file_of_another_architecture_is_removed(server):
    """A wrong file accepted into the cache (its recorded hash matches, so it
    is not "corrupt"): the error says it came from the cache, and it is removed."""
    entry = registry.Checkpoint(tag="test", architecture="ViT_Ti16", file=TINY_FILE, resolution=32, classes=5,
                                labels="imagenet1k")
    download.fetch(TINY_FILE, progress=False)
    model = keras_vit.ViT_Ti16(input_shape=(32, 32, 3), classes=5)
    with pytest.raises(ValueError) as excinfo:
        pretrained.load_registered(model, entry, progress=False)
    message = one_line(excinfo)
    assert f"The cached {TINY_FILE} ({download.cached_path(TINY_FILE)}) is not the ViT_Ti16 checkpoint" in message
    assert "width 32 in the file vs 192 in ViT_Ti16" in message and "removed from the cache" in message
    assert cache_files() == []


def test_cached_file_loads_with_the_server_gone(server):
    first = download.fetch(TINY_FILE, progress=False)
    server.stop()
    assert download.fetch(TINY_FILE, progress=False) == first
    download.remove_cached(TINY_FILE)
    with pytest.raises(OSError, match="Cannot download") as excinfo:
        download.fetch(TINY_FILE, progress=False)
    assert server.url in one_line(excinfo)


# ---------------------------------------------------------------------------
# Acceptance: ViT_B16(weights="in21k") against the loopback server
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def b16_bucket(tmp_path_factory):
    """A random ViT-B/16 in21k checkpoint (21,843 classes, pre_logits 768): ~412 MB,
    written once for this module, under its official relative path."""
    entry = registry.find_checkpoint("in21k", "ViT_B16")
    root = tmp_path_factory.mktemp("b16_bucket")
    path = root / entry.file
    path.parent.mkdir(parents=True)
    write_checkpoint(path, official_arrays(**keras_vit.VARIANTS["B/16"], image_size=224, classes=21843,
                                           representation_size=768, seed=7))
    yield entry, root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def b16_server(b16_bucket, tmp_path, monkeypatch):
    entry, root = b16_bucket
    server = CheckpointServer(str(root))
    monkeypatch.setenv(download.BASE_URL_ENV, server.url)
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    yield entry, server
    server.stop()


def weight(model, path):
    return keras.ops.convert_to_numpy(next(w for w in model.weights if w.path == path))


def stored(server, entry, *keys):
    with np.load(os.path.join(server.root, entry.file), allow_pickle=False) as npz:
        return [npz[key] for key in keys]


def test_vit_b16_in21k_downloads_once_and_builds_the_21843_class_model(b16_server):
    entry, server = b16_server
    model = keras_vit.ViT_B16(weights="in21k")
    assert server.requests == [entry.file]
    assert model.input_shape == (None, 224, 224, 3) and model.output_shape == (None, 21843)
    head, pre_logits, query = stored(server, entry, "head/kernel", "pre_logits/kernel",
                                     "Transformer/encoderblock_11/MultiHeadDotProductAttention_1/query/kernel")
    value = keras.ops.convert_to_numpy
    np.testing.assert_array_equal(value(model.get_layer("predictions").kernel), head)
    np.testing.assert_array_equal(value(model.get_layer("pre_logits").kernel), pre_logits)
    np.testing.assert_array_equal(weight(model, "block_11/attention/query/kernel"), query)
    cached = download.cached_path(entry.file)
    assert open(cached + download.HASH_SUFFIX).read().strip() == download.sha256_of(cached)

    # classes=10: the same cached file (no request), a zero-initialised head on the pretrained body
    keras.backend.clear_session()
    del model
    model = keras_vit.ViT_B16(weights="in21k", classes=10)
    assert server.requests == [entry.file]
    assert model.output_shape == (None, 10)
    head = model.get_layer("predictions")
    assert not value(head.kernel).any() and not value(head.bias).any()
    assert "pre_logits" not in {layer.name for layer in model.layers}  # official fine-tuning drops it
    np.testing.assert_array_equal(weight(model, "block_11/attention/query/kernel"), query)


def test_an_unregistered_augreg_file_loads_by_its_official_name(tmp_path, monkeypatch):
    """Any AugReg file name from the official bucket: architecture, resolution and classes come from the name."""
    name = "Ti_16-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0--cifar100-steps_2k-lr_0.003-res_224"
    assert all(name not in entry.long_names() for entry in registry.registry())
    root = tmp_path / "bucket"
    (root / "augreg").mkdir(parents=True)
    write_checkpoint(root / "augreg" / f"{name}.npz",
                     official_arrays(**keras_vit.VARIANTS["Ti/16"], image_size=224, classes=100, seed=3))
    server = CheckpointServer(str(root))
    monkeypatch.setenv(download.BASE_URL_ENV, server.url)
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    try:
        model = keras_vit.ViT_Ti16(weights=name)
        assert server.requests == [f"augreg/{name}.npz"]
        assert model.input_shape == (None, 224, 224, 3) and model.output_shape == (None, 100)
        with np.load(root / "augreg" / f"{name}.npz") as arrays:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("predictions").kernel),
                                          arrays["head/kernel"])
        with pytest.raises(ValueError, match="is for ViT_Ti16, not ViT_S16") as excinfo:
            keras_vit.ViT_S16(weights=f"augreg/{name}.npz")
        one_line(excinfo)
    finally:
        server.stop()
    with pytest.raises(ValueError, match="fine-tuned on 'kitti'"):
        keras_vit.ViT_Ti16(weights=name.replace("cifar100", "kitti"))
