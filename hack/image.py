#!/usr/bin/env python3
"""Builds OCI image archives without a container engine or a registry, for `ctr images import`.

    image.py dockerfile DOCKERFILE STAGE NAME OUT.tar --context STAGE=DIR ...
    image.py files NAME OUT.tar --file /PATH=SRC ... [--user U] [--entrypoint JSON] [--cmd JSON]

`dockerfile` carries out one runtime stage of the Dockerfile itself (FROM scratch, COPY --from, USER, EXPOSE,
ENTRYPOINT, CMD), taking each `COPY --from=STAGE /src /dst` from the directory given for STAGE: the image has
the Dockerfile's runtime layout by construction, and any other instruction is an error rather than a silent
difference. `files` builds a one-layer image from the files named (the pause image). Archives are
reproducible: same inputs, same digests.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import shlex
import sys
import tarfile


def fail(message):
    sys.exit(f"image.py: error: {message}")


def stage_instructions(dockerfile, stage):
    """The instructions of stage `stage` (continuation lines joined, comments dropped)."""
    lines, current = [], ""
    with open(dockerfile) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not current and line.lstrip().startswith("#"):
                continue
            current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
            if not line.endswith("\\"):
                if current:
                    lines.append(current)
                current = ""
    found, out = False, []
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            parts = rest.split()
            found = len(parts) == 3 and parts[1].upper() == "AS" and parts[2] == stage
            if found:
                out.append(("FROM", parts[0]))
            continue
        if found:
            out.append((word.upper(), rest.strip()))
    if not out:
        fail(f"{dockerfile} has no stage named {stage!r}")
    return out


def from_dockerfile(dockerfile, stage, contexts):
    files, config = {}, {}
    for word, rest in stage_instructions(dockerfile, stage):
        if word == "FROM":
            if rest != "scratch":
                fail(f"stage {stage!r} is FROM {rest}: only FROM scratch can be built without a registry")
        elif word == "COPY":
            args = shlex.split(rest)
            if len(args) != 3 or not args[0].startswith("--from="):
                fail(f"stage {stage!r}: COPY {rest!r}: only 'COPY --from=STAGE /src /dst' is supported")
            src_stage = args[0].removeprefix("--from=")
            if src_stage not in contexts:
                fail(f"stage {stage!r} copies from {src_stage!r}: pass --context {src_stage}=DIR")
            files[args[2]] = os.path.join(contexts[src_stage], os.path.basename(args[1]))
        elif word == "USER":
            config["User"] = rest
        elif word == "EXPOSE":
            config.setdefault("ExposedPorts", {})[rest if "/" in rest else f"{rest}/tcp"] = {}
        elif word in ("ENTRYPOINT", "CMD"):
            config[word.capitalize() if word == "CMD" else "Entrypoint"] = json.loads(rest)
        else:
            fail(f"stage {stage!r}: {word} is not supported by this builder (supported: FROM scratch, COPY "
                 "--from, USER, EXPOSE, ENTRYPOINT, CMD)")
    return files, config


def layer(files):
    """A gzipped tar of `files` (image path -> local path), every entry with fixed owner and time."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dst, src in sorted(files.items()):
            if not os.path.isfile(src):
                fail(f"{src} (for {dst}) does not exist: build it first")
            info = tarfile.TarInfo(dst.lstrip("/"))
            info.size, info.mode, info.mtime = os.path.getsize(src), 0o755, 0
            with open(src, "rb") as f:
                tar.addfile(info, f)
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    return gzip.compress(raw.getvalue(), mtime=0), diff_id


def write_archive(name, files, config, out):
    blob_layer, diff_id = layer(files)
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    blobs = {}

    def add(data, media_type):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    config_desc = add(json.dumps(image_config, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
    layer_desc = add(blob_layer, "application/vnd.oci.image.layer.v1.tar+gzip")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    manifest_desc = add(json.dumps(manifest, sort_keys=True).encode(), manifest["mediaType"])
    manifest_desc["annotations"] = {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_desc]}
    entries = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
               "index.json": json.dumps(index, sort_keys=True).encode()}
    for digest, data in blobs.items():
        entries["blobs/sha256/" + digest.removeprefix("sha256:")] = data
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with tarfile.open(out + ".tmp", mode="w") as tar:
        for path, data in sorted(entries.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    os.replace(out + ".tmp", out)
    print(f"{name} {manifest_desc['digest']} {out}")


def pairs(values, what):
    out = {}
    for v in values or []:
        key, sep, val = v.partition("=")
        if not sep:
            fail(f"{what} {v!r}: expected KEY=VALUE")
        out[key] = val
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("dockerfile")
    d.add_argument("dockerfile")
    d.add_argument("stage")
    d.add_argument("name")
    d.add_argument("out")
    d.add_argument("--context", action="append", help="STAGE=DIR: where COPY --from=STAGE finds its files")
    f = sub.add_parser("files")
    f.add_argument("name")
    f.add_argument("out")
    f.add_argument("--file", action="append", required=True, help="/PATH=SRC")
    f.add_argument("--user")
    f.add_argument("--entrypoint", type=json.loads)
    f.add_argument("--cmd", type=json.loads)
    a = p.parse_args()
    if a.mode == "dockerfile":
        files, config = from_dockerfile(a.dockerfile, a.stage, pairs(a.context, "--context"))
    else:
        files = pairs(a.file, "--file")
        config = {k: v for k, v in (("User", a.user), ("Entrypoint", a.entrypoint), ("Cmd", a.cmd)) if v}
    write_archive(a.name, files, config, a.out)


if __name__ == "__main__":
    main()
