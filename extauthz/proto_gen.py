"""Regenerate the Python modules in ``extauthz/proto`` from the ``.proto`` files in ``protos/``.

protoc emits absolute imports (``from envoy.… import …``, ``from google.rpc import …``);
they are rewritten to ``extauthz.proto.…`` so that these modules never shadow, or get
shadowed by, the ``envoy`` (xds-protos) and ``google.rpc`` (googleapis-common-protos,
xds-protos) Python packages. ``google.protobuf`` imports are left alone.

Proto file and message names stay as upstream (the gRPC method path depends on them), so
these modules still cannot share a process's default descriptor pool with those packages.

Usage: ``python -m extauthz.proto_gen [--out DIR]``
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "extauthz.proto"
PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
DEFAULT_OUT = Path(__file__).resolve().parent / "proto"
ROOT_INIT = '"""Generated protobuf/gRPC modules; regenerate with `python -m extauthz.proto_gen`."""\n'

# `from envoy.x import y` / `from google.rpc import y`, and the module name protoc passes
# to the builder (it becomes the classes' __module__, which pickle relies on).
_IMPORT_RE = re.compile(r"^(\s*from\s+)(envoy|google\.rpc)(?=[.\s])", re.MULTILINE)
_MODULE_NAME_RE = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')(envoy\.|google\.rpc\.)")
_LEFTOVER_RE = re.compile(r"^\s*(from|import)\s+(envoy|google\.rpc)\b", re.MULTILINE)


def rewrite(text: str) -> str:
    """Point imports of our own generated modules into the ``extauthz.proto`` package."""
    text = _IMPORT_RE.sub(rf"\g<1>{PACKAGE}.\g<2>", text)
    return _MODULE_NAME_RE.sub(rf"\g<1>{PACKAGE}.\g<2>", text)


def generate(proto_root: Path = PROTO_ROOT) -> dict[str, str]:
    """Run protoc over every ``.proto`` file; return {relative path: file content}."""
    protos = sorted(p.relative_to(proto_root).as_posix() for p in proto_root.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root}")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_root}",
               f"--python_out={tmp}", f"--grpc_python_out={tmp}", f"--pyi_out={tmp}", *protos]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit("protoc failed, see the messages above")
        raw = {p.relative_to(tmp).as_posix(): p.read_text(encoding="utf-8")
               for p in Path(tmp).rglob("*") if p.is_file()}
    files: dict[str, str] = {}
    for rel, text in raw.items():
        if rel.endswith("_pb2_grpc.py") and "class " not in text:
            continue  # no service in this .proto: only a version check, drop it
        text = rewrite(text)
        if _LEFTOVER_RE.search(text):
            raise SystemExit(f"{rel}: unrewritten import of a generated module")
        files[rel] = text
    for rel in list(files):
        for parent in Path(rel).parents:
            files.setdefault((parent / "__init__.py").as_posix(), "")
    files["__init__.py"] = ROOT_INIT
    return dict(sorted(files.items()))


def write(files: dict[str, str], out: Path) -> None:
    """Write the generated files, removing generated modules that are no longer produced."""
    for old in out.rglob("*_pb2*.py*"):
        rel = old.relative_to(out).as_posix()
        if rel not in files and re.search(r"_pb2(_grpc)?\.pyi?$", rel):
            old.unlink()
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate extauthz/proto from protos/.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    files = generate()
    write(files, args.out)
    print(f"wrote {len(files)} files to {args.out}")


if __name__ == "__main__":
    main()
