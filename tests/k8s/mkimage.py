#!/usr/bin/env python3
"""Build a single-layer container image archive from a root filesystem directory, without a
registry or a container engine. The tar is both an OCI image layout (index.json with the
io.containerd.image.name annotation, for `ctr images import`) and a docker-archive
(manifest.json, for `docker load` / `podman load`). Reproducible: fixed mtimes, uid/gid 0,
sorted entries, fixed creation date.

usage: mkimage.py ROOTFS NAME:TAG OUT.tar [--cmd ARG...] [--entrypoint ARG...]
"""
import hashlib
import io
import json
import os
import sys
import tarfile

EPOCH = "1970-01-01T00:00:00Z"


def parse(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    rootfs, ref, out, rest = argv[0], argv[1], argv[2], argv[3:]
    cfg, key = {}, None
    for a in rest:
        if a in ("--cmd", "--entrypoint"):
            key = "Cmd" if a == "--cmd" else "Entrypoint"
            cfg[key] = []
        elif key is None:
            sys.exit("unexpected argument %r\n%s" % (a, __doc__))
        else:
            cfg[key].append(a)
    return rootfs, ref, out, cfg


def layer_tar(rootfs):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                path = os.path.join(dirpath, name)
                arc = os.path.relpath(path, rootfs)
                ti = t.gettarinfo(path, arcname=arc)
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                ti.mtime = 0
                if ti.isfile():
                    with open(path, "rb") as f:
                        t.addfile(ti, f)
                else:
                    t.addfile(ti)
    return buf.getvalue()


def main():
    rootfs, ref, out, extra = parse(sys.argv[1:])
    files = {}

    def blob(data):
        d = hashlib.sha256(data).hexdigest()
        files["blobs/sha256/" + d] = data
        return "sha256:" + d, len(data)

    layer = layer_tar(rootfs)
    ld, ls = blob(layer)
    config = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
              "WorkingDir": "/"}
    config.update(extra)
    if "Cmd" not in config and "Entrypoint" not in config:
        config["Cmd"] = ["/bin/sh"]
    cfg = {"architecture": "amd64", "os": "linux", "created": EPOCH, "config": config,
           "rootfs": {"type": "layers", "diff_ids": [ld]},
           "history": [{"created": EPOCH, "created_by": "tests/k8s/mkimage.py"}]}
    cd, cs = blob(json.dumps(cfg, sort_keys=True).encode())
    man = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}]}
    md, ms = blob(json.dumps(man, sort_keys=True).encode())
    files["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1]}}]}).encode()
    files["manifest.json"] = json.dumps([{"Config": "blobs/sha256/" + cd[7:], "RepoTags": [ref],
                                          "Layers": ["blobs/sha256/" + ld[7:]]}]).encode()
    tmp = out + ".tmp"
    with tarfile.open(tmp, "w") as tf:
        for name in ["oci-layout", "index.json", "manifest.json"] + sorted(
                n for n in files if n.startswith("blobs/")):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(files[name]), 0, 0o644
            tf.addfile(ti, io.BytesIO(files[name]))
    os.replace(tmp, out)
    print(ref, md)


if __name__ == "__main__":
    main()
