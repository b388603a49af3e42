"""A local Cloud Storage server for tests of gs:// run directories (no network, no account).

`start()` runs gcp-storage-emulator (in memory) on a free port of 127.0.0.1 and points every
client the trainer uses at it: gcsfs (through etils.epath with EPATH_USE_TF=false, and the
lock's fsspec calls) by STORAGE_EMULATOR_HOST, and tensorstore (orbax's array writer) by
TENSORSTORE_GCS_HTTP_URL. TensorFlow's own GCS filesystem (TensorBoard events) cannot be
pointed at another server, so tests on gs:// replace the TensorBoard writer.

Run as a program (`python -m tests.cloud_storage PORT BUCKET`), it serves the emulator with two
things real Cloud Storage does that it lacks, and that the clients rely on:
  * downloads carry the object's generation (`x-goog-generation`): tensorstore's conditional
    writes (orbax's OCDBT manifest, rewritten when a save commits in several batches) use it;
  * uploads honour `ifGenerationMatch` (412 when the object's generation differs; 0: when it
    exists), which the run lock's exclusive create relies on.
"""

import contextlib
import http
import logging
import os
import socket
import subprocess
import sys
import time

BUCKET = 'unclip-test'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def environment(url: str) -> dict[str, str]:
  return {
      'STORAGE_EMULATOR_HOST': url,
      'TENSORSTORE_GCS_HTTP_URL': url,
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test',   # tensorstore: no credentials lookup
      'EPATH_USE_TF': 'false',                   # epath's gs:// through gcsfs
  }


def start():
  """(server process, its URL); the environment of this process points at it."""
  port = _free_port()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  server = subprocess.Popen([sys.executable, '-m', 'tests.cloud_storage', str(port), BUCKET],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while True:
    with contextlib.suppress(OSError), socket.create_connection(('127.0.0.1', port), 0.2):
      break
    if server.poll() is not None or time.time() > deadline:
      server.kill()
      raise RuntimeError(f'the Cloud Storage emulator did not start on port {port}')
    time.sleep(0.1)
  url = f'http://127.0.0.1:{port}'
  os.environ.update(environment(url))
  # gcsfs and google.auth warn on every new bucket that they found no credentials (the
  # emulator needs none).
  for name in ('gcsfs', 'google.auth'):
    logging.getLogger(name).setLevel(logging.ERROR)
  return server, url


def _serve(port: int, bucket: str):
  # The handlers are wrapped before the server module builds its routing table from them.
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top

  def precondition_failed(request, storage) -> bool:
    wanted = request.query.get('ifGenerationMatch')
    if not wanted:
      return False
    name = request.query.get('name', [None])[0]
    if name is None and isinstance(request.data, dict):   # a multipart upload names it inside
      name = (request.data.get('meta') or {}).get('name')
    try:
      current = storage.get_file_obj(request.params['bucket_name'], name)['generation']
    except NotFound:
      current = '0'
    return str(current) != wanted[0]

  def with_precondition(upload):
    def handler(request, response, storage, *args, **kwargs):
      if 'upload_id' not in request.query and precondition_failed(request, storage):
        response.status = http.HTTPStatus.PRECONDITION_FAILED
        response.json({'error': {'code': 412, 'message': 'conditionNotMet'}})
        return None
      return upload(request, response, storage, *args, **kwargs)
    return handler

  def with_generation(download):
    def handler(request, response, storage, *args, **kwargs):
      download(request, response, storage, *args, **kwargs)
      if response.status == http.HTTPStatus.OK or response.status == 206:
        obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
        response['x-goog-generation'] = str(obj['generation'])
        response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))
    return handler

  objects.insert = with_precondition(objects.insert)
  objects.download = with_generation(objects.download)
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  server.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket).run()


if __name__ == '__main__':
  _serve(int(sys.argv[1]), sys.argv[2])
