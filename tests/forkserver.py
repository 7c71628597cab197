"""The tests' CLI runs (`python -m experiments.X ...`) as children forked from an interpreter that has already
imported JAX, Flax, Orbax, SciPy and matplotlib, instead of new interpreters that each import them again.

A CLI child is still a real process: its own pid (signals reach it; SIGTERM and SIGKILL tests work), its own
stdin/stdout/stderr (the caller's file descriptors, passed over a Unix socket), cwd, environment and argv, its exit
status (negative for a signal, as `subprocess` reports it), and CPython's exit sequence (non-daemon threads joined,
atexit handlers run, stdio flushed; only the module teardown is skipped). What it skips is the imports, about a
second of CPU that each of the suite's ~140 CLI runs paid (RESULTS.md, issue 14). The server never initialises a
JAX backend, so each child reads its own `XLA_FLAGS` (device count) when its backend starts.

Environment variables that the preloaded libraries read at import (`JAX_*`, `TF_*`, thread counts...) are fixed
in the server, so each distinct set of them gets its own server. Only third-party libraries are preloaded:
saejax's own import graph runs in every child. `SAEJAX_TEST_FORKSERVER=0` runs everything as plain subprocesses.

`run` and `Popen` take `subprocess`'s arguments and fall back to `subprocess` for anything else (another
program, `stdout=PIPE`, `input=`).

The server is this file run as `python -m tests.forkserver SOCKET`, one per test process and environment; it
exits when the test process that started it does.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The heavy third-party imports of the CLIs (about 1 s of CPU per CLI start on this suite's machines).
PRELOAD = (
  'numpy',
  'jax',
  'jax.numpy',
  'flax.linen',
  'optax',
  'orbax.checkpoint',
  'ml_collections.config_flags',
  'absl.app',
  'safetensors.numpy',
  'tqdm.auto',
  'etils.epath',
  'scipy.optimize',
  'scipy.stats',
  'scipy.sparse',
  'lapjv',
  'matplotlib.pyplot',
)
# Variables read when those modules are imported: a child whose values differ needs a server started with them.
_IMPORT_TIME_ENV = ('JAX_', 'XLA_PYTHON_CLIENT_', 'TF_', 'PYTHON', 'OPENBLAS_', 'OMP_', 'MKL_', 'MPL', 'NPY_', 'LD_')
_MAX_REQUEST = 1 << 20


# --- the client side (the test process) ---


def _signature(env) -> tuple:
  return tuple(sorted((k, v) for k, v in env.items() if k.startswith(_IMPORT_TIME_ENV)))


class _Server:
  def __init__(self, env):
    self.folder = tempfile.mkdtemp(prefix='saejax-forkserver-')
    self.path = os.path.join(self.folder, 'socket')
    self.log = open(os.path.join(self.folder, 'server.log'), 'w')  # noqa: SIM115 - lives as long as the server
    command = [sys.executable, '-m', 'tests.forkserver', self.path]
    self.process = subprocess.Popen(
      command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log
    )
    atexit.register(self.close)

  def close(self) -> None:
    self.process.kill()
    self.process.wait()
    self.log.close()
    shutil.rmtree(self.folder, ignore_errors=True)

  def connect(self) -> socket.socket:
    deadline = time.monotonic() + 120
    while True:
      sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
      try:
        sock.connect(self.path)
        return sock
      except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        if self.process.poll() is not None or time.monotonic() > deadline:
          with open(self.log.name) as log:
            raise RuntimeError(f'the test fork server did not start: {log.read()[-2000:]}') from None
        time.sleep(0.02)


_servers: dict[tuple, _Server] = {}


def _module_of(command) -> tuple[str, list[str]] | None:
  """('experiments.train', [args]) for `[sys.executable, '-m', module, *args]`, else None."""
  if not isinstance(command, (list, tuple)) or len(command) < 3:
    return None
  if os.fspath(command[0]) != sys.executable or command[1] != '-m':
    return None
  return str(command[2]), [os.fspath(arg) for arg in command[3:]]


def _enabled() -> bool:
  return os.environ.get('SAEJAX_TEST_FORKSERVER', '1') != '0'


def _fd(stream, default: int) -> int:
  if stream is None:
    return default
  return stream if isinstance(stream, int) else stream.fileno()


class Popen:
  """A forked CLI child with the parts of `subprocess.Popen` the tests use: pid, poll, wait, send_signal, kill."""

  def __init__(self, command, *, cwd=None, env=None, stdout=None, stderr=None, text=None):
    del text  # the caller's files decide; there are no pipes to decode
    module, args = _module_of(command)
    env = dict(os.environ if env is None else env)
    signature = _signature(env)
    if signature not in _servers:
      _servers[signature] = _Server(env)
    self.args, self.returncode = command, None
    opened = []  # the /dev/null descriptors this call opens, closed once the server holds its own copies

    def null(flags):
      opened.append(os.open(os.devnull, flags))
      return opened[-1]

    out = _fd(stdout, sys.stdout.fileno())
    err = out if stderr == subprocess.STDOUT else _fd(stderr, sys.stderr.fileno())
    fds = [null(os.O_RDONLY)] + [null(os.O_WRONLY) if fd == subprocess.DEVNULL else fd for fd in (out, err)]
    request = {'module': module, 'args': args, 'cwd': os.fspath(cwd or os.getcwd()), 'env': env}
    try:
      self._sock = _servers[signature].connect()
      socket.send_fds(self._sock, [json.dumps(request).encode()], fds)
    finally:
      for fd in opened:
        os.close(fd)
    self.pid = int(self._sock.recv(64))

  def _status(self, timeout) -> int | None:
    if self.returncode is None:
      self._sock.settimeout(timeout)
      try:
        reply = self._sock.recv(64)
      except (TimeoutError, BlockingIOError):
        return None
      if not reply:
        raise RuntimeError(f'the test fork server lost child {self.pid} ({self.args[2]})')
      self.returncode = int(reply)
      self._sock.close()
    return self.returncode

  def poll(self) -> int | None:
    return self._status(0.0)

  def wait(self, timeout: float | None = None) -> int:
    code = self._status(timeout)
    if code is None:
      raise subprocess.TimeoutExpired(self.args, timeout)
    return code

  def send_signal(self, sig: int) -> None:
    if self.poll() is None:
      os.kill(self.pid, sig)

  def terminate(self) -> None:
    self.send_signal(signal.SIGTERM)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)


def popen(command, **kwargs):
  """`subprocess.Popen(command, **kwargs)`, forked from the server where the command is a `python -m` CLI."""
  supported = set(kwargs) <= {'cwd', 'env', 'stdout', 'stderr', 'text'}
  pipes = subprocess.PIPE in (kwargs.get('stdout'), kwargs.get('stderr'))
  if not (_enabled() and supported and not pipes and _module_of(command)):
    return subprocess.Popen(command, **kwargs)
  return Popen(command, **kwargs)


def run(command, *, cwd=None, env=None, capture_output=False, text=None, timeout=None, **kwargs):
  """`subprocess.run(...)`, forked from the server where the command is a `python -m` CLI."""
  if kwargs or not (_enabled() and _module_of(command)):
    return subprocess.run(
      command, cwd=cwd, env=env, capture_output=capture_output, text=text, timeout=timeout, **kwargs
    )
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    streams = {'stdout': out, 'stderr': err} if capture_output else {}
    child = Popen(command, cwd=cwd, env=env, **streams)
    try:
      child.wait(timeout)
    except subprocess.TimeoutExpired:
      child.kill()
      child.wait()
      raise
    if not capture_output:
      return subprocess.CompletedProcess(command, child.returncode)
    captured = []
    for stream in (out, err):
      stream.seek(0)
      data = stream.read()
      captured.append(data.decode() if text else data)
    return subprocess.CompletedProcess(command, child.returncode, *captured)


# --- the server ---


def _serve(path: str) -> None:
  """Accepts requests until the test process that started it exits."""
  for name in PRELOAD:
    __import__(name)
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
  listener.bind(path + '.tmp')
  listener.listen(64)
  os.rename(path + '.tmp', path)  # clients connect only once the imports are done
  parent = os.getppid()
  wake_r, wake_w = os.pipe()
  os.set_blocking(wake_r, False)
  os.set_blocking(wake_w, False)
  signal.set_wakeup_fd(wake_w)
  signal.signal(signal.SIGCHLD, lambda *_: None)
  selector = selectors.DefaultSelector()
  selector.register(listener, selectors.EVENT_READ)
  selector.register(wake_r, selectors.EVENT_READ)
  children: dict[int, socket.socket] = {}
  while os.getppid() == parent:
    for key, _ in selector.select(timeout=1.0):
      if key.fileobj is listener:
        conn, _ = listener.accept()
        message, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
          signal.set_wakeup_fd(-1)
          signal.signal(signal.SIGCHLD, signal.SIG_DFL)
          selector.close()
          for sock in (listener, conn, *children.values()):
            sock.close()
          os.close(wake_r)
          os.close(wake_w)
          _child(json.loads(message), fds)  # does not return
        for fd in fds:
          os.close(fd)
        conn.send(str(pid).encode())
        children[pid] = conn
      else:
        while True:
          try:
            if not os.read(wake_r, 512):
              break
          except BlockingIOError:
            break
    while children:
      pid, status = os.waitpid(-1, os.WNOHANG)
      if pid == 0:
        break
      conn = children.pop(pid)
      with contextlib.suppress(OSError):  # the test process may have stopped waiting
        conn.send(str(os.waitstatus_to_exitcode(status)).encode())
      conn.close()
  for pid in children:  # the test process is gone
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGKILL)


def _child(request: dict, fds: list[int]) -> None:
  """Becomes `python -m module args` with the request's files, cwd and environment, and exits as it would."""
  for target, fd in enumerate(fds):
    os.dup2(fd, target)
  for fd in set(fds):
    if fd > 2:
      os.close(fd)
  os.chdir(request['cwd'])
  sys.path[0] = os.getcwd()  # what `python -m` puts first
  os.environ.clear()
  os.environ.update(request['env'])
  sys.argv = [request['module'], *request['args']]
  import runpy

  try:
    runpy.run_module(request['module'], run_name='__main__', alter_sys=True)
    code = 0
  except SystemExit as exit_:
    code = _exit_code(exit_.code)
  except KeyboardInterrupt:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as CPython does: die of the signal
    os.kill(os.getpid(), signal.SIGINT)
    code = 128 + signal.SIGINT
  except BaseException:
    sys.excepthook(*sys.exc_info())
    code = 1
  _shutdown(code)


def _exit_code(code) -> int:
  """The status CPython exits with for `SystemExit(code)`."""
  if code is None:
    return 0
  if isinstance(code, int):
    return code & 0xFF
  print(code, file=sys.stderr)
  return 1


def _shutdown(code: int) -> None:
  """CPython's exit up to the module teardown: join the non-daemon threads, run atexit, flush stdio. The teardown
  itself is skipped: in a child of the preloaded server it walks every object of JAX, SciPy and matplotlib
  (0.5 s of copy-on-write page faults per child), and a real run's output does not depend on it."""
  import threading

  threading._shutdown()  # noqa: SLF001 - what Py_FinalizeEx calls first
  atexit._run_exitfuncs()  # noqa: SLF001
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  os._exit(code)


if __name__ == '__main__':
  _serve(sys.argv[1])
