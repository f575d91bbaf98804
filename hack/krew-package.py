#!/usr/bin/env python3
"""Packages kubectl-mesh for krew: a tar.gz holding the binary and the LICENSE, and the plugin manifest
that names it with its sha256. For a release, give the static binary (`make krew`) and the URL the archive
will be served from; the test suite installs the result with krew's own `install --manifest --archive`.

    hack/krew-package.py --binary target/.../kubectl-mesh --version v0.1.0 \\
        --uri https://example.com/releases/v0.1.0/kubectl-mesh_linux_amd64.tar.gz --out dist/
"""
import argparse
import gzip
import hashlib
import io
import pathlib
import re
import tarfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

MANIFEST = """apiVersion: krew.googlecontainertools.github.com/v1alpha2
kind: Plugin
metadata:
  name: mesh
spec:
  version: {version}
  shortDescription: Show the agent mesh that mesh-operator plans
  description: |
    kubectl mesh shows the mesh of supplementary sync links mesh-operator plans for CI build agents:
    per agent, its node id, zone, links and the peers it dials (status); why a Pod has or lacks
    peers (explain); and the published mesh as Graphviz or Mermaid (graph).
  caveats: |
    It needs get and list on MeshPolicies and Pods of the namespace, and list on Nodes to show zones
    taken from Nodes. It reads only; it never changes anything.
  platforms:
    - selector:
        matchLabels:
          os: linux
          arch: amd64
      uri: {uri}
      sha256: {sha256}
      files:
        - from: kubectl-mesh
          to: .
        - from: LICENSE
          to: .
      bin: kubectl-mesh
"""


def archive(binary: pathlib.Path) -> bytes:
    """A reproducible tar.gz: fixed times, owners and order, so a rebuild has the same sha256."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path, mode in [("kubectl-mesh", binary, 0o755), ("LICENSE", ROOT / "LICENSE", 0o644)]:
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime, info.uname, info.gname = len(data), mode, 0, "", ""
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--binary", required=True, type=pathlib.Path)
    p.add_argument("--version", required=True)
    p.add_argument("--uri", required=True)
    p.add_argument("--out", required=True, type=pathlib.Path)
    a = p.parse_args()
    if not re.fullmatch(r"v\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", a.version):
        p.error(f"--version {a.version!r}: krew wants a semantic version with a leading v, such as v0.1.0")
    if not re.fullmatch(r"https?://\S+", a.uri):
        p.error(f"--uri {a.uri!r}: not an http(s) URL")
    a.out.mkdir(parents=True, exist_ok=True)
    data = archive(a.binary)
    (a.out / "kubectl-mesh_linux_amd64.tar.gz").write_bytes(data)
    manifest = MANIFEST.format(version=a.version, uri=a.uri, sha256=hashlib.sha256(data).hexdigest())
    (a.out / "mesh.yaml").write_text(manifest)
    print(a.out / "mesh.yaml")


if __name__ == "__main__":
    main()
